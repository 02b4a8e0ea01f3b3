"""Generated Triton configs are valid against Triton's own schema and say what was asked."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from flowserve.contract.spec import (
    CUDA_GRAPH_PARAMETER,
    DENSITY,
    DIRECTIONS,
    GENERATION,
    QUEUE_SIZE_PARAMETER,
    QUEUE_TIMEOUT_PARAMETER,
    RUNNER_BACKEND,
    direction_spec,
)
from flowserve.export.exporter.triton_config import (
    ServingConfig,
    build_model_config,
    config_text,
    cuda_graph_buckets,
    parse_config_text,
)

FLAVOURS = {
    "python-cpu": ServingConfig(),
    "python-gpu": ServingConfig(instance_kind="gpu", gpus=(0, 1), instance_count=2),
    "python-queue": ServingConfig(max_queue_size=5, queue_timeout_ms=0),
    "python-triton-queue": ServingConfig(max_queue_size=5, triton_queue_policy=True),
    "onnxruntime-gpu": ServingConfig(backend="onnxruntime", instance_kind="gpu", gpus=(0,), max_batch_size=4096),
    "onnxruntime-cpu": ServingConfig(backend="onnxruntime", max_queue_delay_us=0),
    "python-unbatched": ServingConfig(dynamic_batching=False),
    "python-torchscript": ServingConfig(format="torchscript"),
    "pytorch-gpu": ServingConfig(backend="pytorch", format="torchscript", instance_kind="gpu", gpus=(0,)),
}
BACKEND_NAMES = {"python": RUNNER_BACKEND, "onnxruntime": "onnxruntime", "pytorch": "pytorch"}


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_config_parses_with_tritons_schema(flavour, direction):
    serving = FLAVOURS[flavour]
    spec = direction_spec(direction, 2, context_dim=3)
    text = config_text(build_model_config(f"flow-{direction}", spec, serving))
    config = text_format.Parse(text, mc.ModelConfig())  # rejects unknown fields
    if serving.backend == "pytorch":
        spec = spec.positional()

    assert config.name == f"flow-{direction}"
    assert config.backend == BACKEND_NAMES[serving.backend]
    assert config.default_model_filename == ("model.pt" if serving.format == "torchscript" else "model.onnx")
    assert config.max_batch_size == serving.max_batch_size
    assert config.HasField("dynamic_batching") == serving.dynamic_batching
    assert config.dynamic_batching.max_queue_delay_microseconds == (serving.max_queue_delay_us if serving.dynamic_batching else 0)
    if serving.dynamic_batching:  # the queue's bounds: 32 requests per instance unless given
        queue_size = serving.max_queue_size or 32 * serving.instance_count
        assert config.parameters[QUEUE_SIZE_PARAMETER].string_value == str(queue_size)
        assert config.parameters[QUEUE_TIMEOUT_PARAMETER].string_value == str(serving.queue_timeout_ms)
    else:
        assert QUEUE_SIZE_PARAMETER not in config.parameters
    # Triton's own queue policy only when asked for (it stalls lone requests on Triton 2.51).
    assert config.dynamic_batching.HasField("default_queue_policy") == serving.triton_queue_policy
    if serving.triton_queue_policy:
        policy = config.dynamic_batching.default_queue_policy
        assert policy.max_queue_size == queue_size
        assert policy.default_timeout_microseconds == 1000 * serving.queue_timeout_ms
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT and policy.allow_timeout_override
    (group,) = config.instance_group
    assert group.count == serving.instance_count
    expected_kind = mc.ModelInstanceGroup.KIND_GPU if serving.instance_kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    assert group.kind == expected_kind
    assert list(group.gpus) == list(serving.gpus)
    assert [i.name for i in config.input] == spec.input_names
    assert [o.name for o in config.output] == spec.output_names
    assert [list(i.dims) for i in config.input] == [[2], [3]]
    assert all(t.data_type == mc.TYPE_FP32 for t in [*config.input, *config.output])
    warmups = {w.batch_size for w in config.model_warmup}
    assert warmups == {1, serving.max_batch_size}
    assert all(set(w.inputs) == set(spec.input_names) for w in config.model_warmup)


def test_positional_names_for_the_pytorch_backend():
    spec = direction_spec(GENERATION, 4, noise_dim=6, context_dim=2).positional()
    assert spec.input_names == ["INPUT__0", "INPUT__1"] and spec.output_names == ["OUTPUT__0", "OUTPUT__1"]
    assert [t.dims for t in spec.inputs] == [(6,), (2,)] and [t.dims for t in spec.outputs] == [(4,), ()]


def test_per_row_scalars_are_exposed_with_a_reshape():
    config = build_model_config("flow-generation", direction_spec(GENERATION, 3), ServingConfig())
    x, log_prob = config.output
    assert list(x.dims) == [3] and not x.HasField("reshape")
    assert list(log_prob.dims) == [1] and log_prob.HasField("reshape") and list(log_prob.reshape.shape) == []


def test_schema_check_rejects_a_misspelled_field():
    text = config_text(build_model_config("flow-density", direction_spec(DENSITY, 2), ServingConfig()))
    with pytest.raises(text_format.ParseError):
        parse_config_text(text.replace("max_batch_size", "max_batchsize"))


@pytest.mark.parametrize("kwargs", [
    {"backend": "tensorrt"},
    {"format": "savedmodel"},
    {"backend": "onnxruntime", "format": "torchscript"},
    {"backend": "pytorch"},  # TorchScript only
    {"instance_kind": "tpu"},
    {"gpus": (0,)},  # a gpus list on a CPU group
    {"max_batch_size": 0},
    {"instance_count": 0},
    {"max_queue_delay_us": -1},
])
def test_serving_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        ServingConfig(**kwargs)


@pytest.mark.parametrize("max_batch_size, buckets", [
    (4096, [1, 4, 16, 64, 256, 1024, 4096]), (100, [1, 4, 16, 64, 100]), (4, [1, 4]), (1, [1])])
def test_cuda_graph_buckets_grow_fourfold_up_to_the_batch_limit(max_batch_size, buckets):
    assert cuda_graph_buckets(max_batch_size) == buckets


GPU_TORCHSCRIPT = ServingConfig(format="torchscript", instance_kind="gpu", max_batch_size=256)


@pytest.mark.parametrize("serving, capturable, buckets", [
    (GPU_TORCHSCRIPT, True, "1,4,16,64,256"),
    (GPU_TORCHSCRIPT, False, None),  # the fixed-point loop
    (ServingConfig(format="torchscript", instance_kind="gpu", cuda_graphs=False), True, None),  # --no-cuda-graphs
    (ServingConfig(format="torchscript"), True, None),  # CPU instances
    (ServingConfig(instance_kind="gpu"), True, None),  # ONNX
    (ServingConfig(backend="pytorch", format="torchscript", instance_kind="gpu"), True, None),  # not the runner
])
def test_the_runner_is_told_to_capture_cuda_graphs_only_for_capturable_torchscript_on_gpus(serving, capturable,
                                                                                            buckets):
    config = build_model_config("flow-generation", direction_spec(GENERATION, 2), serving, capturable)
    assert (config.parameters[CUDA_GRAPH_PARAMETER].string_value
            if CUDA_GRAPH_PARAMETER in config.parameters else None) == buckets

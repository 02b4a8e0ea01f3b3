"""Write Triton model configurations (``config.pbtxt``) from the flowserve spec.

Three backends share one builder:

* ``python``: flowserve's Python-based backend ``flowserve_runner`` runs the ONNX file
  with ONNX Runtime or the TorchScript file with torch. It works with the Triton in the
  ``nvidia-pytriton`` wheel (CPU here, CUDA on ``KIND_GPU``).
* ``onnxruntime`` (ONNX) and ``pytorch`` (TorchScript): Triton's native backends, for GPU
  clusters running the NGC Triton image. The PyTorch backend names tensors
  ``INPUT__<i>``/``OUTPUT__<i>``.

Configs are built as ``model_config_pb2.ModelConfig`` messages, Triton's own schema, and
printed in text format, so a field Triton does not know cannot be written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from flowserve.contract.spec import (
    CUDA_GRAPH_PARAMETER,
    MODEL_FILENAMES,
    QUEUE_SIZE_PARAMETER,
    QUEUE_TIMEOUT_PARAMETER,
    RUNNER_BACKEND,
    DirectionSpec,
    TensorSpec,
)

BACKENDS = {"python": RUNNER_BACKEND, "onnxruntime": "onnxruntime", "pytorch": "pytorch"}
NATIVE_BACKEND_FORMAT = {"onnxruntime": "onnx", "pytorch": "torchscript"}
INSTANCE_KINDS = {"cpu": mc.ModelInstanceGroup.KIND_CPU, "gpu": mc.ModelInstanceGroup.KIND_GPU}
# Requests that may wait per instance. Triton counts requests whatever their rows; the
# gateway, which merges its calls, lets this many full batches' rows wait.
QUEUED_REQUESTS_PER_INSTANCE = 32


@dataclass(frozen=True)
class ServingConfig:
    """How Triton should serve a model: batching, instances and backend flavour."""

    backend: str = "python"
    format: str = "onnx"
    # 4096 rows: a large request is one call on Triton, not four. No queue delay: the gateway
    # merges concurrent requests itself without a timer (``server/gateway/batching.py``), and Triton
    # still batches whatever queues up while an instance is busy.
    max_batch_size: int = 4096
    max_queue_delay_us: int = 0
    # False: Triton runs every request on its own and the gateway does not coalesce them
    # (the baseline that batching is measured against).
    dynamic_batching: bool = True
    instance_count: int = 1
    instance_kind: str = "cpu"
    gpus: tuple[int, ...] = field(default_factory=tuple)
    # 0: chosen when the model loads, from the cores the instance may use divided by the
    # instance count (flowserve's runner) or ONNX Runtime's own default (its native backend).
    intra_op_threads: int = 0
    # MAF/IAF in ONNX: from this many rows, the slow direction runs the cached inverse
    # (``flows.cached_inverse``) instead of the fixed-point loop; None: never.
    cached_inverse_min_batch: int | None = None
    # Back-pressure: at most this many requests wait for the model's instances (0:
    # QUEUED_REQUESTS_PER_INSTANCE per instance), none longer than queue_timeout_ms (0: no
    # limit). The config's parameters carry both to the gateway, whose batcher enforces them.
    max_queue_size: int = 0
    queue_timeout_ms: int = 2000
    # Export the encode direction (x -> z) too, where the model has one: one more Triton model
    # per flow, hence one more Python stub process (on a GPU, one more CUDA context).
    encode: bool = True
    # Export a model's context embedding (``context_embedding``) as a model apart,
    # ``<flow>-embed``, that the gateway runs once per distinct context of a call; the
    # directions then take the embedded context. Off: the directions embed every row.
    separate_embedding: bool = True
    # TorchScript on GPU instances of flowserve's runner: capture a CUDA graph per batch-size
    # bucket (cuda_graph_buckets) for each direction that can be captured.
    cuda_graphs: bool = True
    # Also hand the bounds to Triton's dynamic batcher as its queue policy. Off by default: on
    # Triton 2.51 any queue policy made the batcher leave a lone request in its queue for its
    # 500 ms idle wait every second or so (docs/performance.md, "Back-pressure under a burst").
    triton_queue_policy: bool = False

    @property
    def queue_size(self) -> int:
        """The queue's bound in requests."""
        return self.max_queue_size or QUEUED_REQUESTS_PER_INSTANCE * self.instance_count

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.format not in MODEL_FILENAMES:
            raise ValueError(f"format must be one of {sorted(MODEL_FILENAMES)}, got {self.format!r}")
        if NATIVE_BACKEND_FORMAT.get(self.backend, self.format) != self.format:
            raise ValueError(f"Triton's {self.backend} backend serves {NATIVE_BACKEND_FORMAT[self.backend]} "
                             f"models, not {self.format}")
        if self.instance_kind not in INSTANCE_KINDS:
            raise ValueError(f"instance kind must be one of {sorted(INSTANCE_KINDS)}")
        if self.gpus and self.instance_kind != "gpu":
            raise ValueError("a gpus list needs instance kind 'gpu'")
        if self.cached_inverse_min_batch is not None:
            if self.format != "onnx":
                raise ValueError("the cached inverse is exported to ONNX only; TorchScript keeps the loop")
            if self.cached_inverse_min_batch < 1:
                raise ValueError(f"the cached inverse's minimum batch must be >= 1, got {self.cached_inverse_min_batch}")
        if self.max_batch_size < 1 or self.instance_count < 1 or self.max_queue_delay_us < 0:
            raise ValueError("max_batch_size and instance_count must be >= 1, queue delay >= 0")
        if self.max_queue_size < 0 or self.queue_timeout_ms < 0:
            raise ValueError("max_queue_size and queue_timeout_ms must be >= 0 (0: the default size, no timeout)")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0 (0: from the cores), got {self.intra_op_threads}")


def cuda_graph_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes the runner captures CUDA graphs for: powers of 4 below ``max_batch_size``,
    and ``max_batch_size``. A batch pads up to at most 4 times its rows, for 7 graphs at 4096."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 4
    return [*buckets, max_batch_size]


def _tensor_dims(tensor: TensorSpec) -> tuple[list[int], bool]:
    """Triton dims for a per-row tensor; scalars per row are exposed as [1] with a reshape."""
    return (list(tensor.dims), False) if tensor.dims else ([1], True)


def build_model_config(model_name: str, spec: DirectionSpec, serving: ServingConfig,
                       capturable: bool = False) -> mc.ModelConfig:
    """The ``ModelConfig`` of one direction of a flow; ``capturable``: its TorchScript module
    can be captured in a CUDA graph (``formats.cuda_graph_blockers``)."""
    if serving.backend == "pytorch":
        spec = spec.positional()
    config = mc.ModelConfig(name=model_name, max_batch_size=serving.max_batch_size)
    config.backend = BACKENDS[serving.backend]
    config.default_model_filename = MODEL_FILENAMES[serving.format]
    for tensor in spec.inputs:
        dims, scalar = _tensor_dims(tensor)
        entry = config.input.add(name=tensor.name, data_type=tensor.config_dtype, dims=dims)
        if scalar:
            entry.reshape.SetInParent()
    for tensor in spec.outputs:
        dims, scalar = _tensor_dims(tensor)
        entry = config.output.add(name=tensor.name, data_type=tensor.config_dtype, dims=dims)
        if scalar:
            entry.reshape.SetInParent()

    if serving.dynamic_batching:
        config.dynamic_batching.max_queue_delay_microseconds = serving.max_queue_delay_us
        config.parameters[QUEUE_SIZE_PARAMETER].string_value = str(serving.queue_size)
        config.parameters[QUEUE_TIMEOUT_PARAMETER].string_value = str(serving.queue_timeout_ms)
        if serving.triton_queue_policy:
            config.dynamic_batching.default_queue_policy.CopyFrom(mc.ModelQueuePolicy(
                timeout_action=mc.ModelQueuePolicy.REJECT,
                default_timeout_microseconds=1000 * serving.queue_timeout_ms,
                allow_timeout_override=True,
                max_queue_size=serving.queue_size,
            ))
    config.instance_group.add(
        name=model_name,
        count=serving.instance_count,
        kind=INSTANCE_KINDS[serving.instance_kind],
        gpus=list(serving.gpus),
    )
    for batch_size in sorted({1, serving.max_batch_size}):
        warmup = config.model_warmup.add(name=f"random-batch-{batch_size}", batch_size=batch_size)
        for tensor in spec.inputs:
            dims, _ = _tensor_dims(tensor)
            warmup.inputs[tensor.name].CopyFrom(
                mc.ModelWarmup.Input(data_type=tensor.config_dtype, dims=dims, random_data=True)
            )
    thread_key = {"python": "intra_op_num_threads", "onnxruntime": "intra_op_thread_count",
                  "pytorch": "INTRA_OP_THREAD_COUNT"}[serving.backend]
    if serving.intra_op_threads or serving.backend != "pytorch":  # left out, the PyTorch backend keeps torch's default
        config.parameters[thread_key].string_value = str(serving.intra_op_threads)
    if (capturable and serving.cuda_graphs and serving.format == "torchscript" and serving.backend == "python"
            and serving.instance_kind == "gpu"):
        buckets = cuda_graph_buckets(serving.max_batch_size)
        config.parameters[CUDA_GRAPH_PARAMETER].string_value = ",".join(map(str, buckets))
    return config


def config_text(config: mc.ModelConfig) -> str:
    """``config.pbtxt`` text of ``config``."""
    return text_format.MessageToString(config)


def parse_config_text(text: str) -> mc.ModelConfig:
    """Parse ``config.pbtxt`` text with Triton's schema; unknown fields raise ParseError."""
    return text_format.Parse(text, mc.ModelConfig())


def write_model(
    repository: Path, model_name: str, version: int, spec: DirectionSpec,
    serving: ServingConfig, graph: bytes, capturable: bool = False,
) -> Path:
    """Write ``<repository>/<model_name>/config.pbtxt`` and the version's model file."""
    model_dir = Path(repository) / model_name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    model_file = version_dir / MODEL_FILENAMES[serving.format]
    model_file.write_bytes(graph)
    (model_dir / "config.pbtxt").write_text(config_text(build_model_config(model_name, spec, serving, capturable)))
    return model_file

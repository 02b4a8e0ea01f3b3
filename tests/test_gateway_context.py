"""Context, noise_dim, log-likelihood kind and bits/dim through the gateway.

The unconditional path runs live on the real Triton and gateway of conftest. The
conditional path runs through the real service, servicer, gRPC and client in front of
conftest's in-memory stand-in for Triton (test_families_e2e serves a conditional flow live).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import SMALL_CHUNKS, InMemoryBackend

from flowserve.contract.metadata import SCHEMA_VERSION, FlowMetadata, metadata_path
from flowserve.contract.spec import CONTEXT, DENSITY, DIRECTIONS, GENERATION, direction_spec, triton_model_name
from flowserve.server.client import FlowClient
from flowserve.server.gateway.app import Gateway, GatewayConfig
from flowserve.server.gateway.catalog import ModelCatalog
from flowserve.server.gateway.domain import LogLikelihoodQuery, SampleQuery
from flowserve.server.gateway.service import FlowService, GatewayLimits
from flowserve.server.protocol.errors import (
    BackendError,
    BackendUnavailable,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
)
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.protocol.tensors import encode
from flowserve.server.triton.launcher import free_port

CONDITIONAL = "digits-cond"
UNCONDITIONAL = "digits-plain"
EVENT_SHAPE = (1, 2, 2)
EVENT_DIM = 4
NOISE_DIM = 6  # neither D nor D + 1, so a wrong noise width shows
CONTEXT_SHAPE = (3,)
CHUNK = 4  # the stand-in's max_batch_size: 10 rows go to Triton as 4 + 4 + 2


def flow_metadata(name: str, **fields) -> FlowMetadata:
    """A flow's metadata with ``fields`` set and the other serving fields at their defaults."""
    models = {d: triton_model_name(name, d) for d in DIRECTIONS}
    return FlowMetadata(**{"name": name, "family": "vae", "event_shape": EVENT_SHAPE, "models": models, **fields})


def write_metadata(repository: Path, name: str, **fields) -> None:
    flow_metadata(name, **fields).write(repository)


def fake_density(x: np.ndarray, context: np.ndarray) -> np.ndarray:
    """What the stand-in's density model answers: depends on each row's x and context."""
    return x.sum(axis=1) + 100 * context.sum(axis=1)


def fake_generation(z: np.ndarray, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the stand-in's generation model answers: x and log_prob from each row's z and context."""
    return z[:, :EVENT_DIM] + context.sum(axis=1, keepdims=True), z.sum(axis=1) + 100 * context.sum(axis=1)


def fake_answer(spec, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The stand-in Triton's answer: from each row's inputs, so a context row that travels
    with the wrong x or z row changes the result."""
    context = inputs.get(CONTEXT, np.zeros((next(iter(inputs.values())).shape[0], 0), np.float32))
    if spec.direction == DENSITY:
        return {"log_prob": fake_density(inputs["x"], context)}
    x, log_prob = fake_generation(inputs["z"], context)
    return {"x": x, "log_prob": log_prob}


@pytest.fixture
def conditional_repository(tmp_path) -> Path:
    write_metadata(tmp_path, CONDITIONAL, context_shape=list(CONTEXT_SHAPE), noise_dim=NOISE_DIM,
                   log_likelihood="lower_bound")
    # The smallest file the schema admits, so the catalog must supply every default itself.
    minimal = {"schema": SCHEMA_VERSION, "name": UNCONDITIONAL, "family": "vae", "event_shape": list(EVENT_SHAPE),
               "models": {d: triton_model_name(UNCONDITIONAL, d) for d in DIRECTIONS}}
    metadata_path(tmp_path, UNCONDITIONAL).write_text(json.dumps(minimal))
    return tmp_path


@pytest.fixture
def backend() -> InMemoryBackend:
    versions = {triton_model_name(n, d): ["1"] for n in (CONDITIONAL, UNCONDITIONAL) for d in DIRECTIONS}
    return InMemoryBackend(fake_answer, max_batch_size=CHUNK, versions=versions)


@pytest.fixture
def service(conditional_repository, backend) -> FlowService:
    return FlowService(backend, ModelCatalog(conditional_repository), GatewayLimits())


def test_catalog_reads_noise_dim_context_shape_and_kind_with_their_defaults(conditional_repository):
    catalog = ModelCatalog(conditional_repository)
    conditional, unconditional = catalog.get(CONDITIONAL), catalog.get(UNCONDITIONAL)
    assert (conditional.noise_dim, conditional.context_shape, conditional.context_dim) == (NOISE_DIM, (3,), 3)
    assert conditional.log_likelihood == "lower_bound"
    assert (unconditional.noise_dim, unconditional.context_shape, unconditional.context_dim) == (EVENT_DIM, (), 0)
    assert unconditional.log_likelihood == "exact"
    generation = conditional.spec(GENERATION)
    assert [(t.name, t.dims) for t in generation.inputs] == [("z", (NOISE_DIM,)), ("context", (3,))]
    assert [(t.name, t.dims) for t in generation.outputs] == [("x", (4,)), ("log_prob", ())]
    assert [(t.name, t.dims) for t in conditional.spec(DENSITY).inputs] == [("x", (4,)), ("context", (3,))]
    assert unconditional.spec(DENSITY).input_names == ["x"]


@pytest.mark.parametrize(("key", "value"), [
    ("noise_dim", 0), ("noise_dim", "5"), ("context_shape", [0]), ("context_shape", 3),
    ("log_likelihood", "approximate"), ("models", 7), ("models", {"density": "m"}), ("support", [1, 0]),
])
def test_catalog_skips_a_flow_whose_optional_key_is_malformed(conditional_repository, caplog, key, value):
    document = {**flow_metadata("broken").to_dict(), key: value}
    metadata_path(conditional_repository, "broken").write_text(json.dumps(document))
    with caplog.at_level(logging.WARNING):
        catalog = ModelCatalog(conditional_repository)
    assert catalog.names() == [CONDITIONAL, UNCONDITIONAL]
    assert any("'broken'" in r.getMessage() and key in r.getMessage() for r in caplog.records)


def test_sample_chunks_carry_their_own_context_rows(service, backend):
    context = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    result = asyncio.run(service.sample(
        SampleQuery(CONDITIONAL, 10, seed=7, temperature=0.5, return_log_prob=True, context=context)))
    assert [model for model, _, _ in backend.calls] == [triton_model_name(CONDITIONAL, GENERATION)] * 3
    assert [set(inputs) for _, _, inputs in backend.calls] == [{"z", "context"}] * 3
    assert [z.shape for z in backend.chunks("z")] == [(4, NOISE_DIM), (4, NOISE_DIM), (2, NOISE_DIM)]
    assert [c.dtype for c in backend.chunks("context")] == [np.float32] * 3
    noise = np.random.Generator(np.random.PCG64(7)).standard_normal((10, NOISE_DIM), dtype=np.float32)
    np.testing.assert_array_equal(np.concatenate(backend.chunks("z")), noise * np.float32(0.5))
    np.testing.assert_array_equal(np.concatenate(backend.chunks("context")), context)
    x, log_prob = fake_generation(noise * np.float32(0.5), context)
    assert result.samples.shape == (10, *EVENT_SHAPE) and result.seed == 7
    np.testing.assert_allclose(result.samples.reshape(10, EVENT_DIM), x, rtol=1e-6)
    np.testing.assert_allclose(result.log_prob, log_prob, rtol=1e-6)


def test_sample_broadcasts_one_context_to_every_row(service, backend):
    context = np.array([1.0, -2.0, 0.5], np.float32)
    result = asyncio.run(service.sample(SampleQuery(CONDITIONAL, 10, seed=3, context=context)))
    assert [c.shape for c in backend.chunks("context")] == [(4, 3), (4, 3), (2, 3)]
    np.testing.assert_array_equal(np.concatenate(backend.chunks("context")), np.tile(context, (10, 1)))
    assert result.samples.shape == (10, *EVENT_SHAPE) and result.log_prob is None


@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "broadcast"])
def test_log_likelihood_chunks_carry_their_context_rows_and_give_bits_per_dim(service, backend, per_row):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, *EVENT_SHAPE)).astype(np.float32)
    context = rng.normal(size=(9, 3) if per_row else (3,)).astype(np.float32)
    result = asyncio.run(service.log_likelihood(
        LogLikelihoodQuery(CONDITIONAL, x, context=context, return_bits_per_dim=True)))
    rows = np.broadcast_to(context, (9, 3))
    assert [model for model, _, _ in backend.calls] == [triton_model_name(CONDITIONAL, DENSITY)] * 3
    np.testing.assert_array_equal(np.concatenate(backend.chunks("x")), x.reshape(9, EVENT_DIM))
    np.testing.assert_array_equal(np.concatenate(backend.chunks("context")), rows)
    log_prob = fake_density(x.reshape(9, EVENT_DIM), rows)
    np.testing.assert_allclose(result.log_prob, log_prob, rtol=1e-6)
    np.testing.assert_allclose(result.bits_per_dim, -log_prob / (EVENT_DIM * math.log(2)), rtol=1e-6)


def test_log_likelihood_gives_bits_per_dim_only_when_asked(service):
    x = np.zeros((2, *EVENT_SHAPE), np.float32)
    result = asyncio.run(service.log_likelihood(LogLikelihoodQuery(UNCONDITIONAL, x)))
    assert result.bits_per_dim is None and result.log_prob.shape == (2,)


def with_non_finite(shape: tuple[int, ...], index: tuple[int, ...]) -> np.ndarray:
    array = np.ones(shape, np.float32)
    array[index] = np.nan
    return array


BAD_CONTEXTS = [
    # (model, context, message)
    (CONDITIONAL, None, "model 'digits-cond' needs context of shape [3] (one for every row) or [{rows}, 3] "
                        "(one per row); context is unset"),
    (CONDITIONAL, np.ones(4), "context.shape is [4]; model 'digits-cond' expects [3] or [{rows}, 3]"),
    (CONDITIONAL, np.ones((10, 4)), "context.shape is [10, 4]; model 'digits-cond' expects [3] or [{rows}, 3]"),
    (CONDITIONAL, np.ones((10, 3, 1)), "context.shape is [10, 3, 1]; model 'digits-cond' expects"),
    (CONDITIONAL, np.ones((7, 3)), "context has 7 rows but {rows} is 10; send 10 context rows or a single context "
                                   "of shape [3]"),
    (CONDITIONAL, with_non_finite((3,), (1,)), "context has non-finite values (NaN or inf)"),
    (CONDITIONAL, with_non_finite((10, 3), (6, 2)), "context has non-finite values (NaN or inf) in row 6"),
    (UNCONDITIONAL, np.ones(3), "context.shape is [3] but model 'digits-plain' takes no context; "
                                "leave context unset"),
]


@pytest.mark.parametrize("method", ["sample", "log_likelihood"])
@pytest.mark.parametrize(("model", "context", "message"), BAD_CONTEXTS,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BAD_CONTEXTS)])
def test_bad_context_is_an_invalid_argument_that_says_what_to_send(service, backend, method, model, context,
                                                                   message):
    context = None if context is None else context.astype(np.float32)
    if method == "sample":
        call, rows = service.sample(SampleQuery(model, 10, seed=0, context=context)), "num_samples"
    else:
        x = np.zeros((10, *EVENT_SHAPE), np.float32)
        call, rows = service.log_likelihood(LogLikelihoodQuery(model, x, context=context)), "x.shape[0]"
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(call)
    assert message.format(rows=rows) in str(info.value)
    assert backend.calls == []


def test_context_counts_toward_the_message_size_limit(conditional_repository, backend):
    # 2 event values + 1,000,000 context values + log_prob per row: 16 rows fit in 63 MiB.
    write_metadata(conditional_repository, "wide-context", event_shape=[2], context_shape=[1000, 1000])
    service = FlowService(backend, ModelCatalog(conditional_repository), GatewayLimits())
    with pytest.raises(InvalidArgument, match=r"num_samples is 17: at 1000003 float32 values per row .* "
                                              r"64 MiB message limit; send at most 16 rows"):
        asyncio.run(service.sample(SampleQuery("wide-context", 17, seed=0)))
    # 16 rows pass the size check and fail on the missing context.
    with pytest.raises(InvalidArgument, match=r"needs context of shape \[1000, 1000\]"):
        asyncio.run(service.sample(SampleQuery("wide-context", 16, seed=0)))


def test_list_models_reports_context_shape_and_kind(service):
    models = {m.name: m for m in asyncio.run(service.list_models())}
    assert (models[CONDITIONAL].context_shape, models[CONDITIONAL].log_likelihood) == ((3,), "lower_bound")
    assert (models[UNCONDITIONAL].context_shape, models[UNCONDITIONAL].log_likelihood) == ((), "exact")
    assert models[CONDITIONAL].metadata["noise_dim"] == str(NOISE_DIM)


def test_context_travels_through_grpc_servicer_and_client(conditional_repository, backend):
    """The real gateway (interceptor, servicer, service) and FlowClient in front of the in-memory backend."""
    context = np.array([0.5, 0.25, -1.0], np.float32)
    rows = np.random.default_rng(2).normal(size=(6, 3)).astype(np.float32)

    def calls(target: str) -> None:
        with FlowClient(target, timeout=30) as client:
            models = {m.name: m for m in client.list_models()}
            assert list(models[CONDITIONAL].context_shape) == [3]
            assert models[CONDITIONAL].log_likelihood_kind == pb.LOG_LIKELIHOOD_KIND_LOWER_BOUND
            assert list(models[UNCONDITIONAL].context_shape) == []
            assert models[UNCONDITIONAL].log_likelihood_kind == pb.LOG_LIKELIHOOD_KIND_EXACT

            samples = client.sample(CONDITIONAL, 6, seed=11, context=context)
            noise = np.random.Generator(np.random.PCG64(11)).standard_normal((6, NOISE_DIM), dtype=np.float32)
            x, log_prob = fake_generation(noise, np.tile(context, (6, 1)))
            assert samples.x.shape == (6, *EVENT_SHAPE)
            np.testing.assert_allclose(samples.x.reshape(6, EVENT_DIM), x, rtol=1e-6)
            np.testing.assert_allclose(samples.log_prob, log_prob, rtol=1e-6)

            chunks = list(client.sample_stream(CONDITIONAL, 6, seed=11, context=context))
            assert [len(chunk.x) for chunk in chunks] == [CHUNK, 2]
            np.testing.assert_array_equal(np.concatenate([chunk.x for chunk in chunks]), samples.x)
            np.testing.assert_array_equal(np.concatenate([chunk.log_prob for chunk in chunks]), samples.log_prob)

            scores = client.score(CONDITIONAL, samples.x, context=rows, return_bits_per_dim=True)
            log_prob = fake_density(samples.x.reshape(6, EVENT_DIM), rows)
            np.testing.assert_allclose(scores.log_prob, log_prob, rtol=1e-6)
            np.testing.assert_allclose(scores.bits_per_dim, -log_prob / (EVENT_DIM * math.log(2)), rtol=1e-6)
            np.testing.assert_allclose(client.log_likelihood(CONDITIONAL, samples.x, context=rows), log_prob,
                                       rtol=1e-6)

            with pytest.raises(grpc.RpcError) as info:
                client.sample(CONDITIONAL, 6, seed=11)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "needs context of shape [3]" in info.value.details()
            empty = pb.SampleRequest(model=CONDITIONAL, num_samples=2, context=pb.Tensor())
            with pytest.raises(grpc.RpcError) as info:
                client.stub.Sample(empty, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "context.shape is missing: send [*context_shape] or [N, *context_shape]" in info.value.details()

    async def scenario() -> None:
        config = GatewayConfig(conditional_repository, triton_url="in-memory", host="127.0.0.1", port=0,
                               metrics_port=free_port())
        async with Gateway(config, backend) as gateway:
            await asyncio.to_thread(calls, f"127.0.0.1:{gateway.port}")
            return gateway.metrics.registry

    registry = asyncio.run(scenario())
    # Sample, SampleStream and the two scorings (2 chunks each) reached the backend; the bad requests did not.
    assert len(backend.calls) == 8
    stream = {"method": "SampleStream", "model": CONDITIONAL}
    assert registry.get_sample_value("flowserve_requests_total", {**stream, "code": "OK"}) == 1
    assert registry.get_sample_value("flowserve_request_rows_sum", stream) == 6


def test_messages_that_do_not_parse_and_oversized_input_get_precise_bounded_errors(
        conditional_repository, backend, caplog):
    """Bytes that are no protobuf message, a model name that is not UTF-8, a 100 KB model name
    and a tensor of 100 dimensions: each gets its own status and a short message, is counted,
    logs no traceback, and the gateway serves the next good request."""
    long_name = "m" * 100_000
    many_dims = pb.LogLikelihoodRequest(model=UNCONDITIONAL, x=pb.Tensor(shape=[1] * 100, data=b"\0\0\0\0"))

    def calls(target: str) -> list[tuple[grpc.StatusCode, str]]:
        answers = []
        with grpc.insecure_channel(target) as channel:
            raw_sample = channel.unary_unary("/flowserve.v1.FlowService/Sample")  # bytes in, bytes out
            for request in (b"\xff\xff\xff\xff", b"\x0a\x02\xff\xfe", pb.SampleRequest(model=long_name,
                            num_samples=1).SerializeToString()):
                with pytest.raises(grpc.RpcError) as info:
                    raw_sample(request, timeout=30)
                answers.append((info.value.code(), info.value.details()))
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/flowserve.v1.FlowService/LogLikelihood")(many_dims.SerializeToString(), timeout=30)
            answers.append((info.value.code(), info.value.details()))
        with FlowClient(target, timeout=30) as client:
            assert client.sample(UNCONDITIONAL, 3, seed=1).x.shape == (3, *EVENT_SHAPE)
        return answers

    async def scenario():
        config = GatewayConfig(conditional_repository, triton_url="in-memory", host="127.0.0.1", port=0,
                               metrics_port=free_port())
        async with Gateway(config, backend) as gateway:
            return await asyncio.to_thread(calls, f"127.0.0.1:{gateway.port}"), gateway.metrics.registry

    with caplog.at_level(logging.INFO):
        (garbage, not_utf8, long_model, dims), registry = asyncio.run(scenario())
    for code, details in (garbage, not_utf8):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "the Sample request does not parse as a flowserve.v1 message" in details
    assert long_model[0] == grpc.StatusCode.NOT_FOUND and len(long_model[1]) < 300
    assert "'mmmm" in long_model[1] and "... (100000 characters) is not served" in long_model[1]
    assert dims == (grpc.StatusCode.INVALID_ARGUMENT,
                    "x.shape has 100 dimensions; at most 16: send [N, *event_shape]")
    invalid = {"method": "Sample", "model": "unknown", "code": "INVALID_ARGUMENT"}
    assert registry.get_sample_value("flowserve_requests_total", invalid) == 2
    assert "Traceback" not in caplog.text


@pytest.mark.e2e
def test_live_bits_per_dim_is_log_prob_in_bits_per_dimension(live_server, live_stub, moons):
    x = moons["test"][:300]
    with FlowClient(live_server.target) as client:
        scores = client.score(SMALL_CHUNKS, x, return_bits_per_dim=True)
        assert client.score(SMALL_CHUNKS, x).bits_per_dim is None
    assert scores.bits_per_dim.shape == (300,)
    np.testing.assert_allclose(scores.bits_per_dim, -scores.log_prob.astype(np.float64) / (2 * math.log(2)),
                               rtol=0, atol=1e-6)
    plain = live_stub.LogLikelihood(pb.LogLikelihoodRequest(model=SMALL_CHUNKS, x=encode(x)), timeout=30)
    assert len(plain.log_prob) == 300 and len(plain.bits_per_dim) == 0


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["Sample", "LogLikelihood"])
def test_live_context_for_an_unconditional_model_is_invalid_argument(live_stub, method):
    context = encode(np.ones((3, 2), np.float32))
    if method == "Sample":
        request = pb.SampleRequest(model=SMALL_CHUNKS, num_samples=3, context=context)
    else:
        request = pb.LogLikelihoodRequest(model=SMALL_CHUNKS, x=encode(np.zeros((3, 2))), context=context)
    with pytest.raises(grpc.RpcError) as info:
        getattr(live_stub, method)(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"context.shape is [3, 2] but model '{SMALL_CHUNKS}' takes no context" in info.value.details()


@pytest.mark.e2e
def test_live_list_models_reports_no_context_and_an_exact_likelihood(live_server):
    with FlowClient(live_server.target) as client:
        models = client.list_models()
    assert models and all(list(m.context_shape) == [] for m in models)
    assert all(m.log_likelihood_kind == pb.LOG_LIKELIHOOD_KIND_EXACT for m in models)


class RecordingTritonStub:
    """Stands in for Triton's gRPC stub: records the tensor names of each ModelInfer call
    and answers sevens as raw bytes."""

    def __init__(self, input_names: list[str]):
        self.input_names = input_names
        self.calls = []

    async def ModelConfig(self, request, timeout):
        from tritonclient.grpc import service_pb2 as triton_pb

        response = triton_pb.ModelConfigResponse()
        response.config.max_batch_size = 8
        for name in self.input_names:
            response.config.input.add(name=name)
        return response

    async def ModelInfer(self, request, timeout):
        from tritonclient.grpc import service_pb2 as triton_pb

        self.calls.append(([i.name for i in request.inputs], [o.name for o in request.outputs]))
        rows = request.inputs[0].shape[0]
        response = triton_pb.ModelInferResponse()
        for output in reversed(request.outputs):  # in another order than asked: found by name
            response.outputs.add(name=output.name)
            width = 2 if output.name in ("x", "OUTPUT__0") else 1
            response.raw_output_contents.append(np.full((rows, width), 7.0, np.float32).tobytes())
        return response


@pytest.mark.parametrize("config_names, wire_inputs, wire_outputs", [
    (["z", "context"], ["z", "context"], ["x", "log_prob"]),
    (["INPUT__0", "INPUT__1"], ["INPUT__0", "INPUT__1"], ["OUTPUT__0", "OUTPUT__1"]),
])
def test_triton_tensor_names_follow_the_models_config(config_names, wire_inputs, wire_outputs):
    """Triton's PyTorch backend names tensors by position; the gateway maps them back."""
    from flowserve.server.gateway.triton_backend import TritonBackend

    backend = TritonBackend.__new__(TritonBackend)
    backend._stub, backend._configs = RecordingTritonStub(config_names), {}
    spec = direction_spec(GENERATION, 2, noise_dim=3, context_dim=1)
    inputs = {"z": np.zeros((4, 3), np.float32), "context": np.zeros((4, 1), np.float32)}
    outputs = asyncio.run(backend.infer("m", spec, inputs, timeout=None))
    assert backend._stub.calls == [(wire_inputs, wire_outputs)]
    assert outputs["x"].shape == (4, 2) and outputs["log_prob"].shape == (4,)
    assert (outputs["x"] == 7).all() and (outputs["log_prob"] == 7).all()


def test_a_changed_catalog_makes_the_backend_refetch_model_configs(conditional_repository, service, backend):
    """A flow re-exported under the same name may have a new batch size or tensor names."""
    query = LogLikelihoodQuery(UNCONDITIONAL, np.zeros((2, *EVENT_SHAPE), np.float32))
    asyncio.run(service.log_likelihood(query))
    service.catalog.reload()  # nothing changed
    asyncio.run(service.log_likelihood(query))
    assert backend.forgotten == 0
    write_metadata(conditional_repository, UNCONDITIONAL, noise_dim=EVENT_DIM + 1)
    service.catalog.reload()
    asyncio.run(service.log_likelihood(query))
    asyncio.run(service.log_likelihood(query))
    assert backend.forgotten == 1


def test_pixel_values_outside_the_support_are_rejected(conditional_repository, service, backend):
    write_metadata(conditional_repository, UNCONDITIONAL, support=[0, 17])
    service.catalog.reload()
    x = np.full((3, *EVENT_SHAPE), 5.0, np.float32)
    x[2, 0, 1, 1] = -1.0
    with pytest.raises(InvalidArgument, match=r"x has values outside \[0, 17\].*in row 2"):
        asyncio.run(service.log_likelihood(LogLikelihoodQuery(UNCONDITIONAL, x)))
    x[2, 0, 1, 1] = 17.0
    asyncio.run(service.log_likelihood(LogLikelihoodQuery(UNCONDITIONAL, x)))


@pytest.mark.parametrize(("status", "message", "error", "text"), [
    ("DEADLINE_EXCEEDED", "Deadline Exceeded", DeadlineExceeded, "deadline exceeded while 'm'"),
    ("UNAVAILABLE", "failed to connect to all addresses", BackendUnavailable, "Triton cannot serve 'm'"),
    ("NOT_FOUND", "Request for unknown model: 'm' is not found", BackendUnavailable, "cannot serve"),
    ("CANCELLED", "Locally cancelled by application!", BackendUnavailable, "cannot serve"),
    # The status decides, whatever the message says:
    ("INVALID_ARGUMENT", "unknown model in the message", BackendError, "Triton failed on 'm'"),
    ("INTERNAL", "is not ready", BackendError, "Triton failed on 'm': is not ready"),
    # except a Python-backend model whose stub died: the gateway reloads it, so the client may retry
    ("INTERNAL", "Stub process 'm_0' is not healthy.", BackendUnavailable, "cannot serve 'm': Stub process"),
    # and the queue policy's rejections: back-pressure, not an outage
    ("UNAVAILABLE", "[request id: <id_unknown>] Exceeds maximum queue size", ResourceExhausted,
     "Triton's queue for 'm' is full: [request id: <id_unknown>] Exceeds maximum queue size; retry later"),
    ("UNAVAILABLE", "Request timeout expired", ResourceExhausted, "queue for 'm' is full: Request timeout expired"),
])
def test_triton_errors_are_mapped_by_status_code(status, message, error, text):
    from flowserve.server.gateway.triton_backend import translate_error

    translated = translate_error(getattr(grpc.StatusCode, status), message, "m")
    assert type(translated) is error and text in str(translated)

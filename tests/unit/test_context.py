"""Context, noise_dim, log-likelihood kind and bits/dim in the gateway's catalog and service,
on the in-memory backend, and Triton's answers as the Triton backend reads them."""

from __future__ import annotations

import asyncio
import json
import logging
import math

import grpc
import numpy as np
import pytest
from helpers.fakes import (
    CONDITIONAL,
    EVENT_DIM,
    EVENT_SHAPE,
    NOISE_DIM,
    UNCONDITIONAL,
    fake_density,
    fake_generation,
    flow_metadata,
    write_metadata,
)

from flowserve.contract.metadata import metadata_path
from flowserve.contract.spec import DENSITY, GENERATION, direction_spec, triton_model_name
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


def test_samples_per_context_are_the_samples_of_the_repeated_contexts_bit_for_bit(service):
    contexts = np.random.default_rng(2).normal(size=(3, 3)).astype(np.float32)
    query = SampleQuery(CONDITIONAL, 0, seed=9, temperature=0.7, return_log_prob=True, context=contexts,
                        samples_per_context=5)
    repeated = SampleQuery(CONDITIONAL, 15, seed=9, temperature=0.7, return_log_prob=True,
                           context=np.repeat(contexts, 5, axis=0))
    grouped, flat = asyncio.run(service.sample(query)), asyncio.run(service.sample(repeated))
    assert grouped.samples.shape == (3, 5, *EVENT_SHAPE) and grouped.seed == flat.seed == 9
    np.testing.assert_array_equal(grouped.samples.reshape(flat.samples.shape), flat.samples)
    np.testing.assert_array_equal(grouped.log_prob, flat.log_prob)

    async def stream(q):
        return [chunk async for chunk in service.sample_stream(q)]

    chunks = asyncio.run(stream(query))
    assert [chunk.first_row for chunk in chunks] == [0, 4, 8, 12]  # the stand-in's chunks of 4 rows
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), flat.samples)
    np.testing.assert_array_equal(np.concatenate([c.log_prob for c in chunks]), flat.log_prob)
    one = asyncio.run(service.sample(SampleQuery(CONDITIONAL, 5, seed=9, context=contexts[0], samples_per_context=5)))
    assert one.samples.shape == (1, 5, *EVENT_SHAPE)  # one context of [*context_shape]: B = 1


@pytest.mark.parametrize(("model", "context", "per", "num_samples", "message"), [
    (CONDITIONAL, np.zeros((2, 3)), 0, 0, "samples_per_context must be >= 1, got 0"),
    (CONDITIONAL, np.zeros((2, 3)), -4, 0, "samples_per_context must be >= 1, got -4"),
    (CONDITIONAL, np.zeros((2, 4)), 3, 0, r"context.shape is \[2, 4\]; with samples_per_context model 'digits-cond' "
                                          r"expects \[B, 3\]"),
    (CONDITIONAL, None, 3, 0, r"samples_per_context needs context of shape \[B, 3\]; context is unset"),
    (CONDITIONAL, np.zeros((2, 3)), 3, 7, "num_samples is 7 but 2 contexts x samples_per_context 3 = 6 rows"),
    (CONDITIONAL, np.zeros((4, 3)), 30_000, 0, "4 contexts x samples_per_context 30000 = 120000 rows, above this "
                                               "gateway's limit of 100000 rows per request: use SampleStream"),
    (UNCONDITIONAL, np.zeros((2, 3)), 3, 0, "model 'digits-plain' takes no context; use num_samples alone"),
])
def test_samples_per_context_errors_name_the_field(service, backend, model, context, per, num_samples, message):
    query = SampleQuery(model, num_samples, context=None if context is None else context.astype(np.float32),
                        samples_per_context=per)
    with pytest.raises(InvalidArgument, match=message):
        asyncio.run(service.sample(query))
    assert backend.calls == []


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

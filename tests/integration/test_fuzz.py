"""Generated requests against a live gateway (real gRPC server, interceptor, servicer and
service; the in-memory backend stands in for Triton so the exact answers are known).

Every answer must be OK or a specific status, never UNKNOWN or INTERNAL; messages stay
short; the gateway stays up; and a good request between the generated ones still gets its
exact result. ``FLOWSERVE_FUZZ_EXAMPLES`` sets how many requests (default 2,000).
"""

from __future__ import annotations

import asyncio
import os
import threading

import grpc
import numpy as np
import pytest
from helpers.fakes import CONDITIONAL, UNCONDITIONAL, InMemoryBackend, fake_answer, fake_generation, write_metadata
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowserve.contract.spec import ALL_DIRECTIONS, FLOW_MODELS, triton_model_name
from flowserve.server.client import FlowClient, sample_request
from flowserve.server.gateway.app import Gateway, GatewayConfig
from flowserve.server.gateway.service import GatewayLimits
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.triton.launcher import free_port

EXAMPLES = int(os.environ.get("FLOWSERVE_FUZZ_EXAMPLES", "2000"))
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
REQUEST_TYPES = {"Sample": pb.SampleRequest, "SampleStream": pb.SampleRequest,
                 "LogLikelihood": pb.LogLikelihoodRequest, "Encode": pb.EncodeRequest,
                 "ListModels": pb.ListModelsRequest}


@pytest.fixture(scope="module")
def gateway_target(tmp_path_factory):
    """A gateway on an in-memory backend, on its own event loop in a thread, for the module."""
    repository = tmp_path_factory.mktemp("fuzz-repo")
    write_metadata(repository, CONDITIONAL, context_shape=[3], noise_dim=6)
    # The unconditional flow can encode; the conditional one (a VAE here) cannot; the third
    # has its context embedding apart.
    write_metadata(repository, UNCONDITIONAL, models={d: triton_model_name(UNCONDITIONAL, d) for d in ALL_DIRECTIONS})
    write_metadata(repository, EMBEDDED, family="realnvp", context_shape=[3], noise_dim=4, embedded_dim=5,
                   models={d: triton_model_name(EMBEDDED, d) for d in FLOW_MODELS})
    config = GatewayConfig(repository, triton_url="in-memory", host="127.0.0.1", port=0, metrics_port=free_port(),
                           limits=GatewayLimits(1_000, 10_000, max_rows_per_stream=1_000))
    started, stop = threading.Event(), None
    target = {}

    async def serve():
        nonlocal stop
        stop = asyncio.Event()
        async with Gateway(config, InMemoryBackend(fake_answer, max_batch_size=4)) as gateway:
            target["address"] = f"127.0.0.1:{gateway.port}"
            started.set()
            await stop.wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30)
    yield target["address"], thread
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


def float_tensor(shape: list[int]) -> st.SearchStrategy[pb.Tensor]:
    """float32 tensors of ``shape`` (finite mostly, NaN and inf now and then)."""
    values = st.one_of(st.floats(-5, 5, width=32), st.floats(width=32))
    size = int(np.prod(shape))
    return st.lists(values, min_size=size, max_size=size).map(
        lambda v: pb.Tensor(shape=shape, data=np.asarray(v, np.float32).tobytes()))


def tensors(*fitting: list[int]) -> st.SearchStrategy[pb.Tensor]:
    """Tensors of any shape and bytes, well-formed float32 ones of a few shapes, and ones of the
    shapes ``fitting`` ([N, ...] with N from 1 to 6 where the first entry is -1)."""
    shapes = st.lists(st.one_of(st.integers(-3, 6), st.integers(-(2**62), 2**62)), max_size=20)
    anything = st.builds(lambda shape, data: pb.Tensor(shape=shape, data=data), shapes, st.binary(max_size=128))
    small = st.lists(st.integers(1, 4), min_size=1, max_size=4).flatmap(float_tensor)
    fits = [st.integers(1, 6).flatmap(lambda n, shape=shape: float_tensor([n if d == -1 else d for d in shape]))
            for shape in fitting]
    return st.one_of(anything, small, *fits)


EMBEDDED = "embedded"
MODELS = st.one_of(*[st.just(CONDITIONAL), st.just(UNCONDITIONAL), st.just(EMBEDDED)] * 2, st.just(""),
                   st.text(max_size=20),
                   st.text(min_size=200, max_size=5_000))
CONTEXTS = st.none() | tensors([3], [-1, 3])
NUM_SAMPLES = st.one_of(st.integers(-5, 40), st.sampled_from([0, 1_001, 10**9, 2**62]))


def _score(model, x, context, bits) -> pb.LogLikelihoodRequest:
    request = pb.LogLikelihoodRequest(model=model, x=x, return_bits_per_dim=bits)
    if context is not None:
        request.context.CopyFrom(context)
    return request


def _encode(model, x, context) -> pb.EncodeRequest:
    request = pb.EncodeRequest(model=model, x=x)
    if context is not None:
        request.context.CopyFrom(context)
    return request


SAMPLES_PER_CONTEXT = st.none() | st.integers(-3, 8) | st.sampled_from([10**6, 2**62])
samples = st.builds(sample_request, MODELS, NUM_SAMPLES, st.none() | st.integers(0, 2**64 - 1),
                    st.none() | st.floats(0.25, 2, width=32) | st.floats(width=32), st.booleans(), CONTEXTS,
                    SAMPLES_PER_CONTEXT)
scores = st.builds(_score, MODELS, tensors([-1, 1, 2, 2]), CONTEXTS, st.booleans())
encodes = st.builds(_encode, MODELS, tensors([-1, 1, 2, 2]), CONTEXTS)
calls = st.one_of(
    st.tuples(st.sampled_from(["Sample", "SampleStream"]), samples.map(pb.SampleRequest.SerializeToString)),
    st.tuples(st.just("LogLikelihood"), scores.map(pb.LogLikelihoodRequest.SerializeToString)),
    st.tuples(st.just("Encode"), encodes.map(pb.EncodeRequest.SerializeToString)),
    st.tuples(st.sampled_from(sorted(REQUEST_TYPES)), st.binary(max_size=64)),  # bytes that may not parse
)


def test_generated_requests_get_specific_statuses_and_leave_good_ones_exact(gateway_target):
    target, thread = gateway_target
    channel = grpc.insecure_channel(target)
    unary = {m: channel.unary_unary(f"/flowserve.v1.FlowService/{m}")
             for m in ("Sample", "LogLikelihood", "Encode", "ListModels")}
    stream = channel.unary_stream("/flowserve.v1.FlowService/SampleStream")
    client = FlowClient(target, timeout=30)
    expected = fake_generation(np.random.Generator(np.random.PCG64(7)).standard_normal((3, 4), dtype=np.float32),
                               np.zeros((3, 0), np.float32))[0]
    seen: dict[grpc.StatusCode, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(calls)
    def check(call):
        method, request = call
        try:
            if method == "SampleStream":
                list(stream(request, timeout=30))
            else:
                unary[method](request, timeout=30)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
        seen[code] = seen.get(code, 0) + 1
        assert code in ALLOWED, (method, request[:200], code, details[:300])
        assert len(details) < 1_000, details[:300]
        if sum(seen.values()) % 50 == 0:  # a good request among the generated ones: exact
            np.testing.assert_array_equal(client.sample(UNCONDITIONAL, 3, seed=7).x.reshape(3, 4), expected)

    try:
        check()
    finally:
        client.close()
        channel.close()
    print("statuses of the generated requests:", {code.name: n for code, n in seen.items()})
    assert thread.is_alive()
    assert sum(seen.values()) >= EXAMPLES and seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0
    assert seen.get(grpc.StatusCode.OK, 0) > 0 and seen.get(grpc.StatusCode.NOT_FOUND, 0) > 0
    assert seen.get(grpc.StatusCode.FAILED_PRECONDITION, 0) > 0

"""Context through the real servicer, gRPC on loopback and the client, in front of the
in-memory backend; and requests that do not parse or are too large get precise, bounded
errors."""

from __future__ import annotations

import asyncio
import logging
import math

import grpc
import numpy as np
import pytest
from helpers import fakes
from helpers.fakes import InMemoryBackend, fake_answer, serve_and_call

from flowserve import cli
from flowserve.contract.spec import ALL_DIRECTIONS, triton_model_name
from flowserve.server.client import FlowClient
from flowserve.server.gateway.app import Gateway, GatewayConfig
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.triton.launcher import free_port


def test_context_travels_through_grpc_servicer_and_client(conditional_repository, backend):
    """The real gateway (interceptor, servicer, service) and FlowClient in front of the in-memory backend."""
    context = np.array([0.5, 0.25, -1.0], np.float32)
    rows = np.random.default_rng(2).normal(size=(6, 3)).astype(np.float32)

    def calls(target: str) -> None:
        with FlowClient(target, timeout=30) as client:
            models = {m.name: m for m in client.list_models()}
            assert list(models[fakes.CONDITIONAL].context_shape) == [3]
            assert models[fakes.CONDITIONAL].log_likelihood_kind == pb.LOG_LIKELIHOOD_KIND_LOWER_BOUND
            assert list(models[fakes.UNCONDITIONAL].context_shape) == []
            assert models[fakes.UNCONDITIONAL].log_likelihood_kind == pb.LOG_LIKELIHOOD_KIND_EXACT

            samples = client.sample(fakes.CONDITIONAL, 6, seed=11, context=context)
            noise = np.random.Generator(np.random.PCG64(11)).standard_normal((6, fakes.NOISE_DIM), dtype=np.float32)
            x, log_prob = fakes.fake_generation(noise, np.tile(context, (6, 1)))
            assert samples.x.shape == (6, *fakes.EVENT_SHAPE)
            np.testing.assert_allclose(samples.x.reshape(6, fakes.EVENT_DIM), x, rtol=1e-6)
            np.testing.assert_allclose(samples.log_prob, log_prob, rtol=1e-6)

            chunks = list(client.sample_stream(fakes.CONDITIONAL, 6, seed=11, context=context))
            assert [len(chunk.x) for chunk in chunks] == [fakes.CHUNK, 2]
            np.testing.assert_array_equal(np.concatenate([chunk.x for chunk in chunks]), samples.x)
            np.testing.assert_array_equal(np.concatenate([chunk.log_prob for chunk in chunks]), samples.log_prob)

            scores = client.score(fakes.CONDITIONAL, samples.x, context=rows, return_bits_per_dim=True)
            log_prob = fakes.fake_density(samples.x.reshape(6, fakes.EVENT_DIM), rows)
            np.testing.assert_allclose(scores.log_prob, log_prob, rtol=1e-6)
            np.testing.assert_allclose(scores.bits_per_dim, -log_prob / (fakes.EVENT_DIM * math.log(2)), rtol=1e-6)
            np.testing.assert_allclose(client.log_likelihood(fakes.CONDITIONAL, samples.x, context=rows), log_prob,
                                       rtol=1e-6)

            with pytest.raises(grpc.RpcError) as info:
                client.sample(fakes.CONDITIONAL, 6, seed=11)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "needs context of shape [3]" in info.value.details()
            empty = pb.SampleRequest(model=fakes.CONDITIONAL, num_samples=2, context=pb.Tensor())
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
    stream = {"method": "SampleStream", "model": fakes.CONDITIONAL, "protocol": "grpc"}
    assert registry.get_sample_value("flowserve_requests_total", {**stream, "code": "OK"}) == 1
    assert registry.get_sample_value("flowserve_request_rows_sum", stream) == 6


def test_messages_that_do_not_parse_and_oversized_input_get_precise_bounded_errors(
        conditional_repository, backend, caplog):
    """Bytes that are no protobuf message, a model name that is not UTF-8, a 100 KB model name
    and a tensor of 100 dimensions: each gets its own status and a short message, is counted,
    logs no traceback, and the gateway serves the next good request."""
    long_name = "m" * 100_000
    many_dims = pb.LogLikelihoodRequest(model=fakes.UNCONDITIONAL, x=pb.Tensor(shape=[1] * 100, data=b"\0\0\0\0"))

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
            assert client.sample(fakes.UNCONDITIONAL, 3, seed=1).x.shape == (3, *fakes.EVENT_SHAPE)
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
    invalid = {"method": "Sample", "model": "unknown", "code": "INVALID_ARGUMENT", "protocol": "grpc"}
    assert registry.get_sample_value("flowserve_requests_total", invalid) == 2
    assert "Traceback" not in caplog.text


def test_samples_per_context_through_grpc_the_client_and_the_cli(conditional_repository, tmp_path, capsys):
    """B x N through the real gateway: the client's [B, N] answer equals the repeated-context
    call, a stream's chunks say each row's context, and ``flowserve sample --per-context``
    writes [B, N, *event_shape]."""
    contexts = np.random.default_rng(4).normal(size=(3, 3)).astype(np.float32)
    np.save(tmp_path / "contexts.npy", contexts)

    def calls(target: str) -> tuple:
        with FlowClient(target, timeout=30) as client:
            grouped = client.sample(fakes.CONDITIONAL, seed=5, context=contexts, samples_per_context=4)
            flat = client.sample(fakes.CONDITIONAL, 12, seed=5, context=np.repeat(contexts, 4, axis=0))
            chunks = list(client.sample_stream(fakes.CONDITIONAL, seed=5, context=contexts, samples_per_context=4))
            with pytest.raises(grpc.RpcError) as refused:
                client.sample(fakes.CONDITIONAL, seed=5, context=contexts, samples_per_context=0)
        base = ["--target", target, "--model", fakes.CONDITIONAL, "--seed", "5", "--context-file",
                str(tmp_path / "contexts.npy"), "--per-context", "4"]
        codes = [cli.main(["sample", *base, "-o", str(tmp_path / "grouped.npy")]),
                 cli.main(["sample", *base, "--stream", "-o", str(tmp_path / "streamed.npy")])]
        return grouped, flat, chunks, refused.value, codes

    (grouped, flat, chunks, refused, codes), _ = serve_and_call(
        GatewayConfig(conditional_repository, triton_url="in-memory", host="127.0.0.1", port=0,
                      metrics_port=free_port()), calls,
        InMemoryBackend(fake_answer, max_batch_size=fakes.CHUNK))
    assert grouped.x.shape == (3, 4, *fakes.EVENT_SHAPE) and grouped.log_prob.shape == (3, 4)
    np.testing.assert_array_equal(grouped.x.reshape(flat.x.shape), flat.x)
    np.testing.assert_array_equal(grouped.log_prob.reshape(-1), flat.log_prob)
    assert [chunk.first_row for chunk in chunks] == [0, 4, 8]
    assert [chunk.context_index.tolist() for chunk in chunks] == [[0] * 4, [1] * 4, [2] * 4]
    np.testing.assert_array_equal(np.concatenate([chunk.x for chunk in chunks]), flat.x)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details() == "samples_per_context must be >= 1, got 0"
    assert codes == [0, 0]
    assert "12 samples (3 contexts x 4)" in capsys.readouterr().out
    for name in ("grouped.npy", "streamed.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / name), grouped.x)


def test_encode_travels_through_grpc_and_a_flow_that_cannot_encode_gets_failed_precondition(tmp_path):
    fakes.write_metadata(tmp_path, fakes.UNCONDITIONAL, family="realnvp", noise_dim=fakes.EVENT_DIM,
                         models={d: triton_model_name(fakes.UNCONDITIONAL, d) for d in ALL_DIRECTIONS})
    fakes.write_metadata(tmp_path, fakes.CONDITIONAL, context_shape=[3], noise_dim=fakes.NOISE_DIM,
                         log_likelihood="lower_bound")
    x = np.random.default_rng(3).normal(size=(6, *fakes.EVENT_SHAPE)).astype(np.float32)

    def calls(target: str):
        with FlowClient(target, timeout=30) as client:
            directions = {m.name: list(m.directions) for m in client.list_models()}
            encoded = client.encode(fakes.UNCONDITIONAL, x)
            with pytest.raises(grpc.RpcError) as refused:
                client.encode(fakes.CONDITIONAL, x, context=np.zeros(3, np.float32))
        return directions, encoded, refused.value

    config = GatewayConfig(tmp_path, triton_url="in-memory", host="127.0.0.1", port=0, metrics_port=free_port())
    (directions, encoded, refused), registry = serve_and_call(config, calls)
    assert directions == {fakes.UNCONDITIONAL: [pb.DIRECTION_DENSITY, pb.DIRECTION_GENERATION, pb.DIRECTION_ENCODE],
                          fakes.CONDITIONAL: [pb.DIRECTION_DENSITY, pb.DIRECTION_GENERATION]}
    expected = fakes.fake_encode(x.reshape(6, -1), np.zeros((6, 0), np.float32), fakes.EVENT_DIM)
    for name in ("z", "log_det", "log_prob"):
        np.testing.assert_array_equal(getattr(encoded, name), expected[name])
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.details() == (f"model {fakes.CONDITIONAL!r} cannot encode: its log-likelihood is a lower bound "
                                 "(vae): it has no exact data -> noise map")
    count = registry.get_sample_value
    assert count("flowserve_requests_total", {"method": "Encode", "model": fakes.UNCONDITIONAL, "code": "OK", "protocol": "grpc"}) == 1
    assert count("flowserve_requests_total", {"method": "Encode", "model": fakes.CONDITIONAL,
                                              "code": "FAILED_PRECONDITION", "protocol": "grpc"}) == 1
    assert count("flowserve_request_rows_sum", {"method": "Encode", "model": fakes.UNCONDITIONAL, "protocol": "grpc"}) == 6

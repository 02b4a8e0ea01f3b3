"""The gateway's limit on RPCs at once, over gRPC on loopback: RPCs beyond it are refused
with RESOURCE_EXHAUSTED and counted."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from helpers.clock import wait_until
from helpers.fakes import InMemoryBackend

from flowserve.contract.metadata import FlowMetadata
from flowserve.contract.spec import DIRECTIONS, triton_model_name
from flowserve.server.client import sample_request
from flowserve.server.gateway.app import Gateway, GatewayConfig
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc
from flowserve.server.triton.launcher import free_port


def test_rpcs_beyond_the_gateways_limit_are_refused_and_counted(tmp_path):
    models = {d: triton_model_name("flow", d) for d in DIRECTIONS}
    FlowMetadata(name="flow", family="maf", event_shape=(2,), models=models).write(tmp_path)
    backend = InMemoryBackend(lambda spec, inputs: {"x": inputs["z"], "log_prob": inputs["z"].sum(axis=1)})
    backend.gate = asyncio.Event()
    request = sample_request("flow", 2, 0, None, False, None)

    async def scenario():
        config = GatewayConfig(tmp_path, triton_url="in-memory", host="127.0.0.1", port=0, metrics_port=free_port(),
                               max_concurrent_rpcs=1)
        async with Gateway(config, backend) as gateway, \
                grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = pb_grpc.FlowServiceStub(channel)
            held = asyncio.ensure_future(stub.Sample(request, timeout=10))
            await wait_until(lambda: backend.running, timeout_s=30)  # the first call holds the only slot
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Sample(request, timeout=10)
            backend.gate.set()
            await held
            await stub.Sample(request, timeout=10)  # the slot is free again
            return refused.value, gateway.metrics.requests

    refused, requests = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "running 1 calls, its limit (--max-concurrent-rpcs)" in refused.details()
    assert requests.labels("Sample", "flow", "RESOURCE_EXHAUSTED", "grpc")._value.get() == 1
    assert requests.labels("Sample", "flow", "OK", "grpc")._value.get() == 2

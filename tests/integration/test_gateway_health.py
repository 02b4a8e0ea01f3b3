"""What the gateway reports of each flow's health: gRPC health per flow, ListModels' ready,
and metrics, on loopback in front of the in-memory backend."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.fakes import FLOWS, InMemoryBackend, write_flows, zeros

from flowserve import cli
from flowserve.contract.spec import DIRECTIONS, GENERATION, triton_model_name
from flowserve.server.gateway.app import Gateway, GatewayConfig
from flowserve.server.protocol.names import flow_health_service
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc
from flowserve.server.triton.launcher import free_port


def test_the_gateway_reports_each_flow_in_grpc_health_list_models_and_metrics(tmp_path):
    write_flows(tmp_path)
    backend = InMemoryBackend(zeros, versions={triton_model_name(f, d): ["1"] for f in FLOWS for d in DIRECTIONS})
    broken = triton_model_name("left", GENERATION)

    def client_view(target: str) -> tuple[dict[str, int], dict[str, bool]]:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            statuses = {service: health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                        for service in ("", *map(flow_health_service, FLOWS))}
            models = pb_grpc.FlowServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5).models
        return statuses, {model.name: model.ready for model in models}

    async def scenario():
        config = GatewayConfig(tmp_path, triton_url="in-memory", host="127.0.0.1", port=0, metrics_port=free_port(),
                               health_interval_s=3600)  # checked by hand below
        async with Gateway(config, backend) as gateway:
            target = f"127.0.0.1:{gateway.port}"
            before = await asyncio.to_thread(client_view, target)
            backend.broken.add(broken)
            await gateway._update_health()
            during = await asyncio.to_thread(client_view, target)
            during_cli = [await asyncio.to_thread(cli.main, ["health", "--target", target, *flow])
                          for flow in ((), ("--model", "left"), ("--model", "right"))]
            await asyncio.gather(*gateway.flow_health._reloads.values())
            await gateway._update_health()
            after = await asyncio.to_thread(client_view, target)
            return before, during, during_cli, after, gateway.metrics

    before, during, during_cli, after, metrics = asyncio.run(scenario())
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    left, right = map(flow_health_service, FLOWS)
    assert before == after == ({"": serving, left: serving, right: serving}, {"left": True, "right": True})
    # One broken flow: the server (Triton) is still up and the other flow serves.
    assert during == ({"": serving, left: not_serving, right: serving}, {"left": False, "right": True})
    assert during_cli == [0, 1, 0]  # flowserve health [--model FLOW]: exit code 0 when SERVING
    assert metrics.model_reloads.labels("left", GENERATION)._value.get() == 1

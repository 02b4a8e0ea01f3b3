"""Per-flow health on an in-memory backend: probes, reloads of broken models, and what the
gateway reports (gRPC health per flow, ListModels' ready, metrics).

The same runs live in tests/test_e2e.py
(``test_a_flow_whose_stub_is_killed_is_not_serving_then_serves_again_after_its_reload``),
where a stub process of a real Triton is killed.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
from conftest import InMemoryBackend
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowserve import cli
from flowserve.contract.metadata import FlowMetadata
from flowserve.contract.spec import DIRECTIONS, GENERATION, triton_model_name
from flowserve.server.gateway.app import Gateway, GatewayConfig
from flowserve.server.gateway.catalog import ModelCatalog
from flowserve.server.gateway.health import FlowHealth
from flowserve.server.gateway.metrics import GatewayMetrics
from flowserve.server.protocol.errors import DeadlineExceeded
from flowserve.server.protocol.names import flow_health_service
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc
from flowserve.server.triton.launcher import free_port

FLOWS = ("left", "right")


def write_flows(repository) -> None:
    for flow in FLOWS:
        models = {d: triton_model_name(flow, d) for d in DIRECTIONS}
        FlowMetadata(name=flow, family="maf", event_shape=(2,), models=models).write(repository)


def zeros(spec, inputs):
    rows = next(iter(inputs.values())).shape[0]
    return {t.name: np.zeros((rows, *t.dims), t.dtype) for t in spec.outputs}


def health_of(tmp_path, **options) -> tuple[FlowHealth, InMemoryBackend, GatewayMetrics]:
    write_flows(tmp_path)
    backend, metrics = InMemoryBackend(zeros), GatewayMetrics()
    return FlowHealth(backend, ModelCatalog(tmp_path), metrics, **options), backend, metrics


def test_a_flow_whose_model_stops_answering_is_not_ready_until_its_model_is_reloaded(tmp_path):
    health, backend, metrics = health_of(tmp_path)
    broken = triton_model_name("right", GENERATION)

    async def scenario():
        assert await health.check(server_ready=True) == {"left": True, "right": True}
        backend.broken.add(broken)  # ready by Triton's word, but its calls fail: a dead stub
        assert await health.check(server_ready=True) == {"left": True, "right": False}
        await asyncio.gather(*health._reloads.values())
        assert backend.loads == [f"-{broken}", broken]  # unloaded, then loaded
        assert await health.check(server_ready=True) == {"left": True, "right": True}

    asyncio.run(scenario())
    assert metrics.model_reloads.labels("right", GENERATION)._value.get() == 1
    assert metrics.flow_ready.labels("right")._value.get() == 1.0
    assert health.is_ready("right") and not health.is_ready("unknown")


def test_a_model_triton_reports_unready_is_reloaded_too(tmp_path):
    health, backend, metrics = health_of(tmp_path)
    unready = triton_model_name("left", GENERATION)
    backend.unready.add(unready)

    async def scenario():
        assert await health.check(server_ready=True) == {"left": False, "right": True}
        assert metrics.flow_ready.labels("left")._value.get() == 0.0
        await asyncio.gather(*health._reloads.values())
        assert await health.check(server_ready=True) == {"left": True, "right": True}

    asyncio.run(scenario())
    assert backend.loads == [f"-{unready}", unready]
    assert backend.probes.count(unready) == 1  # probed only once ready again


def test_reloads_wait_the_minimum_interval_and_a_busy_probe_keeps_the_last_state(tmp_path):
    health, backend, _ = health_of(tmp_path, min_reload_interval_s=3600)
    broken = triton_model_name("left", GENERATION)

    async def scenario():
        backend.broken.add(broken)
        await health.check(server_ready=True)
        await asyncio.gather(*health._reloads.values())
        backend.broken.add(broken)  # broken again at once: no second reload within the interval
        assert (await health.check(server_ready=True))["left"] is False
        assert not health._reloads

        async def too_busy(model, spec, timeout):
            raise DeadlineExceeded("busy")

        backend.probe = too_busy
        assert await health.check(server_ready=True) == {"left": False, "right": True}  # as before

    asyncio.run(scenario())
    assert backend.loads == [f"-{broken}", broken]


def test_without_a_ready_server_no_flow_is_ready_and_nothing_is_probed_or_reloaded(tmp_path):
    health, backend, _ = health_of(tmp_path)
    assert asyncio.run(health.check(server_ready=False)) == {"left": False, "right": False}
    assert backend.probes == [] and backend.loads == []


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


def test_flows_with_new_files_get_their_models_loaded_and_stay_ready_meanwhile(tmp_path):
    health, backend, _ = health_of(tmp_path, load_changes=True)
    catalog = health.catalog

    async def scenario():
        assert await health.check(server_ready=True) == {"left": True, "right": True}
        assert backend.loads == []  # Triton loaded the flows it started with
        rewritten = dataclasses.replace(catalog.get("left"), exported_at="2026-12-04T00:00:00+00:00")
        rewritten.write(tmp_path)  # an export of a new version writes the metadata file last
        new_models = {d: triton_model_name("new", d) for d in DIRECTIONS}
        FlowMetadata(name="new", family="maf", event_shape=(2,), models=new_models).write(tmp_path)
        forgotten = backend.forgotten
        ready = await health.check(server_ready=True)
        assert ready["left"] and ready["right"]  # the old version serves while the new one loads
        await asyncio.gather(*health._loads.values())
        assert sorted(backend.loads) == sorted([*catalog.get("left").models.values(), *new_models.values()])
        assert backend.forgotten > forgotten  # the new configs are fetched again
        assert await health.check(server_ready=True) == {"left": True, "new": True, "right": True}
        await health.check(server_ready=True)
        assert len(backend.loads) == 4  # loaded once

    asyncio.run(scenario())

"""Per-flow health on an in-memory backend: probes, reloads of broken models, and loads of
flows whose files an export rewrote.

What the gateway reports over gRPC is in tests/integration/test_gateway_health.py; the same
runs live in tests/e2e/test_live_gateway.py, where a stub process of a real Triton is killed."""

from __future__ import annotations

import asyncio
import dataclasses

from helpers.clock import run_on_virtual_clock
from helpers.fakes import health_of

from flowserve.contract.metadata import FlowMetadata
from flowserve.contract.spec import DIRECTIONS, GENERATION, triton_model_name
from flowserve.server.protocol.errors import BackendError, DeadlineExceeded


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


def test_a_model_that_will_not_load_is_retried_ever_more_rarely_until_it_answers(tmp_path):
    health, backend, _ = health_of(tmp_path, min_reload_interval_s=5.0, max_reload_interval_s=60.0)
    broken = triton_model_name("left", GENERATION)
    attempts, loadable = [], False
    load = backend.load_model

    async def load_when_loadable(model):
        attempts.append(round(asyncio.get_running_loop().time() - start))
        if not loadable:
            raise BackendError(f"load failed for {model!r}: RuntimeError: flowserve_runner: ...\n\nAt:\n  model.py")
        await load(model)

    async def scenario():
        nonlocal loadable, start
        start = asyncio.get_running_loop().time()
        backend.broken.add(broken)
        for second in range(270):  # one check a second, as the gateway does
            loadable = loadable or second == 200  # its files fixed, say
            if second == 262:
                backend.broken.add(broken)  # it answered at 256: broken anew
            await health.check(server_ready=True)
            await asyncio.sleep(1.0)

    start = 0.0
    backend.load_model = load_when_loadable
    run_on_virtual_clock(scenario())
    # Waits of 5, 10, 20, 40, then 60 s while it cannot load; it loads at 255, answers, and
    # breaks at 262: the wait starts from 5 s again, so it is reloaded at once.
    assert attempts == [0, 5, 15, 35, 75, 135, 195, 255, 262]
    assert health.is_ready("left")


def test_a_watching_gateway_worker_reports_broken_and_new_flows_but_leaves_loading_to_worker_0(tmp_path):
    health, backend, metrics = health_of(tmp_path, manage_models=False, load_changes=True)
    broken = triton_model_name("left", GENERATION)

    async def scenario():
        backend.broken.add(broken)
        assert await health.check(server_ready=True) == {"left": False, "right": True}
        FlowMetadata(name="new", family="maf", event_shape=(2,),
                     models={d: triton_model_name("new", d) for d in DIRECTIONS}).write(tmp_path)
        assert set(await health.check(server_ready=True)) == {"left", "new", "right"}  # it reads the new catalog
        assert not health._reloads and not health._loads

    asyncio.run(scenario())
    assert backend.loads == []
    assert metrics.model_reloads.labels("left", GENERATION)._value.get() == 0

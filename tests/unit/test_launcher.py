"""The Triton launcher without starting Triton: environment, backend directory, clear
errors, and the supervisor's restarts and backoffs on an injected clock."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import types
from pathlib import Path

import pytest
from helpers.clock import run_on_virtual_clock, wait_until

from flowserve.contract.spec import RUNNER_BACKEND
from flowserve.server.triton.launcher import (
    TritonGaveUp,
    TritonInstallation,
    TritonLaunchError,
    TritonServer,
    TritonSupervisor,
)


def test_environment_puts_wheel_libraries_and_this_python_first():
    env = TritonInstallation.find().environment()
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0].endswith("nvidia_pytriton.libs")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_backend_directory_has_python_backend_and_one_runner(tmp_path):
    backends = TritonInstallation.find().build_backend_directory(tmp_path / "backends")
    python = backends / "python"
    assert {p.name for p in python.iterdir()} == {
        "libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"}
    assert os.access(python / "triton_python_backend_stub", os.X_OK)
    runner = (backends / RUNNER_BACKEND / "model.py").read_text()
    assert "class TritonPythonModel" in runner


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(TritonLaunchError, match="does not exist"):
        TritonServer(tmp_path / "nope", tmp_path / "work", grpc_port=8001, metrics_port=8002).start()


def triton_with_models(tmp_path, *names: str) -> TritonServer:
    for name in names:
        (tmp_path / "repo" / name).mkdir(parents=True)
        (tmp_path / "repo" / name / "config.pbtxt").write_text(f'name: "{name}"\n')
    (tmp_path / "work").mkdir()
    return TritonServer(tmp_path / "repo", tmp_path / "work", grpc_port=8001, metrics_port=8002)


def test_failed_models_are_named_with_the_first_line_of_tritons_reason_or_its_log(tmp_path):
    triton = triton_with_models(tmp_path, "ready", "refused", "unindexed", "silent")
    triton.log_path.write_text(
        'E1206 20:47:59.778095 10770 model_repository_manager.cc:724] "failed to load model \'unindexed\': at '
        'least one version must be available under the version policy of model \'unindexed\'"\n')
    triton._note_failed_models([
        {"name": "ready", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"},  # an old version
        {"name": "ready", "version": "2", "state": "READY"},
        {"name": "refused", "version": "1", "state": "UNAVAILABLE",
         "reason": "Internal: RuntimeError: flowserve_runner: a GPU instance, but ...\n\nAt:\n  model.py(130)"},
    ])
    assert triton.failed_models == {
        "refused": "Internal: RuntimeError: flowserve_runner: a GPU instance, but ...",
        "silent": "not loaded; see Triton's log",
        "unindexed": "at least one version must be available under the version policy of model 'unindexed'",
    }


def test_a_triton_that_loaded_none_of_its_models_is_a_launch_error_naming_each(tmp_path):
    triton = triton_with_models(tmp_path, "first", "second")
    index = [{"name": name, "version": "1", "state": "UNAVAILABLE", "reason": f"{name} is broken"}
             for name in ("first", "second")]
    with pytest.raises(TritonLaunchError, match="(?s)none of the 2 model.*  first: first is broken\n  second: second"):
        triton._note_failed_models(index)


def test_serve_without_a_repository_is_a_clear_cli_error(tmp_path, capsys):
    from flowserve import cli

    assert cli.main(["serve", "--model-repository", str(tmp_path / "nope"), "--triton-url", "127.0.0.1:1"]) == 1
    assert "does not exist" in capsys.readouterr().err


class DyingTriton:
    """Stands in for TritonServer: dies whenever the test says so, comes back on restart, and
    records the loop time at which the supervisor first saw it dead after each death."""

    def __init__(self):
        self.running, self.restarts = True, 0
        self.process = types.SimpleNamespace(returncode=-9)
        self.grpc_url, self.log_path = "127.0.0.1:1", Path("tritonserver.log")
        self.seen_dead: list[float] = []
        self.failed_models: dict[str, str] = {}

    def is_running(self) -> bool:
        if not self.running and len(self.seen_dead) == self.restarts:
            self.seen_dead.append(asyncio.get_running_loop().time())
        return self.running

    def restart(self, ready_timeout: float):
        self.restarts += 1
        self.running = True

    def log_tail(self) -> str:
        return "E1204 the last words"


def test_the_supervisor_restarts_a_dead_triton_with_a_growing_backoff_then_gives_up():
    triton = DyingTriton()
    supervisor = TritonSupervisor(triton, max_restarts=2, first_backoff_s=0.05, max_backoff_s=0.1, poll_s=0.01)
    begun = []

    async def scenario():
        loop = asyncio.get_running_loop()
        watch = asyncio.ensure_future(supervisor.watch(lambda: begun.append(loop.time())))
        for _ in range(3):
            await asyncio.sleep(0.05)
            triton.running = False
            await wait_until(lambda: triton.running or watch.done(), timeout_s=5)
        with pytest.raises(TritonGaveUp, match=r"(?s)code -9 after 2 restart\(s\); giving up.*the last words"):
            await asyncio.wait_for(watch, 5)

    run_on_virtual_clock(scenario())
    assert triton.restarts == 2 and len(begun) == 2
    # 0.05 s after the supervisor saw it dead, then doubled (and capped at 0.1 s).
    waits = [restart - seen for restart, seen in zip(begun, triton.seen_dead)]
    assert waits == pytest.approx([0.05, 0.1], abs=1e-9)
    assert len(triton.seen_dead) == 3  # the third death: no restart left


def test_the_backoff_stays_at_its_cap_and_starts_again_after_a_stable_spell():
    triton = DyingTriton()
    supervisor = TritonSupervisor(triton, max_restarts=9, first_backoff_s=0.05, max_backoff_s=0.1, stable_s=1.0,
                                  poll_s=0.01)
    begun = []

    async def scenario():
        loop = asyncio.get_running_loop()
        watch = asyncio.ensure_future(supervisor.watch(lambda: begun.append(loop.time())))
        for pause in (0.05, 0.05, 0.05, 2.0):  # up 2 s before the fourth death: a stable spell
            await asyncio.sleep(pause)
            triton.running = False
            await wait_until(lambda: triton.running, timeout_s=5)
        watch.cancel()

    run_on_virtual_clock(scenario())
    waits = [restart - seen for restart, seen in zip(begun, triton.seen_dead)]
    assert waits == pytest.approx([0.05, 0.1, 0.1, 0.05], abs=1e-9)


def test_the_supervisor_names_the_models_that_fail_to_load_after_a_restart(caplog):
    triton = DyingTriton()
    supervisor = TritonSupervisor(triton, first_backoff_s=0.05, poll_s=0.01)

    async def scenario():
        watch = asyncio.ensure_future(supervisor.watch())
        await asyncio.sleep(0.05)
        triton.failed_models = {"moons-density": "Internal: RuntimeError: flowserve_runner: a GPU instance, but ..."}
        triton.running = False
        await wait_until(lambda: triton.running, timeout_s=5)
        await asyncio.sleep(0.05)
        watch.cancel()

    with caplog.at_level(logging.ERROR, logger="flowserve.server.triton.launcher"):
        run_on_virtual_clock(scenario())
    assert [r.getMessage() for r in caplog.records if "failed to load" in r.getMessage()] == [
        "model 'moons-density' failed to load and is not served: Internal: RuntimeError: flowserve_runner: "
        "a GPU instance, but ..."]

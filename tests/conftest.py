"""Shared fixtures: a briefly trained RealNVP, a model repository, a live server, and an
in-memory stand-in for Triton.

The live server is the real thing: ``flowserve serve`` in a subprocess, which starts the
``tritonserver`` from the nvidia-pytriton wheel and the asyncio gateway on free ports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowserve import cli
from flowserve.contract.spec import DirectionSpec
from flowserve.export.data import train_test_split, two_moons
from flowserve.export.exporter.pipeline import export_flow
from flowserve.export.exporter.triton_config import ServingConfig
from flowserve.export.flows.transforms import fixed_point_inverses
from flowserve.export.training import load_checkpoint
from flowserve.server.gateway.backend import QueuePolicy
from flowserve.server.protocol.errors import BackendUnavailable
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc
from flowserve.server.triton.launcher import free_port

# Two flows with the same weights whose Triton models batch differently, so the gateway
# splits the same request into chunks of different sizes.
SMALL_CHUNKS = "moons-small-chunks"
LARGE_CHUNKS = "moons-large-chunks"
SMALL_BATCH = 64
MAX_ROWS_PER_REQUEST = 80_000  # not the default (100,000), so the flag is tested
SETTINGS_PREFIX = "FLOWSERVE_"  # flowserve's own environment variables (Triton URL, tokens, target)


def hermetic_env(**settings: str) -> dict[str, str]:
    """The environment for a process a test starts: this one's, without any ``FLOWSERVE_*``
    variable, plus ``settings``. A developer's ``FLOWSERVE_TRITON_URL`` or tokens must not
    change what a test sees."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(SETTINGS_PREFIX)}
    return {**env, **settings}


@pytest.fixture(scope="session", autouse=True)
def no_flowserve_settings_from_the_environment():
    """The same for code the tests run in this process (the CLI reads its defaults from the
    environment); a test sets what it needs with ``monkeypatch.setenv``."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith(SETTINGS_PREFIX)]:
            patch.delenv(name)
        yield


@pytest.fixture(scope="session")
def moons() -> dict[str, np.ndarray]:
    """The train/test split that ``flowserve train --num-points 2000 --seed 0`` uses."""
    train, test = train_test_split(two_moons(2000, seed=0), seed=0)
    return {"train": train, "test": test}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A briefly trained RealNVP, made by the real ``flowserve train`` command."""
    path = tmp_path_factory.mktemp("ckpt") / "realnvp-moons.pt"
    code = cli.main(["train", "--num-points", "2000", "--seed", "0", "--steps", "300", "-o", str(path)])
    assert code == 0
    return path


@pytest.fixture(scope="session")
def trained_flow(checkpoint):
    return load_checkpoint(checkpoint)[0]


@pytest.fixture(scope="session")
def repository(tmp_path_factory, checkpoint) -> Path:
    repo = tmp_path_factory.mktemp("model_repository")
    export_flow(checkpoint, repo, name=SMALL_CHUNKS, progress=False,
                serving=ServingConfig(max_batch_size=SMALL_BATCH, max_queue_delay_us=2000))
    export_flow(checkpoint, repo, name=LARGE_CHUNKS, progress=False,
                serving=ServingConfig(max_batch_size=1024, max_queue_delay_us=500, instance_count=2))
    return repo


@dataclass
class LiveServer:
    """A running ``flowserve serve``: gateway and embedded Triton endpoints."""

    process: subprocess.Popen
    target: str
    metrics_url: str
    triton_grpc_url: str
    triton_metrics_url: str
    workdir: Path

    def scrape(self, url: str | None = None) -> str:
        with urllib.request.urlopen(url or self.metrics_url, timeout=10) as response:
            return response.read().decode()


def wait_for_health(target: str, process: subprocess.Popen, want, timeout: float = 180.0) -> None:
    """Wait until the gateway's health service reports ``want``."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"flowserve serve exited with {process.returncode}; see serve.log in its workdir")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == want:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"gateway at {target} did not report {want} within {timeout} s")


def start_serve(repository: Path, workdir: Path, *extra: str, env: dict[str, str] | None = None,
                python: Path = Path(sys.executable)) -> tuple[subprocess.Popen, int, int]:
    """Start ``flowserve serve`` with ``python`` on free ports, in :func:`hermetic_env` with
    ``env`` added; returns the process, gateway and metrics ports.

    Its output goes to ``workdir/serve.log`` (a pipe nobody drains would block it).
    """
    port, metrics_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        str(python), "-m", "flowserve.cli", "serve", "--model-repository", str(repository),
        "--port", str(port), "--metrics-port", str(metrics_port), "--workdir", str(workdir), *extra,
    ]
    with open(workdir / "serve.log", "w") as log:
        # Run in ``workdir``: ``python -m`` puts the working directory first on sys.path, and
        # the checkout's flowserve/ folder must not shadow the installed package.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=hermetic_env(**(env or {})),
                                   cwd=workdir)
    return process, port, metrics_port


def stop_serve(process: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM ``flowserve serve`` and wait for it; returns its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, repository) -> LiveServer:
    workdir = tmp_path_factory.mktemp("triton")
    triton_grpc, triton_metrics = free_port(), free_port()
    process, port, metrics_port = start_serve(
        repository, workdir,
        "--triton-grpc-port", str(triton_grpc), "--triton-metrics-port", str(triton_metrics),
        "--max-rows-per-request", str(MAX_ROWS_PER_REQUEST),
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_for_health(target, process, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        stop_serve(process)
        raise
    yield LiveServer(
        process=process,
        target=target,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        triton_grpc_url=f"127.0.0.1:{triton_grpc}",
        triton_metrics_url=f"http://127.0.0.1:{triton_metrics}/metrics",
        workdir=workdir,
    )
    stop_serve(process)


@pytest.fixture(scope="session")
def live_stub(live_server) -> pb_grpc.FlowServiceStub:
    """A FlowService stub on the live gateway."""
    with grpc.insecure_channel(live_server.target) as channel:
        yield pb_grpc.FlowServiceStub(channel)


def expected_samples(flow, seed: int, n: int, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """What the gateway must return for Sample: the flow applied to PCG64(seed) noise."""
    noise = np.random.Generator(np.random.PCG64(seed)).standard_normal((n, flow.noise_dim), dtype=np.float32)
    with torch.no_grad():
        x, log_prob = flow.sample_with_log_prob(torch.from_numpy(noise * np.float32(temperature)))
    return x.numpy(), log_prob.numpy()


def add_weight_noise(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Add ``scale`` times standard normal noise (from torch's global generator) to every
    parameter, so layers that start at zero or at the identity compute something."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))


def set_early_exit(model: torch.nn.Module, early_exit: bool) -> torch.nn.Module:
    """``model`` with the early exit of every sequential inverse on or off (off: D steps)."""
    for loop in fixed_point_inverses(model):
        loop.early_exit = early_exit
    return model


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


class InMemoryBackend:
    """A :class:`flowserve.server.gateway.backend.Backend` standing in for Triton.

    Each call answers ``answer(spec, inputs)`` and is recorded as ``(model, spec, inputs)``
    with its timeout in ``timeouts``. Calls sleep ``delay`` seconds (a callable gets the
    call's index), wait for ``gate`` if one is set, and raise ``failure`` if it is set.
    """

    def __init__(self, answer: Callable[[DirectionSpec, dict[str, np.ndarray]], dict[str, np.ndarray]],
                 max_batch_size: int = 4, versions: dict[str, list[str]] | None = None):
        self.answer = answer
        self.chunk = max_batch_size
        self.versions = versions or {}
        self.calls: list[tuple[str, DirectionSpec, dict[str, np.ndarray]]] = []
        self.timeouts: list[float | None] = []
        self.forgotten = 0
        self.delay: float | Callable[[int], float] = 0.0
        self.gate: asyncio.Event | None = None
        self.failure: Exception | None = None
        self.running = self.most_running = self.finished = 0
        self.batching = True
        self.queue = QueuePolicy()  # no limits
        self.unready: set[str] = set()
        """Models that report not ready until loaded again (``loads`` records "-m" for unload m, "m" for load)."""
        self.broken: set[str] = set()
        """Models that report ready but fail their probes until loaded again (``probes`` records them)."""
        self.loads: list[str] = []
        self.probes: list[str] = []

    async def is_ready(self) -> bool:
        return True

    async def model_versions(self) -> dict[str, list[str]]:
        return self.versions

    async def model_ready(self, model: str) -> bool:
        return model not in self.unready

    async def probe(self, model: str, spec: DirectionSpec, timeout: float) -> None:
        self.probes.append(model)
        if model in self.broken:
            raise BackendUnavailable(f"{model} is broken")

    async def load_model(self, model: str) -> None:
        self.loads.append(model)
        self.unready.discard(model)
        self.broken.discard(model)

    async def unload_model(self, model: str) -> None:
        self.loads.append(f"-{model}")

    async def max_batch_size(self, model: str) -> int:
        return self.chunk

    async def dynamic_batching(self, model: str) -> bool:
        return self.batching

    async def queue_policy(self, model: str) -> QueuePolicy:
        return self.queue

    def forget_configs(self) -> None:
        self.forgotten += 1

    async def infer(self, model, spec, inputs, timeout):
        index = len(self.calls)
        self.calls.append((model, spec, {name: array.copy() for name, array in inputs.items()}))
        self.timeouts.append(timeout)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay(index) if callable(self.delay) else self.delay)
            if self.gate is not None:
                await self.gate.wait()
            if self.failure is not None:
                raise self.failure
            return self.answer(spec, inputs)
        finally:
            self.running -= 1
            self.finished += 1

    async def close(self) -> None:
        pass

    def chunks(self, name: str) -> list[np.ndarray]:
        """Every call's input ``name``, in call order."""
        return [inputs[name] for _, _, inputs in self.calls]

"""Shared fixtures: a briefly trained RealNVP, a model repository, and a live server.

The live server is the real thing: ``flowserve serve`` in a subprocess, which starts the
``tritonserver`` from the nvidia-pytriton wheel and the asyncio gateway on free ports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowserve import cli
from flowserve.export.data import train_test_split, two_moons
from flowserve.export.exporter import export_flow
from flowserve.export.repository import ServingConfig
from flowserve.export.train import load_checkpoint
from flowserve.server.launcher import free_port

# Two flows with the same weights whose Triton models batch differently, so the gateway
# splits the same request into chunks of different sizes.
SMALL_CHUNKS = "moons-small-chunks"
LARGE_CHUNKS = "moons-large-chunks"
SMALL_BATCH = 64
MAX_ROWS_PER_REQUEST = 80_000  # not the default (100,000), so the flag is tested


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


def start_serve(repository: Path, workdir: Path, *extra: str,
                env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int, int]:
    """Start ``flowserve serve`` on free ports; returns the process, gateway and metrics ports.

    Its output goes to ``workdir/serve.log`` (a pipe nobody drains would block it).
    """
    port, metrics_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "flowserve.cli", "serve", "--model-repository", str(repository),
        "--port", str(port), "--metrics-port", str(metrics_port), "--workdir", str(workdir), *extra,
    ]
    with open(workdir / "serve.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
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

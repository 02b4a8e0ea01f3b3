"""Processes the tests start: ``flowserve serve`` in a hermetic environment, waited for
through gRPC health, stopped with SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from flowserve.server.triton.launcher import free_port

SETTINGS_PREFIX = "FLOWSERVE_"  # flowserve's own environment variables (Triton URL, tokens, target)


def hermetic_env(**settings: str) -> dict[str, str]:
    """The environment for a process a test starts: this one's, without any ``FLOWSERVE_*``
    variable, plus ``settings``. A developer's ``FLOWSERVE_TRITON_URL`` or tokens must not
    change what a test sees."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(SETTINGS_PREFIX)}
    return {**env, **settings}


@dataclass
class LiveServer:
    """A running ``flowserve serve``: gateway and embedded Triton endpoints."""

    process: subprocess.Popen
    target: str
    metrics_url: str
    triton_grpc_url: str
    triton_metrics_url: str
    workdir: Path
    http_url: str
    """The HTTP API's base URL, ``http://127.0.0.1:<port>``."""

    def scrape(self, url: str | None = None) -> str:
        with urllib.request.urlopen(url or self.metrics_url, timeout=10) as response:
            return response.read().decode()


def metric_samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        s.value for s in metric_samples(text)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


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
                python: Path = Path(sys.executable), http_port: int | None = None) -> tuple[subprocess.Popen, int, int]:
    """Start ``flowserve serve`` with ``python`` on free ports, in :func:`hermetic_env` with
    ``env`` added; returns the process, gateway and metrics ports. The HTTP API listens on
    ``http_port`` if given (else it is off).

    Its output goes to ``workdir/serve.log`` (a pipe nobody drains would block it).
    """
    port, metrics_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        str(python), "-m", "flowserve.cli", "serve", "--model-repository", str(repository),
        "--port", str(port), "--metrics-port", str(metrics_port), "--workdir", str(workdir),
        *(["--no-http"] if http_port is None else ["--http-port", str(http_port)]), *extra,
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


def poll_until(condition, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Sleep ``poll_s`` at a time until ``condition()`` holds; TimeoutError naming ``what``
    after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s} s")
        time.sleep(poll_s)


def worker_processes(parent_pid: int) -> list[int]:
    """Pids of the gateway workers (multiprocessing's spawned children) of ``parent_pid``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) if proc.name.isdigit() else None
            spawned = ppid == parent_pid and b"spawn_main" in (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if spawned:
            found.append(int(proc.name))
    return sorted(found)


def connections_accepted(pid: int, port: int) -> int:
    """Established TCP connections that process ``pid`` holds on its local ``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
            count += local_port == port and state == "01" and inode in inodes  # 01: ESTABLISHED
    return count

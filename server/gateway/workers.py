"""Several gateway processes on one port: ``flowserve serve --workers N``.

Each worker is a process of its own (spawned, not forked: gRPC's threads do not survive a
fork) that runs the whole gateway on its own event loop: every RPC, health and reflection,
on the one gRPC port they share through ``SO_REUSEPORT``. The kernel spreads connections,
not calls, over the workers: one client channel stays with one worker, so spreading load
takes several channels (a fleet of clients has them anyway). Limits such as
``--max-rows-in-flight`` hold per worker.

The parent process serves no RPC. It
- starts the workers and reports ready once every one serves;
- owns the metrics port: the workers' collectors summed from prometheus_client's
  multiprocess files, and its own (Triton's restarts, the workers' restarts, GPU memory);
- runs the embedded Triton's supervisor, as a single gateway does;
- restarts a worker that dies, with a backoff that doubles (0.5 s up to 8 s);
- on SIGINT or SIGTERM sends SIGTERM to every worker, each of which drains its RPCs like a
  single gateway, and returns when all have exited.

Worker 0 reloads models that stop answering and loads changed flows; the others only watch,
so that N workers do not reload one model N times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable

from .app import GatewayConfig, run_event_loop, run_gateway
from .metrics import GatewayMetrics, PoolMetrics

log = logging.getLogger(__name__)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ParentGone(RuntimeError):
    """The ``serve`` process that started a worker exited."""


async def _watch_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        await asyncio.sleep(poll_s)
    raise ParentGone(f"the serve process {parent_pid} exited")


def worker_main(config: GatewayConfig, index: int, ready, log_level: int, parent_pid: int) -> None:
    """A worker's life: serve ``config`` until SIGTERM (or the parent is gone), then exit."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s worker {index} %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C reaches the parent, which stops the workers
    code = run_event_loop(run_gateway(
        config, GatewayMetrics(worker=True), watch=lambda: _watch_parent(parent_pid),
        on_ready=lambda gateway: ready.put(index), signals=(signal.SIGTERM,),
    ))
    raise SystemExit(code)


def check_port_free(host: str, port: int, option: str = "--port") -> None:
    """Raise OSError if ``host:port`` (the port of ``option``) is taken: workers share it with
    each other only."""
    if port == 0:
        raise ValueError(f"--workers needs a fixed {option}: each worker would get a port of its own")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"port {host}:{port} is taken ({exc.strerror})") from None


def check_ports_free(config: GatewayConfig) -> None:
    """:func:`check_port_free` for the gRPC port and, if there is one, the HTTP API's."""
    check_port_free(config.host, config.port)
    if config.http_port is not None:
        check_port_free(config.host, config.http_port, "--http-port")


@dataclass
class _Slot:
    """One worker's place in the pool: its process, and its restarts' backoff."""

    index: int
    process: multiprocessing.Process | None = None
    started_at: float = 0.0
    backoff_s: float = 0.0
    restart_at: float | None = None


@dataclass
class WorkerPool:
    """``workers`` gateway processes serving ``config`` (see the module's docstring)."""

    config: GatewayConfig
    workers: int
    first_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    stable_s: float = 60.0
    poll_s: float = 0.2
    ready_timeout_s: float = 60.0
    stop_timeout_s: float = 15.0
    """Beyond the config's grace period: then a worker still running is killed."""
    slots: list[_Slot] = field(init=False, default_factory=list)

    def __post_init__(self):
        if self.workers < 2:
            raise ValueError(f"a worker pool needs 2 or more workers, not {self.workers}")
        self._context = multiprocessing.get_context("spawn")
        self._ready = self._context.Queue()
        self.slots = [_Slot(index) for index in range(self.workers)]

    def _worker_config(self, index: int) -> GatewayConfig:
        return replace(self.config, metrics_port=None, reuse_port=True,
                       manage_models=self.config.manage_models and index == 0)

    def _start(self, slot: _Slot, now: float) -> None:
        slot.process = self._context.Process(
            target=worker_main, name=f"flowserve-gateway-{slot.index}", daemon=True,
            args=(self._worker_config(slot.index), slot.index, self._ready, logging.getLogger().level, os.getpid()),
        )
        slot.process.start()
        slot.started_at, slot.restart_at = now, None

    async def start(self) -> None:
        """Start every worker; return once each serves. Raises RuntimeError if one exits first."""
        clock = asyncio.get_running_loop().time
        for slot in self.slots:
            self._start(slot, clock())
        waiting, deadline = set(range(self.workers)), clock() + self.ready_timeout_s
        while waiting:
            waiting -= self._drain_ready()
            for slot in self.slots:
                if slot.index in waiting and not slot.process.is_alive():
                    raise RuntimeError(f"gateway worker {slot.index} exited with code {slot.process.exitcode} "
                                       f"before it served (its error is in the lines above)")
            if clock() > deadline:
                raise RuntimeError(f"gateway workers {sorted(waiting)} did not serve within {self.ready_timeout_s} s")
            await asyncio.sleep(self.poll_s)

    def _drain_ready(self) -> set[int]:
        found = set()
        with contextlib.suppress(queue.Empty):
            while True:
                found.add(self._ready.get_nowait())
        return found

    async def keep_alive(self, metrics: PoolMetrics) -> None:
        """Restart workers that die, until cancelled."""
        clock = asyncio.get_running_loop().time
        while True:
            await asyncio.sleep(self.poll_s)
            self._drain_ready()
            now = clock()
            for slot in self.slots:
                if slot.restart_at is not None:
                    if now >= slot.restart_at:
                        metrics.worker_restarts.inc()
                        self._start(slot, now)
                elif not slot.process.is_alive():
                    metrics.forget_worker(slot.process.pid)
                    if now - slot.started_at >= self.stable_s:
                        slot.backoff_s = 0.0  # it had served a while: start the backoff over
                    slot.backoff_s = min(max(2 * slot.backoff_s, self.first_backoff_s), self.max_backoff_s)
                    slot.restart_at = now + slot.backoff_s
                    log.error("gateway worker %d exited with code %s; restarting it in %.1f s",
                              slot.index, slot.process.exitcode, slot.backoff_s)

    async def stop(self) -> None:
        """SIGTERM to every worker; wait for them to drain, then kill what is left."""
        running = [slot.process for slot in self.slots if slot.process is not None and slot.process.is_alive()]
        for process in running:
            process.terminate()
        timeout = self.config.shutdown_grace_s + self.stop_timeout_s
        for process in running:
            await asyncio.to_thread(process.join, timeout)
            if process.is_alive():
                log.warning("gateway worker %s did not stop within %.0f s; killing it", process.name, timeout)
                process.kill()
                await asyncio.to_thread(process.join)


async def run_pool(config: GatewayConfig, workers: int,
                   supervise: Callable[[Callable[[], None]], Awaitable[None]] | None = None) -> int:
    """Serve ``config`` with ``workers`` gateway processes until SIGINT or SIGTERM (exit code
    0). ``supervise(on_restart)`` runs beside them as in a single gateway: if it raises, the
    workers stop and the exit code is 1."""
    check_ports_free(config)
    directory = tempfile.mkdtemp(prefix="flowserve-metrics-")
    os.environ[MULTIPROCESS_ENV] = directory  # for the workers: this process's prometheus_client is loaded already
    metrics = PoolMetrics(directory)
    pool = WorkerPool(config, workers)
    http = metrics.serve_http(config.metrics_port, config.host) if config.metrics_port is not None else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    exit_code = 0
    try:
        await pool.start()
        api = "" if config.http_port is None else f"HTTP :{config.http_port}, "
        print(f"gateway ready: gRPC {config.host}:{config.port} ({workers} workers), {api}"
              f"metrics http://{config.host}:{config.metrics_port}/metrics", flush=True)
        stopped = asyncio.ensure_future(stop.wait())
        kept = asyncio.ensure_future(pool.keep_alive(metrics))
        supervised = [asyncio.ensure_future(supervise(metrics.triton_restarts.inc))] if supervise else []
        await asyncio.wait([stopped, kept, *supervised], return_when=asyncio.FIRST_COMPLETED)
        for task in (stopped, kept, *supervised):
            task.cancel()
        for task in (kept, *supervised):
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("%s; shutting the gateway down", task.exception())
                exit_code = 1
        await asyncio.gather(stopped, kept, *supervised, return_exceptions=True)
    finally:
        await pool.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if http is not None:
            await metrics.stop_http(http)
        shutil.rmtree(directory, ignore_errors=True)
    return exit_code

"""Every Prometheus collector of the gateway, in one registry.

Labels are bounded: ``method`` is one of the RPCs, ``code`` a gRPC status name, ``protocol``
``grpc`` or ``http`` (the transport the call came by), and ``model`` a served flow's name or
``"unknown"`` (names from requests that match no flow never become label values).

With several gateway workers (``serve --workers N``) each worker writes its collectors to
prometheus_client's multiprocess files, and the parent process exposes their sums
(:class:`PoolMetrics`) beside what only it knows: Triton's restarts, the workers' restarts,
and GPU memory, read once per scrape.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "unknown"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ROW_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)


@dataclass(frozen=True)
class GpuMemory:
    """One GPU as NVML reports it: its name, and its memory used and in all, in bytes."""

    name: str
    used: int
    total: int


def read_gpus(nvml) -> list[GpuMemory]:
    """Every GPU ``nvml`` (``pynvml``, initialised) sees, by index; raises what NVML raises."""
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        gpus.append(GpuMemory(name.decode() if isinstance(name, bytes) else str(name), memory.used, memory.total))
    return gpus


class GpuMemoryCollector:
    """GPU memory used and total per GPU, read through NVML at scrape time.

    Where NVML is missing (no driver, as on CPU-only machines) it reports zero GPUs and
    ``flowserve_nvml_available 0``; a scrape never fails because of NVML.
    """

    def __init__(self, nvml=None):
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                log.warning("nvidia-ml-py is not installed: GPU memory is not reported")
        self._nvml = nvml
        self._initialised = False

    def _ensure_init(self) -> bool:
        if not self._initialised and self._nvml is not None:
            try:
                self._nvml.nvmlInit()
                self._initialised = True
            except Exception as exc:  # NVMLError_LibraryNotFound without a driver
                log.debug("NVML unavailable: %s", exc)
        return self._initialised

    def collect(self):
        available = GaugeMetricFamily(
            "flowserve_nvml_available", "1 when NVML could be read, 0 when it is missing or failing"
        )
        count = GaugeMetricFamily("flowserve_gpus", "GPUs visible through NVML")
        used = GaugeMetricFamily("flowserve_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu", "name"])
        total = GaugeMetricFamily("flowserve_gpu_memory_total_bytes", "GPU memory in all", labels=["gpu", "name"])
        ok, found = self._ensure_init(), []
        if ok:
            try:
                found = read_gpus(self._nvml)  # all or nothing: a failed read adds no GPU
            except Exception as exc:  # a lost GPU must not fail the scrape
                log.warning("NVML read failed: %s", exc)
                ok = False
        for index, gpu in enumerate(found):
            used.add_metric([str(index), gpu.name], float(gpu.used))
            total.add_metric([str(index), gpu.name], float(gpu.total))
        available.add_metric([], 1.0 if ok else 0.0)
        count.add_metric([], float(len(found)))
        return [available, count, used, total]


def _triton_restarts(registry: CollectorRegistry) -> Counter:
    return Counter("flowserve_triton_restarts", "Restarts of the embedded Triton after it died", registry=registry)


class MetricsEndpoint:
    """A registry and its ``/metrics`` HTTP endpoint."""

    registry: CollectorRegistry

    def serve_http(self, port: int, address: str = "0.0.0.0"):
        """Expose ``/metrics`` on ``address:port``; returns the HTTP server."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return server

    @staticmethod
    async def stop_http(server) -> None:
        """Stop a server from ``serve_http`` without blocking the event loop."""
        await asyncio.to_thread(server.shutdown)
        server.server_close()


class GatewayMetrics(MetricsEndpoint):
    """The gateway's collectors, registered in their own registry.

    A ``worker`` of several leaves Triton's restarts and GPU memory to the parent
    (:class:`PoolMetrics`), which has them once for all workers. Its gauges say how the
    parent sums them across live workers: in-flight RPCs add up, and a flow (or Triton) is
    ready only when every worker found it so.
    """

    def __init__(self, registry: CollectorRegistry | None = None, nvml=None, worker: bool = False):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "flowserve_requests", "Calls handled, by method, model, gRPC status code and protocol",
            ["method", "model", "code", "protocol"], registry=self.registry,
        )
        self.latency = Histogram(
            "flowserve_request_latency_seconds", "Call latency in the gateway",
            ["method", "model", "protocol"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.rows = Histogram(
            "flowserve_request_rows", "Rows (samples or scored points) per successful request",
            ["method", "model", "protocol"], buckets=ROW_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge(
            "flowserve_requests_in_flight", "Calls being handled now", ["method", "protocol"], registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.triton_ready = Gauge(
            "flowserve_triton_ready", "1 when the gateway's Triton reports ready", registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.flow_ready = Gauge(
            "flowserve_flow_ready", "1 when every Triton model of the flow answered the last health check",
            ["model"], registry=self.registry, multiprocess_mode="livemin",
        )
        self.model_reloads = Counter(
            "flowserve_model_reloads", "Reloads of a flow's Triton model that stopped answering",
            ["model", "direction"], registry=self.registry,
        )
        if not worker:
            self.triton_restarts = _triton_restarts(self.registry)
            self.registry.register(GpuMemoryCollector(nvml))


class PoolMetrics(MetricsEndpoint):
    """What the parent of several gateway workers exposes: the sums of the workers'
    collectors, read from the multiprocess files in ``directory``, and its own."""

    def __init__(self, directory: str, nvml=None):
        self.directory = directory
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=directory)
        self.triton_restarts = _triton_restarts(self.registry)
        self.worker_restarts = Counter(
            "flowserve_gateway_worker_restarts", "Restarts of a gateway worker process after it died",
            registry=self.registry,
        )
        self.registry.register(GpuMemoryCollector(nvml))

    def forget_worker(self, pid: int) -> None:
        """Drop the gauges of a worker that exited (its counters still count)."""
        multiprocess.mark_process_dead(pid, self.directory)

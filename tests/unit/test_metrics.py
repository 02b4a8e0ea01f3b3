"""GPU memory metrics through NVML (a fake NVML stands in for GPUs this machine lacks), and
the sums a pool of gateway workers reports."""

from __future__ import annotations

import pynvml
from helpers.fake_nvml.pynvml import GIB, GPU_NAME, FakeNvml
from prometheus_client import generate_latest, values
from prometheus_client.parser import text_string_to_metric_families

from flowserve.server.gateway.metrics import GatewayMetrics, PoolMetrics


def scrape(metrics: GatewayMetrics | PoolMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def test_gpu_memory_per_gpu():
    values = scrape(GatewayMetrics(nvml=FakeNvml()))
    name = ("name", GPU_NAME)
    assert values[("flowserve_nvml_available", ())] == 1
    assert values[("flowserve_gpus", ())] == 2
    assert values[("flowserve_gpu_memory_used_bytes", (("gpu", "1"), name))] == 60 * GIB
    assert values[("flowserve_gpu_memory_total_bytes", (("gpu", "0"), name))] == 80 * GIB


class MissingNvml(FakeNvml):
    """What pynvml does on a machine without the NVIDIA driver (as on CI)."""

    def nvmlInit(self):
        raise pynvml.NVMLError_LibraryNotFound()


def test_missing_nvml_reports_zero_gpus_and_never_fails_a_scrape():
    values = scrape(GatewayMetrics(nvml=MissingNvml()))
    assert values[("flowserve_nvml_available", ())] == 0
    assert values[("flowserve_gpus", ())] == 0
    assert not any(key[0].startswith("flowserve_gpu_memory") for key in values)


def test_nvml_read_failure_is_reported_not_raised():
    values = scrape(GatewayMetrics(nvml=FakeNvml(fail_reads=True)))
    assert values[("flowserve_nvml_available", ())] == 0
    assert values[("flowserve_gpus", ())] == 0
    assert not any(key[0].startswith("flowserve_gpu_memory") for key in values)


def write_as_worker(monkeypatch, directory, pid: int, calls: int, flow_ready: float) -> GatewayMetrics:
    """A gateway worker's collectors as the worker process ``pid`` writes them, into
    prometheus_client's multiprocess files in ``directory``: ``calls`` Sample calls, as many
    in flight, and the flow ``moons`` ready or not."""
    with monkeypatch.context() as patched:
        patched.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
        patched.setattr(values, "ValueClass", values.MultiProcessValue(lambda: pid))
        worker = GatewayMetrics(worker=True)
        for _ in range(calls):
            worker.requests.labels("Sample", "moons", "OK", "grpc").inc()
        worker.rows.labels("Sample", "moons", "grpc").observe(calls)
        worker.in_flight.labels("Sample", "grpc").set(calls)
        worker.triton_ready.set(1.0)
        worker.flow_ready.labels("moons").set(flow_ready)
    return worker


def test_a_worker_pool_reports_the_sums_of_its_workers_and_its_own_collectors_once(monkeypatch, tmp_path):
    worker = write_as_worker(monkeypatch, tmp_path, pid=101, calls=3, flow_ready=1.0)
    write_as_worker(monkeypatch, tmp_path, pid=102, calls=4, flow_ready=0.0)
    assert not hasattr(worker, "triton_restarts")  # the parent's, once for all workers
    pool = PoolMetrics(str(tmp_path), nvml=FakeNvml())
    pool.triton_restarts.inc()
    values_ = scrape(pool)
    labels = (("code", "OK"), ("method", "Sample"), ("model", "moons"), ("protocol", "grpc"))
    in_flight = ("flowserve_requests_in_flight", (("method", "Sample"), ("protocol", "grpc")))
    assert values_[("flowserve_requests_total", labels)] == 7
    assert values_[("flowserve_request_rows_sum", (("method", "Sample"), ("model", "moons"), ("protocol", "grpc")))] == 7
    assert values_[in_flight] == 7
    assert values_[("flowserve_flow_ready", (("model", "moons"),))] == 0  # ready only where every worker says so
    assert values_[("flowserve_triton_ready", ())] == 1
    assert values_[("flowserve_triton_restarts_total", ())] == 1
    assert values_[("flowserve_gpus", ())] == 2
    pool.forget_worker(102)  # it died: its gauges go, its counts stay
    values_ = scrape(pool)
    assert values_[in_flight] == 3
    assert values_[("flowserve_flow_ready", (("model", "moons"),))] == 1
    assert values_[("flowserve_requests_total", labels)] == 7

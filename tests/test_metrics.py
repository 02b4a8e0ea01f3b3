"""GPU memory metrics through NVML: a fake NVML stands in for GPUs this machine lacks."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flowserve.server.metrics import GatewayMetrics


def scrape(metrics: GatewayMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


class FakeNvml:
    """Two GPUs, like an H100 node with a job on GPU 1."""

    NVMLError = pynvml.NVMLError

    def __init__(self, fail_reads: bool = False):
        self.fail_reads = fail_reads
        self.memory = {0: (1 * 2**30, 80 * 2**30), 1: (60 * 2**30, 80 * 2**30)}

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.memory)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle):
        if self.fail_reads:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        used, total = self.memory[handle]
        return SimpleNamespace(used=used, total=total, free=total - used)


def test_gpu_memory_per_gpu():
    values = scrape(GatewayMetrics(nvml=FakeNvml()))
    name = ("name", "NVIDIA H100 80GB HBM3")
    assert values[("flowserve_nvml_available", ())] == 1
    assert values[("flowserve_gpus", ())] == 2
    assert values[("flowserve_gpu_memory_used_bytes", (("gpu", "1"), name))] == 60 * 2**30
    assert values[("flowserve_gpu_memory_total_bytes", (("gpu", "0"), name))] == 80 * 2**30


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

"""GPU memory metrics through NVML: a fake NVML stands in for GPUs this machine lacks."""

from __future__ import annotations

import pynvml
from helpers.fake_nvml.pynvml import GIB, GPU_NAME, FakeNvml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flowserve.server.gateway.metrics import GatewayMetrics


def scrape(metrics: GatewayMetrics) -> dict[tuple[str, tuple], float]:
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

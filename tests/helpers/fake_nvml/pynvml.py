"""A stand-in for nvidia-ml-py's ``pynvml``: two 80 GiB GPUs, for machines without GPUs.

Tests pass a ``FakeNvml`` to the gateway's collector directly, or put this directory first
on ``PYTHONPATH`` so that a gateway process imports this module as ``pynvml``; such a test
sets the GPUs' memory in ``FAKE_NVML_MEMORY_GIB`` ("used/total" in GiB, one GPU each, comma
separated).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

NVML_ERROR_GPU_IS_LOST = 15
GPU_NAME = "NVIDIA H100 80GB HBM3"
GIB = 2**30
MEMORY_ENV = "FAKE_NVML_MEMORY_GIB"


class NVMLError(Exception):
    """What pynvml raises; the real class also carries the NVML error code."""


class FakeNvml:
    """Two GPUs, like an H100 node with a job on GPU 1."""

    NVMLError = NVMLError

    def __init__(self, fail_reads: bool = False, memory: dict[int, tuple[int, int]] | None = None):
        self.fail_reads = fail_reads
        self.memory = memory or {0: (1 * GIB, 80 * GIB), 1: (60 * GIB, 80 * GIB)}

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.memory)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return GPU_NAME.encode()

    def nvmlDeviceGetMemoryInfo(self, handle):
        if self.fail_reads:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        used, total = self.memory[handle]
        return SimpleNamespace(used=used, total=total, free=total - used)


def memory_from_environment() -> dict[int, tuple[int, int]] | None:
    """The GPUs of ``FAKE_NVML_MEMORY_GIB`` as {index: (used, total) bytes}; None if unset."""
    text = os.environ.get(MEMORY_ENV)
    if not text:
        return None
    return {index: tuple(int(float(gib) * GIB) for gib in gpu.split("/")) for index, gpu in enumerate(text.split(","))}


_gpus = FakeNvml(memory=memory_from_environment())
nvmlInit = _gpus.nvmlInit
nvmlDeviceGetCount = _gpus.nvmlDeviceGetCount
nvmlDeviceGetHandleByIndex = _gpus.nvmlDeviceGetHandleByIndex
nvmlDeviceGetName = _gpus.nvmlDeviceGetName
nvmlDeviceGetMemoryInfo = _gpus.nvmlDeviceGetMemoryInfo

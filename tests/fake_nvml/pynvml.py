"""A stand-in for nvidia-ml-py's ``pynvml``: two 80 GiB GPUs, for machines without GPUs.

Tests pass a ``FakeNvml`` to the gateway's collector directly, or put this directory first
on ``PYTHONPATH`` so that a gateway process imports this module as ``pynvml``.
"""

from __future__ import annotations

from types import SimpleNamespace

NVML_ERROR_GPU_IS_LOST = 15
GPU_NAME = "NVIDIA H100 80GB HBM3"
GIB = 2**30


class NVMLError(Exception):
    """What pynvml raises; the real class also carries the NVML error code."""


class FakeNvml:
    """Two GPUs, like an H100 node with a job on GPU 1."""

    NVMLError = NVMLError

    def __init__(self, fail_reads: bool = False):
        self.fail_reads = fail_reads
        self.memory = {0: (1 * GIB, 80 * GIB), 1: (60 * GIB, 80 * GIB)}

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


_gpus = FakeNvml()
nvmlInit = _gpus.nvmlInit
nvmlDeviceGetCount = _gpus.nvmlDeviceGetCount
nvmlDeviceGetHandleByIndex = _gpus.nvmlDeviceGetHandleByIndex
nvmlDeviceGetName = _gpus.nvmlDeviceGetName
nvmlDeviceGetMemoryInfo = _gpus.nvmlDeviceGetMemoryInfo

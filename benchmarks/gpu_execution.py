"""How long a flow's execution takes on a GPU, to set beside the gateway's overhead per call.

Loads checkpoints of ``flowserve train``, exports both directions with flowserve's exporter
(TorchScript, as Triton's PyTorch backend runs it; and ONNX, run with ONNX Runtime's CUDA
execution provider where the installed onnxruntime has it), and times one call per batch
size on the GPU: the median of ``--calls`` calls after warm-up, with the inputs already on
the device for TorchScript and copied from host memory for ONNX Runtime (as Triton's
runner gets them). Then reads the GPU's memory through NVML with the gateway's collector.

    python benchmarks/gpu_execution.py CHECKPOINT.pt [...] [--batches 1 64 1024 4096]

Without a GPU it times the CPU instead, and says so.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time
from pathlib import Path

import onnxruntime as ort
import torch

from flowserve.contract.spec import DIRECTIONS
from flowserve.export.exporter.formats import export_onnx, export_torchscript
from flowserve.export.exporter.graphs import example_inputs
from flowserve.export.training import load_checkpoint
from flowserve.server.gateway.metrics import GpuMemoryCollector


def median_ms(call, calls: int, synchronize) -> float:
    for _ in range(5):
        call()
    synchronize()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        synchronize()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def batch_of(model, direction: str, batch: int) -> list[torch.Tensor]:
    """Inputs of ``direction`` with ``batch`` rows: the example rows, repeated."""
    return [t[:1].repeat(batch, *[1] * (t.dim() - 1)).contiguous() for t in example_inputs(model, direction)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024, 4096])
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    providers = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else []
    print(f"# {torch.cuda.get_device_name() if cuda else 'no GPU: CPU'}; {platform.machine()}, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__} with {', '.join(ort.get_available_providers())}\n")
    print("| flow | D | direction | batch | TorchScript on " + ("GPU" if cuda else "CPU") + ", ms | "
          + ("ONNX Runtime CUDA EP, ms |" if providers else "") + " rows/s (TorchScript) |")
    print("|---|---|---|---|---|" + ("---|" if providers else "") + "---|")
    for path in args.checkpoints:
        model, _ = load_checkpoint(path)
        for direction in DIRECTIONS:
            module = torch.jit.load(io.BytesIO(export_torchscript(model, direction)), map_location=device).eval()
            session = None
            if providers:  # onnxruntime-gpu lists CUDA even where it cannot load it: keep only a real one
                session = ort.InferenceSession(export_onnx(model, direction), providers=providers)
                if session.get_providers()[0] != "CUDAExecutionProvider":
                    session = None
            for batch in args.batches:
                inputs = [t.to(device) for t in batch_of(model, direction, batch)]
                with torch.inference_mode():
                    script_ms = median_ms(lambda: module(*inputs), args.calls, synchronize)
                cells = [f"{script_ms:.3f}"]
                if providers:
                    cells.append("no CUDA")
                if session is not None:
                    cells.pop()
                    feeds = {i.name: t.cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
                    cells.append(f"{median_ms(lambda: session.run(None, feeds), args.calls, lambda: None):.3f}")
                print(f"| {path.stem} | {model.dim} | {direction} | {batch} | " + " | ".join(cells)
                      + f" | {batch / script_ms * 1e3:,.0f} |", flush=True)
    print("\nNVML, read by the gateway's collector:")
    for family in GpuMemoryCollector().collect():
        for sample in family.samples:
            print(f"  {sample.name} {sample.labels or ''} {sample.value:,.0f}")


if __name__ == "__main__":
    main()

"""Measure how the sequential directions export: MAF generation and IAF density.

Prints a Markdown table of node counts (nested Loop bodies included), Loop counts, file
sizes and export times for ONNX and TorchScript at the dimensions given (default 64 and
784), and the largest difference from PyTorch on 8 random rows. Usage:

    .venv/bin/python scripts/loop_export_report.py [--dims 64 784] [--layers 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from flowserve.contract.spec import DENSITY, GENERATION
from flowserve.export.exporter.formats import EXPORTERS, graph_stats, load_exported
from flowserve.export.flows.registry import build_flow


def measure(family: str, direction: str, dim: int, layers: int, fmt: str) -> dict:
    torch.manual_seed(0)
    model = build_flow({"family": family, "event_shape": [dim], "num_layers": layers,
                        "hidden_features": [min(512, dim + 64)]})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.eval()
    started = time.perf_counter()
    graph = EXPORTERS[fmt](model, direction)
    seconds = time.perf_counter() - started
    rows = torch.randn(8, dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.log_prob(rows) if direction == DENSITY else model.sample_with_log_prob(rows)[0]
    exported = load_exported(fmt, graph)(rows.numpy())[0]
    return {**graph_stats(fmt, graph), "seconds": seconds,
            "max_diff": float(np.abs(exported - expected.numpy()).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 784])
    parser.add_argument("--layers", type=int, default=5)
    args = parser.parse_args()
    print("| direction | D | format | nodes | Loops | size | export time | max diff vs PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for family, direction in (("maf", GENERATION), ("iaf", DENSITY)):
        for dim in args.dims:
            for fmt in ("onnx", "torchscript"):
                row = measure(family, direction, dim, args.layers, fmt)
                print(f"| {family} {direction} | {dim} | {fmt} | {row['nodes']} | {row['loops']} | "
                      f"{row['bytes'] / 2**20:.1f} MiB | {row['seconds']:.1f} s | {row['max_diff']:.1e} |",
                      flush=True)


if __name__ == "__main__":
    main()

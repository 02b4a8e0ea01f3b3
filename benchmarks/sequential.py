"""The sequential direction of MAF (generation) and IAF (density) against the one-pass
direction, with the D-step loop and with the early exit, side by side in one run.

Trains each flow briefly (digits with uniform noise, D=64; and D=256: the digits
upsampled to 16x16, then the noise), exports three ONNX graphs per flow (the fast
direction, the slow one with D steps, the slow one with the early exit) and times them in-process with ONNX Runtime, in
interleaved rounds, at batch sizes 1, 64 and 1024. Prints the steps the early exit ran per
layer, rows/s, and the slow/fast ratios. Usage:

    .venv/bin/python benchmarks/sequential.py [--dims 64 256] [--families maf iaf] [--steps 500]

IAF trains through its slow direction: at D=256, 500 steps take more than 20 minutes on a
2-core machine (``--families iaf --dims 256 --steps 100`` is shorter).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from flowserve.cli.build import train
from flowserve.export.data import digits
from flowserve.export.exporter.formats import export_onnx
from flowserve.export.flows.transforms import FixedPointInverse
from flowserve.export.training import load_checkpoint
from flowserve.spec import DENSITY, GENERATION

BATCHES = (1, 64, 1024)
SLOW = {"maf": GENERATION, "iaf": DENSITY}


def data_file(dim: int, folder: Path) -> Path:
    """Digits as [N, 64] rows, or upsampled to 16x16 ([N, 256]), with uniform noise (so
    that no column is constant)."""
    images = digits()[0][:, 0]
    if dim == 256:
        images = np.kron(images, np.ones((2, 2), np.float32))
    elif dim != 64:
        raise SystemExit(f"--dims takes 64 and 256, not {dim}")
    images = images + np.random.default_rng(0).uniform(0, 1, images.shape).astype(np.float32)
    path = folder / f"digits-{dim}.npy"
    np.save(path, images.reshape(len(images), -1))
    return path


def loops(model) -> list[FixedPointInverse]:
    return [module for module in model.modules() if isinstance(module, FixedPointInverse)]


def sessions(model, family: str, threads: int) -> dict[str, ort.InferenceSession]:
    d_steps = copy.deepcopy(model)
    for loop in loops(d_steps):
        loop.early_exit = False
    fast = GENERATION if SLOW[family] == DENSITY else DENSITY
    graphs = {"fast": export_onnx(model, fast), "D steps": export_onnx(d_steps, SLOW[family]),
              "early exit": export_onnx(model, SLOW[family])}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return {name: ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
            for name, graph in graphs.items()}


def rows_per_second(session: ort.InferenceSession, rows: np.ndarray, seconds: float = 0.5) -> float:
    feed = {session.get_inputs()[0].name: rows}
    session.run(None, feed)
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or calls < 2:
        session.run(None, feed)
        calls += 1
    return calls * len(rows) / elapsed


def inputs(model, family: str, heldout: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Rows for each graph: held-out data for the density, standard normal noise for generation."""
    rng = np.random.default_rng(batch)
    data = heldout[rng.integers(len(heldout), size=batch)]
    noise = rng.standard_normal((batch, model.noise_dim), dtype=np.float32)
    slow, fast = (noise, data) if SLOW[family] == GENERATION else (data, noise)
    return {"fast": fast, "D steps": slow, "early exit": slow}


def steps_run(model, family: str, rows: np.ndarray) -> str:
    with torch.no_grad():
        if SLOW[family] == GENERATION:
            model.sample_with_log_prob(torch.from_numpy(rows))
        else:
            model.log_prob(torch.from_numpy(rows))
    counts = [loop.passes_run for loop in loops(model)]
    return f"{min(counts)}-{max(counts)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--families", nargs="+", choices=sorted(SLOW), default=["maf", "iaf"])
    parser.add_argument("--steps", type=int, default=500, help="training steps per flow")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the best is kept)")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"onnxruntime {ort.__version__} with {args.threads} intra-op thread(s)\n")
    print("| flow | D | batch | steps run per layer | fast rows/s | slow, D steps | slow, early exit "
          "| slow/fast, D steps | slow/fast, early exit | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for dim in args.dims:
            data = data_file(dim, Path(folder))
            for family in args.families:
                with contextlib.redirect_stdout(sys.stderr):  # the table alone on stdout
                    checkpoint = train(family, data, steps=args.steps, output=Path(folder) / f"{family}-{dim}.pt")
                model, saved = load_checkpoint(checkpoint)
                model.eval()
                heldout = saved.heldout_sample.reshape(len(saved.heldout_sample), -1).numpy()
                runners = sessions(model, family, args.threads)
                for batch in BATCHES:
                    feeds = inputs(model, family, heldout, batch)
                    rates = {name: 0.0 for name in runners}
                    for _ in range(args.rounds):
                        for name, session in runners.items():
                            rates[name] = max(rates[name], rows_per_second(session, feeds[name]))
                    fast, d_steps, early = rates["fast"], rates["D steps"], rates["early exit"]
                    print(f"| {family} ({SLOW[family]} is slow) | {dim} | {batch} | "
                          f"{steps_run(model, family, feeds['early exit'])} of {dim} | {fast:,.0f} | {d_steps:,.0f} | "
                          f"{early:,.0f} | {fast / d_steps:.1f}x | {fast / early:.1f}x | {early / d_steps:.1f}x |",
                          flush=True)


if __name__ == "__main__":
    main()

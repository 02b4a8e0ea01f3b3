"""The sequential direction of MAF (generation) and IAF (density) against the one-pass
direction: with the D-step loop, with the early exit, and with the cached inverse, side by
side in one run.

Trains each flow briefly (digits with uniform noise, D=64; and D=256: the digits
upsampled to 16x16, then the noise), exports four ONNX graphs per flow (the fast
direction, and the slow one with D steps, with the early exit, with the cached inverse)
and times them in-process with ONNX Runtime, in interleaved rounds, at batch sizes 1, 64
and 1024. Prints rows/s and the slow/fast ratios; then the steps the early exit ran per
layer, for these flows and for flows trained on moons and breast-cancer; then the D=64
MAF served through Triton and the gateway (LogLikelihood, and Sample from the D-step, the
early-exit and the cached graphs). Usage:

    .venv/bin/python benchmarks/sequential.py [--dims 64 256] [--families maf iaf] [--steps 500]
        [--step-data moons breast-cancer] [--no-gateway]

IAF trains through its slow direction: at D=256, 500 steps take more than 20 minutes on a
2-core machine (``--families iaf --dims 256 --steps 100`` is shorter)."""

from __future__ import annotations

import argparse
import asyncio
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
from flowserve.contract.spec import DENSITY, GENERATION
from flowserve.export.data import digits
from flowserve.export.exporter.formats import export_onnx
from flowserve.export.flows.autoregressive import use_cached_inverse
from flowserve.export.flows.transforms import fixed_point_inverses
from flowserve.export.training import load_checkpoint

BATCHES = (1, 64, 1024)
CACHED_FROM = 256  # the served cached graph's minimum batch (the CLI's default)
SAMPLED = ("maf-d-steps", "maf", "maf-cached")  # served models: D steps, early exit, cached
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


def with_loops(model, early_exit: bool = True, cached_from: int | None = None):
    """A copy of ``model`` whose sequential inverses run the D-step loop, the early-exit loop,
    or the cached inverse from ``cached_from`` rows."""
    model = copy.deepcopy(model)
    for loop in fixed_point_inverses(model):
        loop.early_exit = early_exit
    if cached_from is not None:
        use_cached_inverse(model, cached_from)
    return model


def sessions(model, family: str, threads: int) -> dict[str, ort.InferenceSession]:
    """The fast direction, and the slow one with D steps, the early exit, the cached inverse."""
    fast = GENERATION if SLOW[family] == DENSITY else DENSITY
    graphs = {"fast": export_onnx(model, fast), "D steps": export_onnx(with_loops(model, False), SLOW[family]),
              "early exit": export_onnx(model, SLOW[family]),
              "cached": export_onnx(with_loops(model, cached_from=1), SLOW[family])}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return {name: ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
            for name, graph in graphs.items()}


def calls_per_second(call, seconds: float = 0.5) -> float:
    """Calls per second of ``call()``, after one warm-up call; at least two timed calls."""
    call()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or calls < 2:
        call()
        calls += 1
    return calls / elapsed


def rows_per_second(session: ort.InferenceSession, rows: np.ndarray) -> float:
    feed = {session.get_inputs()[0].name: rows}
    return calls_per_second(lambda: session.run(None, feed)) * len(rows)


def trained(family: str, data, steps: int, output: Path):
    """Train ``family`` on ``data`` (a built-in name or a file); the model in eval mode and
    its held-out rows, flat."""
    with contextlib.redirect_stdout(sys.stderr):  # the tables alone on stdout
        checkpoint = train(family, data, steps=steps, output=output)
    model, saved = load_checkpoint(checkpoint)
    model.eval()
    return model, saved.heldout_sample.reshape(len(saved.heldout_sample), -1).numpy()


def inputs(model, family: str, heldout: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Rows for each graph: held-out data for the density, standard normal noise for generation."""
    rng = np.random.default_rng(batch)
    data = heldout[rng.integers(len(heldout), size=batch)]
    noise = rng.standard_normal((batch, model.noise_dim), dtype=np.float32)
    slow, fast = (noise, data) if SLOW[family] == GENERATION else (data, noise)
    return {"fast": fast, "D steps": slow, "early exit": slow, "cached": slow}


def steps_run(model, family: str, rows: np.ndarray) -> str:
    with torch.no_grad():
        if SLOW[family] == GENERATION:
            model.sample_with_log_prob(torch.from_numpy(rows))
        else:
            model.log_prob(torch.from_numpy(rows))
    counts = [loop.passes_run for loop in fixed_point_inverses(model)]
    return f"{min(counts)}-{max(counts)}"


def gateway_rates(model, heldout: np.ndarray, folder: Path, rounds: int) -> None:
    """The same MAF exported three times (early exit, cached inverse from CACHED_FROM rows,
    D steps) and served through Triton and the gateway: the generation graphs' sizes, how
    far the samples of one seed lie from the D-step ones, and LogLikelihood and Sample rows/s."""
    from flowserve.export.exporter.pipeline import export_model
    from flowserve.export.exporter.triton_config import ServingConfig
    from flowserve.server.client import FlowClient
    from flowserve.server.gateway.app import Gateway, GatewayConfig
    from flowserve.server.gateway.triton_backend import TritonBackend
    from flowserve.server.triton.launcher import TritonServer, free_port

    repository = folder / "repository"
    with contextlib.redirect_stdout(sys.stderr):
        exports = {"early exit": export_model(model, repository, name="maf", example_data=heldout[:256]),
                   "cached": export_model(model, repository, name="maf-cached", example_data=heldout[:256],
                                          serving=ServingConfig(cached_inverse_min_batch=CACHED_FROM))}
        export_model(with_loops(model, False), repository, name="maf-d-steps", example_data=heldout[:256])
    print("\nThe generation graphs exported: " + "; ".join(
        f"{name}: {stats['nodes']} nodes, {stats['bytes'] / 2**20:.1f} MiB, {stats['seconds']:.0f} s"
        for name, stats in ((name, meta.graphs[GENERATION]) for name, meta in exports.items())))

    def measure(target: str) -> None:
        with FlowClient(target, timeout=600) as client:
            d_steps = client.sample("maf-d-steps", 1024, seed=7).x
            gaps = {name: (np.abs(client.sample(name, 1024, seed=7).x - d_steps) / np.maximum(1, np.abs(d_steps))).max()
                    for name in SAMPLED[1:]}
            print(f"\nThrough the gateway (the D={model.dim} MAF; Triton's Python backend runs ONNX Runtime; "
                  f"with the same seed, 1024 samples of the early-exit graph differ from those of the D-step graph "
                  f"by {gaps['maf']:.1e} at most, those of the cached graph by {gaps['maf-cached']:.1e}, "
                  "relative to max(1, |x|)):\n")
            print("| batch | LogLikelihood rows/s | Sample rows/s: D steps | early exit | cached from "
                  f"{CACHED_FROM} rows | slow/fast: D steps | early exit | cached from {CACHED_FROM} rows |")
            print("|---|---|---|---|---|---|---|---|")
            for batch in BATCHES:
                rows = heldout[np.random.default_rng(batch).integers(len(heldout), size=batch)]
                calls = {name: (lambda name=name: client.sample(name, batch, seed=1)) for name in SAMPLED}
                calls["density"] = lambda: client.log_likelihood("maf", rows)
                rates = {name: 0.0 for name in calls}
                for _ in range(rounds):
                    for name, call in calls.items():
                        rates[name] = max(rates[name], calls_per_second(call) * batch)
                fast, slow = rates["density"], [rates[name] for name in SAMPLED]
                print(f"| {batch} | {fast:,.0f} | " + " | ".join(f"{rate:,.0f}" for rate in slow) + " | "
                      + " | ".join(f"{fast / rate:.1f}x" for rate in slow) + " |", flush=True)

    with TritonServer(repository, folder / "triton") as triton:
        config = GatewayConfig(repository, triton.grpc_url, host="127.0.0.1", port=0, metrics_port=free_port())

        async def run() -> None:
            async with Gateway(config, TritonBackend(config.triton_url)) as gateway:
                await asyncio.to_thread(measure, f"127.0.0.1:{gateway.port}")

        asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--families", nargs="+", choices=sorted(SLOW), default=["maf", "iaf"])
    parser.add_argument("--steps", type=int, default=500, help="training steps per flow")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the best is kept)")
    parser.add_argument("--step-data", nargs="*", default=["moons", "breast-cancer"],
                        help="more data sets whose flows only have their early-exit steps counted")
    parser.add_argument("--gateway", action=argparse.BooleanOptionalAction, default=True,
                        help="also serve the D=64 MAF through Triton and the gateway")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"onnxruntime {ort.__version__} with {args.threads} intra-op thread(s)\n")
    print("| flow | D | batch | fast rows/s | slow rows/s: D steps | early exit | cached "
          "| slow/fast: D steps | early exit | cached |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    steps: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        served = None
        for dim in args.dims:
            data = data_file(dim, Path(folder))
            for family in args.families:
                model, heldout = trained(family, data, args.steps, Path(folder) / f"{family}-{dim}.pt")
                runners = sessions(model, family, args.threads)
                counts = []
                for batch in BATCHES:
                    feeds = inputs(model, family, heldout, batch)
                    rates = {name: 0.0 for name in runners}
                    for _ in range(args.rounds):
                        for name, session in runners.items():
                            rates[name] = max(rates[name], rows_per_second(session, feeds[name]))
                    counts.append(steps_run(model, family, feeds["early exit"]))
                    slow = [rates[name] for name in ("D steps", "early exit", "cached")]
                    print(f"| {family} ({SLOW[family]} is slow) | {dim} | {batch} | {rates['fast']:,.0f} | "
                          + " | ".join(f"{rate:,.0f}" for rate in slow) + " | "
                          + " | ".join(f"{rates['fast'] / rate:.1f}x" for rate in slow) + " |", flush=True)
                steps.append(f"| {data.stem} | {dim} | {family} {SLOW[family]} | {' | '.join(counts)} |")
                if family == "maf" and dim == 64:
                    served = (model, heldout)
        for name in args.step_data:
            for family in args.families:
                model, heldout = trained(family, name, args.steps, Path(folder) / f"{family}-{name}.pt")
                counts = [steps_run(model, family, inputs(model, family, heldout, batch)["early exit"])
                          for batch in BATCHES]
                steps.append(f"| {name} | {model.dim} | {family} {SLOW[family]} | {' | '.join(counts)} |")
        print("\nSteps the early exit ran per layer (eager PyTorch, fewest to most over the layers):\n")
        print("| data | D | slow direction | " + " | ".join(f"batch {batch}" for batch in BATCHES) + " |")
        print("|---|---|---|" + "---|" * len(BATCHES))
        print("\n".join(steps), flush=True)
        if args.gateway and served is not None:
            gateway_rates(*served, Path(folder), args.rounds)


if __name__ == "__main__":
    main()

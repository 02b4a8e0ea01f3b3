"""Many samples for each of many contexts: one B x N call on a flow whose context embedding is
served apart, against B calls of N samples with one broadcast context each on the same flow
exported with the embedding inside every direction (today's best option before both), side
by side.

Trains a conditional Real NVP on simulation-based inference's Gaussian linear task (the
posterior of 10 parameters given a 10-value observation) with a context embedding of two
hidden layers of 1536 (2.4 x 10^6 multiply-adds per context; ``--embedding-hidden`` sets
other widths), exports it twice (embedding
apart, and inside the directions with ``--no-separate-embedding``), serves both with one
``flowserve serve`` as a user would, and draws B contexts x N samples five ways in
interleaved rounds (the best is kept), printing rows per second and the ratio to the first:

* embedding inside: B Sample calls of N rows, one context each, 8 calls in flight;
* embedding apart: the same B calls;
* embedding inside: one Sample call with ``samples_per_context`` N;
* embedding apart: one Sample call with ``samples_per_context`` N;
* embedding apart: one SampleStream with ``samples_per_context`` N.

It checks that a B x N call gives the samples of the per-context call for the same seed, and
that both exports give the same samples within float32 rounding.

Usage (about 3 minutes on 2 cores)::

    .venv/bin/python benchmarks/per_context.py [--contexts 64] [--per-context 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from gateway import CHANNEL_OPTIONS, Served

from flowserve.cli.build import export, train
from flowserve.export.data import gaussian_linear
from flowserve.export.exporter.parity import scaled_gap
from flowserve.export.exporter.triton_config import ServingConfig
from flowserve.export.training import load_checkpoint
from flowserve.server.client import sample_request
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc

APART, INSIDE = "posterior", "posterior-inside"
EMBEDDED_FEATURES = 16
IN_FLIGHT = 8
WAYS = {  # way: (flow, how)
    "inside_calls": (INSIDE, "calls"),
    "apart_calls": (APART, "calls"),
    "inside_sample": (INSIDE, "sample"),
    "apart_sample": (APART, "sample"),
    "apart_stream": (APART, "stream"),
}


def prepare(folder: Path, steps: int, hidden: list[int]) -> tuple[Path, Path]:
    """The checkpoint and a repository with both exports (kept from an earlier run in the same folder)."""
    repository, checkpoint = folder / "repository", folder / "posterior.pt"
    if not (repository / f"{INSIDE}.flowserve.json").exists():
        with contextlib.redirect_stdout(sys.stderr):
            train("realnvp", "gaussian-linear", steps=steps, output=checkpoint,
                  context_embedding={"features": EMBEDDED_FEATURES, "hidden_features": hidden})
            export(checkpoint, repository, name=APART, serving=ServingConfig(encode=False))
            export(checkpoint, repository, name=INSIDE, serving=ServingConfig(encode=False, separate_embedding=False))
    return checkpoint, repository


def multiply_adds(checkpoint: Path) -> tuple[int, int]:
    """Multiply-adds per row of the model's linear layers: (the context embedding's, the rest's)."""
    model, _ = load_checkpoint(checkpoint)
    layers = [(name, module) for name, module in model.named_modules() if hasattr(module, "in_features")]
    embedding = sum(m.in_features * m.out_features for name, m in layers if name.startswith("context_embedding."))
    return embedding, sum(m.in_features * m.out_features for _, m in layers) - embedding


async def per_call(stub, flow: str, contexts: np.ndarray, n: int, seeds: list[int]) -> np.ndarray:
    """B calls of ``n`` rows, one context each, ``IN_FLIGHT`` at a time; their samples stacked."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(context, seed):
        async with gate:
            response = await stub.Sample(sample_request(flow, n, seed, None, False, context), timeout=300)
        return np.frombuffer(response.samples.data, np.float32).reshape(n, -1)

    return np.stack(await asyncio.gather(*(one(c, s) for c, s in zip(contexts, seeds))))


async def grouped(stub, flow: str, contexts: np.ndarray, n: int, seed: int) -> np.ndarray:
    response = await stub.Sample(sample_request(flow, 0, seed, None, False, contexts, n), timeout=300)
    return np.frombuffer(response.samples.data, np.float32).reshape(len(contexts), n, -1)


async def streamed(stub, flow: str, contexts: np.ndarray, n: int, seed: int) -> np.ndarray:
    chunks = [np.frombuffer(chunk.samples.data, np.float32)
              async for chunk in stub.SampleStream(sample_request(flow, 0, seed, None, False, contexts, n),
                                                   timeout=300)]
    return np.concatenate(chunks).reshape(len(contexts), n, -1)


async def measure(target: str, contexts: np.ndarray, n: int, rounds: int) -> dict[str, float]:
    """The best rows/s of each way over ``rounds`` interleaved rounds, after the checks."""
    rows = len(contexts) * n
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.FlowServiceStub(channel)
        await stub.ListModels(pb.ListModelsRequest(), timeout=60)
        one = await grouped(stub, APART, contexts[:1], n, seed=0)  # the first context's N samples, seed 0
        assert np.array_equal(one, await per_call(stub, APART, contexts[:1], n, [0])), \
            "a B x N call must give the samples of the per-context call"
        gap = scaled_gap(await grouped(stub, INSIDE, contexts[:4], n, seed=1),
                         await grouped(stub, APART, contexts[:4], n, seed=1))
        assert gap <= 1e-4, f"the two exports differ by {gap:.2e}"
        draws = {"calls": lambda flow: per_call(stub, flow, contexts, n, list(range(len(contexts)))),
                 "sample": lambda flow: grouped(stub, flow, contexts, n, seed=0),
                 "stream": lambda flow: streamed(stub, flow, contexts, n, seed=0)}
        best = dict.fromkeys(WAYS, 0.0)
        for _ in range(rounds):
            for way, (flow, how) in WAYS.items():
                started = time.perf_counter()
                await draws[how](flow)
                best[way] = max(best[way], rows / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=64, help="B, the contexts of one call")
    parser.add_argument("--per-context", type=int, default=1000, help="N, the samples of each context")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the best is kept)")
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    parser.add_argument("--embedding-hidden", default="1536,1536", metavar="H1,H2,...",
                        help="hidden widths of the context embedding (its output is 16 values)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the trained and exported flow here and reuse it (default: a temporary folder)")
    args = parser.parse_args()
    print(f"# {platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
          f"grpcio {grpc.__version__}\n", flush=True)
    contexts = gaussian_linear(args.contexts, seed=123)[1]  # B observations
    with contextlib.ExitStack() as stack:
        hidden = [int(width) for width in args.embedding_hidden.split(",")]
        folder = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flowserve-bench-")))
        folder = folder / f"embedding-{'x'.join(map(str, hidden))}"
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint, repository = prepare(folder, args.steps, hidden)
        embedding, rest = multiply_adds(checkpoint)
        served = Served(repository, folder / "serve.log")
        try:
            best = asyncio.run(measure(served.target, contexts, args.per_context, args.rounds))
        finally:
            served.stop()
    print(f"multiply-adds per row: context embedding {embedding:,}, the rest of the flow {rest:,}\n")
    b, n = args.contexts, args.per_context
    labels = {
        "inside_calls": f"embedding inside: {b} `Sample` calls of {n:,} rows, one context each, {IN_FLIGHT} in flight",
        "apart_calls": f"embedding apart: {b} `Sample` calls of {n:,} rows, one context each, {IN_FLIGHT} in flight",
        "inside_sample": f"embedding inside: one `Sample` call, {b} contexts x {n:,}",
        "apart_sample": f"embedding apart: one `Sample` call, {b} contexts x {n:,}",
        "apart_stream": f"embedding apart: one `SampleStream`, {b} contexts x {n:,}",
    }
    print("| way | rows/s | ratio to the first |\n| --- | --- | --- |")
    for way, label in labels.items():
        print(f"| {label} | {best[way]:,.0f} | {best[way] / best['inside_calls']:.2f} |")
    ratio = best["apart_sample"] / best["inside_calls"]
    print(f"\none B x N call, embedding apart, vs {b} calls, embedding inside: {ratio:.1f}x (target >= 5): "
          f"{'met' if ratio >= 5 else 'NOT met'}")


if __name__ == "__main__":
    main()

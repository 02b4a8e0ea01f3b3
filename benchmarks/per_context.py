"""Many samples for each of many contexts: one B x N call against B calls of N samples with one
broadcast context each (today's best option without ``samples_per_context``), side by side.

Trains a conditional RealNVP briefly on the digits (one-hot labels as the context, D=64),
exports it and starts ``flowserve serve`` as a user would. In interleaved rounds (the best is
kept) it draws B contexts x N samples three ways and prints the rows per second of each:

* B Sample calls of N rows, each with one context broadcast to its rows, 8 calls in flight;
* one Sample call with ``samples_per_context`` N;
* one SampleStream with ``samples_per_context`` N.

It also checks that the three give the same samples for the same seeds. The embedding of a
context is not computed apart yet (flowserve's families have no context-embedding network),
so a B x N call still runs the flow's conditioners on B x N context rows: what it saves is
B - 1 calls' overhead.

Usage (about 2 minutes on 2 cores)::

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
from flowserve.server.client import sample_request
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc

FLOW = "realnvp-digits-conditional"
IN_FLIGHT = 8


def prepare(folder: Path, steps: int) -> Path:
    """A repository with the conditional digits flow (kept from an earlier run in the same folder)."""
    repository = folder / "repository"
    if not (repository / f"{FLOW}.flowserve.json").exists():
        with contextlib.redirect_stdout(sys.stderr):
            checkpoint = train("realnvp", "digits-conditional", steps=steps, output=folder / "digits.pt")
            export(checkpoint, repository, name=FLOW)
    return repository


async def per_call(stub, contexts: np.ndarray, n: int, seeds: list[int]) -> np.ndarray:
    """B calls of ``n`` rows, one context each, ``IN_FLIGHT`` at a time; their samples stacked."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(context, seed):
        async with gate:
            response = await stub.Sample(sample_request(FLOW, n, seed, None, False, context), timeout=120)
        return np.frombuffer(response.samples.data, np.float32).reshape(n, -1)

    return np.stack(await asyncio.gather(*(one(c, s) for c, s in zip(contexts, seeds))))


async def grouped(stub, contexts: np.ndarray, n: int, seed: int) -> np.ndarray:
    response = await stub.Sample(sample_request(FLOW, 0, seed, None, False, contexts, n), timeout=120)
    return np.frombuffer(response.samples.data, np.float32).reshape(len(contexts), n, -1)


async def streamed(stub, contexts: np.ndarray, n: int, seed: int) -> np.ndarray:
    chunks = [np.frombuffer(chunk.samples.data, np.float32)
              async for chunk in stub.SampleStream(sample_request(FLOW, 0, seed, None, False, contexts, n),
                                                   timeout=120)]
    return np.concatenate(chunks).reshape(len(contexts), n, -1)


async def measure(target: str, contexts: np.ndarray, n: int, rounds: int) -> dict[str, float]:
    """The best rows/s of each way over ``rounds`` interleaved rounds."""
    rows = len(contexts) * n
    best = {"per_call": 0.0, "sample": 0.0, "stream": 0.0}
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.FlowServiceStub(channel)
        await stub.ListModels(pb.ListModelsRequest(), timeout=60)
        one = await grouped(stub, contexts[:1], n, seed=0)  # the first context's N samples, seed 0
        check = await per_call(stub, contexts[:1], n, [0])
        assert np.array_equal(one, check), "a B x N call must give the samples of the per-context call"
        for _ in range(rounds):
            for way, draw in (("per_call", lambda: per_call(stub, contexts, n, list(range(len(contexts))))),
                              ("sample", lambda: grouped(stub, contexts, n, seed=0)),
                              ("stream", lambda: streamed(stub, contexts, n, seed=0))):
                started = time.perf_counter()
                await draw()
                best[way] = max(best[way], rows / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=64, help="B, the contexts of one call")
    parser.add_argument("--per-context", type=int, default=1000, help="N, the samples of each context")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the best is kept)")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the trained and exported flow here and reuse it (default: a temporary folder)")
    args = parser.parse_args()
    print(f"# {platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
          f"grpcio {grpc.__version__}\n", flush=True)
    labels = np.eye(10, dtype=np.float32)
    contexts = labels[np.arange(args.contexts) % 10]
    with contextlib.ExitStack() as stack:
        folder = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flowserve-bench-")))
        folder.mkdir(parents=True, exist_ok=True)
        served = Served(prepare(folder, args.steps), folder / "serve.log")
        try:
            best = asyncio.run(measure(served.target, contexts, args.per_context, args.rounds))
        finally:
            served.stop()
    what = f"{args.contexts} contexts x {args.per_context} samples"
    print("| way | rows/s | ratio to B calls | target |\n|---|---|---|---|")
    print(f"| {args.contexts} Sample calls of {args.per_context} rows, {IN_FLIGHT} in flight | "
          f"{best['per_call']:,.0f} | 1.00 | |")
    for way, label in (("sample", "one Sample call"), ("stream", "one SampleStream")):
        print(f"| {label}, {what} | {best[way]:,.0f} | {best[way] / best['per_call']:.2f} | "
              f">= 5 with the embedding computed once (not built yet) |")


if __name__ == "__main__":
    main()

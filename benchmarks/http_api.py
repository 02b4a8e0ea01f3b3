"""What the HTTP/JSON API costs beside gRPC: the same calls to one ``flowserve serve``, over
gRPC (grpc.aio), over HTTP with .npy bodies and with JSON bodies (aiohttp's client), measured
side by side in interleaved rounds (the best round is kept) and printed as ratios to gRPC:

* 10^5 rows of the D=64 flow, one call at a time: Sample (25.6 MB of samples back) and
  LogLikelihood (25.6 MB of rows sent; as JSON they would be over the 64 MiB body limit),
  seconds per call; the target is .npy within 1.5x of gRPC's time;
* 64 rows of the moons flow (D=2) per call, 16 calls in flight: LogLikelihood and Sample, rows/s.

Every client decodes its answer to numpy arrays, as a caller would. It reuses the flows of
``benchmarks/gateway.py`` (trained and exported into ``--workdir`` once).

Usage (about 3 minutes on 2 cores)::

    .venv/bin/python benchmarks/http_api.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc
import numpy as np
from gateway import CHANNEL_OPTIONS, DIGITS, MOONS, Served, add_run_options, closed_loop, prepare, table_row

from flowserve.server.gateway.app import run_event_loop
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc
from flowserve.server.protocol.tensors import decode, encode

NPY = "application/x-npy"
LARGE = 100_000


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class Clients:
    """One flow call three ways: each method returns a coroutine function that makes the call
    and decodes the answer's arrays (a tuple)."""

    def __init__(self, stub: pb_grpc.FlowServiceStub, session: aiohttp.ClientSession, http: str):
        self.stub, self.session, self.http = stub, session, http

    def grpc_score(self, model: str, x: np.ndarray):
        request = pb.LogLikelihoodRequest(model=model, x=encode(x))

        async def call():
            return (np.asarray((await self.stub.LogLikelihood(request)).log_prob, np.float32),)
        return call

    def grpc_sample(self, model: str, n: int):
        request = pb.SampleRequest(model=model, num_samples=n, seed=1, return_log_prob=True)

        async def call():
            response = await self.stub.Sample(request)
            return decode(response.samples, "samples"), np.asarray(response.log_prob, np.float32)
        return call

    def http_score(self, model: str, x: np.ndarray, as_npy: bool):
        url = f"{self.http}/v1/models/{model}/log-likelihood"
        body = npy_bytes(x) if as_npy else json.dumps({"x": x.tolist()}).encode()
        headers = {"Content-Type": NPY, "Accept": NPY} if as_npy else {"Content-Type": "application/json"}

        async def call():
            async with self.session.post(url, data=body, headers=headers) as response:
                answer = await response.read()
            return _log_prob(answer, as_npy)
        return call

    def http_sample(self, model: str, n: int, as_npy: bool):
        url = f"{self.http}/v1/models/{model}/sample"
        fields = {"num_samples": n, "seed": 1, "return_log_prob": True}
        headers = {"Accept": NPY} if as_npy else {}

        async def call():
            async with self.session.post(url, json=fields, headers=headers) as response:
                answer = await response.read()
            if as_npy:
                table = np.load(io.BytesIO(answer))
                return table["samples"], table["log_prob"]
            document = json.loads(answer)
            return np.asarray(document["samples"], np.float32), np.asarray(document["log_prob"], np.float32)
        return call


def _log_prob(answer: bytes, as_npy: bool) -> tuple[np.ndarray]:
    if as_npy:
        return (np.load(io.BytesIO(answer))["log_prob"],)
    return (np.asarray(json.loads(answer)["log_prob"], np.float32),)


async def seconds_per_call(calls: dict, rounds: int, repeats: int) -> dict[str, float]:
    """The best round's mean seconds per call of each of ``calls``, one call at a time."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            for _ in range(repeats):
                await call()
            best[name] = min(best[name], (time.perf_counter() - started) / repeats)
    return best


async def rows_per_second(calls: dict, rows: int, concurrency: int, rounds: int, seconds: float) -> dict[str, float]:
    best = dict.fromkeys(calls, 0.0)
    for _ in range(rounds):
        for name, call in calls.items():
            done, _ = await closed_loop(call, concurrency, seconds)
            best[name] = max(best[name], done * rows / seconds)
    return best


async def measure(served: Served, http: str, args) -> list[str]:
    """Every comparison against the running ``served``; rows of the results table."""
    rng = np.random.default_rng(0)
    wide = rng.uniform(0, 16, (LARGE, 64)).astype(np.float32)
    points = rng.normal(size=(64, 2)).astype(np.float32)
    rows = []
    async with grpc.aio.insecure_channel(served.target, options=CHANNEL_OPTIONS) as channel, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        clients = Clients(pb_grpc.FlowServiceStub(channel), session, http)
        large = {
            "Sample": {"gRPC": clients.grpc_sample(DIGITS, LARGE), ".npy": clients.http_sample(DIGITS, LARGE, True),
                       "JSON": clients.http_sample(DIGITS, LARGE, False)},
            # As JSON these rows are about 120 MB, over the 64 MiB body limit: .npy only.
            "LogLikelihood": {"gRPC": clients.grpc_score(DIGITS, wide),
                              ".npy": clients.http_score(DIGITS, wide, True)},
        }
        small = {
            "LogLikelihood": {"gRPC": clients.grpc_score(MOONS, points),
                              ".npy": clients.http_score(MOONS, points, True),
                              "JSON": clients.http_score(MOONS, points, False)},
            "Sample": {"gRPC": clients.grpc_sample(MOONS, 64), ".npy": clients.http_sample(MOONS, 64, True),
                       "JSON": clients.http_sample(MOONS, 64, False)},
        }
        for calls in large.values():  # the same numbers every way, and warm
            first, *others = [await call() for call in calls.values()]
            for answer in others:
                for got, want in zip(answer, first, strict=True):
                    np.testing.assert_array_equal(got, want)
        for calls in small.values():
            for call in calls.values():
                await closed_loop(call, 4, 0.3)
        for method, calls in large.items():
            times = await seconds_per_call(calls, args.rounds, repeats=2)
            for way, target in ((".npy", "<= 1.5"), ("JSON", "")):
                if way not in times:
                    continue
                rows.append(table_row(f"{method} of {LARGE:,} rows (D=64), s per call: HTTP {way} (vs gRPC)",
                                      f"{times[way]:.3f}", f"{times['gRPC']:.3f}",
                                      f"{times[way] / times['gRPC']:.2f}", target))
        for method, calls in small.items():
            rates = await rows_per_second(calls, 64, 16, args.rounds, args.seconds)
            for way in (".npy", "JSON"):
                rows.append(table_row(f"{method} rows/s, 64 rows (D=2) x 16 in flight: HTTP {way} (vs gRPC)",
                                      f"{rates[way]:,.0f}", f"{rates['gRPC']:,.0f}",
                                      f"{rates[way] / rates['gRPC']:.2f}", ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="flowserve-http-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    six, _ = prepare(workdir, args.steps)
    served = Served(six, workdir / "serve.log")
    try:
        rows = run_event_loop(measure(served, served.http_url, args))
    finally:
        served.stop()
    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
          f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, grpcio {grpc.__version__}")
    print("| measure | HTTP | gRPC | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Back-pressure under a burst: a model's capacity through the gateway, then 5x that offered.

It starts ``flowserve serve`` on a repository (by default the moons flow of
``benchmarks/gateway.py``, trained and exported on first use), and for one model:

1. measures its capacity: Sample calls of ``--rows`` rows from ``--concurrency`` closed-loop
   callers, in calls per second;
2. offers ``--factor`` times that for ``--seconds``, open loop (calls start on a fixed
   schedule whatever the answers), and reports how the calls ended: the rejected ones
   (RESOURCE_EXHAUSTED, with their retry hint) and how long they took, apart from those
   admitted but refused when they had waited the queue timeout out ("expired"), and the
   admitted ones' latency beside an unloaded call's.

    .venv/bin/python benchmarks/burst.py     # about 1 min on 2 cores, most of it training and exporting;
                                             # 13 s with --workdir DIR once DIR holds the flows
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from gateway import CHANNEL_OPTIONS, MOONS, Served, closed_loop, prepare

from flowserve.server.client import sample_request
from flowserve.server.gateway.batching import EXPIRED_IN_QUEUE
from flowserve.server.protocol.names import RETRY_AFTER_KEY
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc


async def offer(call, rate: float, seconds: float) -> list[tuple[str, float, int | None]]:
    """Start ``call()`` ``rate`` times a second for ``seconds``; each call's outcome (a status
    name, or EXPIRED), latency in seconds and retry hint in ms (None without one)."""
    outcomes = []

    async def one():
        started = time.perf_counter()
        try:
            await call()
            outcomes.append(("OK", time.perf_counter() - started, None))
        except grpc.aio.AioRpcError as error:
            hint = dict(error.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
            outcome = "EXPIRED" if EXPIRED_IN_QUEUE in (error.details() or "") else error.code().name
            outcomes.append((outcome, time.perf_counter() - started, None if hint is None else int(hint)))

    tasks = []
    start = time.perf_counter()
    for index in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    return outcomes


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


async def measure(target: str, model: str, rows: int, concurrency: int, factor: float, seconds: float) -> dict:
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.FlowServiceStub(channel)
        request = sample_request(model, rows, 0, None, False, None)

        async def call():
            await stub.Sample(request, timeout=30)

        for _ in range(20):  # warm the connection and the batcher
            await call()
        unloaded = (await closed_loop(call, 1, 1.0))[1]
        done, _ = await closed_loop(call, concurrency, seconds)
        capacity = done / seconds
        outcomes = await offer(call, factor * capacity, seconds)
    admitted = [latency for code, latency, _ in outcomes if code == "OK"]
    rejected = [latency for code, latency, _ in outcomes if code == "RESOURCE_EXHAUSTED"]
    expired = [latency for code, latency, _ in outcomes if code == "EXPIRED"]
    hints = [hint for code, _, hint in outcomes if code in ("RESOURCE_EXHAUSTED", "EXPIRED") and hint is not None]
    return {
        "capacity_calls_per_s": capacity,
        "offered_calls_per_s": factor * capacity,
        "codes": dict(Counter(code for code, _, _ in outcomes)),
        "unloaded_p50_ms": percentile_ms(unloaded, 50),
        "admitted_p50_ms": percentile_ms(admitted, 50),
        "admitted_p99_ms": percentile_ms(admitted, 99),
        "rejected_p50_ms": percentile_ms(rejected, 50),
        "rejected_p99_ms": percentile_ms(rejected, 99),
        "expired_p50_ms": percentile_ms(expired, 50),
        "rejected_with_hint": len(hints),
        "retry_hint_p50_ms": float(np.median(hints)) if hints else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="serve this repository (default: the moons flow, "
                                                        "trained and exported on first use into --workdir)")
    parser.add_argument("--model", default=MOONS)
    parser.add_argument("--rows", type=int, default=4096, help="rows per Sample call")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop callers for the capacity")
    parser.add_argument("--factor", type=float, default=5.0, help="the burst's rate over the capacity")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the capacity run and of the burst")
    parser.add_argument("--workdir", type=Path, default=None, help="as for benchmarks/gateway.py")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=None, help="passed to flowserve serve")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        folder = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flowserve-burst-")))
        folder.mkdir(parents=True, exist_ok=True)
        repository = args.repository or prepare(folder, 300)[1]
        options = () if args.max_concurrent_rpcs is None else ("--max-concurrent-rpcs", str(args.max_concurrent_rpcs))
        served = Served(repository, folder / "serve-burst.log", *options)
        try:
            figures = asyncio.run(measure(served.target, args.model, args.rows, args.concurrency, args.factor,
                                          args.seconds))
        finally:
            served.stop()
    if args.json:
        print(json.dumps(figures))
        return
    print(f"# {platform.machine()}, Python {platform.python_version()}: {args.model}, Sample of {args.rows} rows\n")
    print(f"capacity: {figures['capacity_calls_per_s']:.0f} calls/s ({args.concurrency} callers); "
          f"burst: {figures['offered_calls_per_s']:.0f} calls/s offered for {args.seconds:g} s")
    print(f"answers: {figures['codes']}")
    print(f"admitted: p50 {figures['admitted_p50_ms']:.1f} ms, p99 {figures['admitted_p99_ms']:.1f} ms "
          f"(unloaded p50 {figures['unloaded_p50_ms']:.1f} ms)")
    print(f"rejected: p50 {figures['rejected_p50_ms']:.1f} ms, p99 {figures['rejected_p99_ms']:.1f} ms; "
          f"expired in the queue: p50 {figures['expired_p50_ms']:.0f} ms; "
          f"retry hint p50 {figures['retry_hint_p50_ms']:.0f} ms")


if __name__ == "__main__":
    main()

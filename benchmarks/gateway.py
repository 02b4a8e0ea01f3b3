"""What the gateway costs: ``flowserve serve`` measured side by side with Triton called
directly, with in-process ONNX Runtime, and with itself (batching on and off), in one run.

Trains RealNVP briefly on two moons (D=2) and on digits (D=64), exports six flows (the
moons flow as ``realnvp``, again with ``--no-dynamic-batching``, three more copies, and
the digits flow) and starts ``flowserve serve`` as a user would. Every comparison runs in
interleaved rounds in this one process (gRPC asyncio clients; the best round is kept) and
is printed as a ratio beside the issue's target:

* LogLikelihood, 64 rows per call, 16 calls in flight: gateway rows/s / Triton-direct rows/s
  (Triton's own gRPC API, the same rows as raw bytes);
* one row at a time: p50 and p99 latency, gateway and Triton-direct;
* one row per call, 64 calls in flight: batching on / off (``--no-dynamic-batching``);
* 4096-row calls, one at a time: gateway rows/s / in-process ONNX Runtime rows/s on the
  same graph with one intra-op thread per core;
* Sample of 10^5 rows of the digits flow: what it adds to the gateway's peak RSS, against
  the response's size; and 10^6 rows through SampleStream;
* cold start (``flowserve serve`` until it answers) with one flow and with six.

Usage (about 4 minutes on 2 cores)::

    .venv/bin/python benchmarks/gateway.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_grpc

from flowserve.cli.build import export, train
from flowserve.contract.metadata import SUFFIX
from flowserve.export.exporter.triton_config import ServingConfig
from flowserve.server.gateway.app import run_event_loop
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc
from flowserve.server.protocol.tensors import MAX_MESSAGE_BYTES, encode
from flowserve.server.triton.launcher import free_port

MOONS, UNBATCHED, DIGITS = "realnvp", "realnvp-unbatched", "realnvp-digits"
COPIES = ("realnvp-2", "realnvp-3", "realnvp-4")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def prepare(folder: Path, steps: int) -> tuple[Path, Path]:
    """A repository with the six flows and one with the moons flow alone (kept from an
    earlier run in the same folder)."""
    six, one = folder / "six", folder / "one"
    if (one / f"{MOONS}{SUFFIX}").exists() and (six / f"{DIGITS}{SUFFIX}").exists():
        return six, one
    with contextlib.redirect_stdout(sys.stderr):
        moons = train("realnvp", "moons", steps=steps, output=folder / "moons.pt")
        digits = train("realnvp", flat_digits(folder), steps=steps, output=folder / "digits.pt")
        export(moons, one, name=MOONS)
        export(moons, six, name=MOONS)
        export(moons, six, name=UNBATCHED, serving=ServingConfig(dynamic_batching=False))
        for name in COPIES:
            export(moons, six, name=name)
        export(digits, six, name=DIGITS)
    return six, one


def flat_digits(folder: Path) -> Path:
    """The digits as [N, 64] rows with uniform noise: a D=64 flow of fully connected layers."""
    from flowserve.export.data import digits

    images = digits()[0]
    rows = images.reshape(len(images), -1) + np.random.default_rng(0).uniform(0, 1, (len(images), 64))
    np.save(folder / "digits-64.npy", rows.astype(np.float32))
    return folder / "digits-64.npy"


class Served:
    """``flowserve serve`` in a child process, as a user starts it (with ``options``).

    It runs in the log's folder: ``python -m`` puts the working directory first on sys.path,
    and a checkout's flowserve/ folder must not shadow the installed package."""

    def __init__(self, repository: Path, log: Path, *options: str):
        self.port, metrics_port, http_port = free_port(), free_port(), free_port()
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flowserve.cli", "serve", "--model-repository", str(Path(repository).resolve()),
             "--port", str(self.port), "--metrics-port", str(metrics_port), "--http-port", str(http_port), *options],
            stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True, cwd=Path(log).resolve().parent)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.triton_url = None
        for line in self.process.stdout:
            if match := re.match(r"Triton ready: gRPC (\S+),", line):
                self.triton_url = match.group(1)
            if line.startswith("gateway ready"):
                break
        else:
            raise SystemExit(f"flowserve serve exited with code {self.process.wait()}; see {log}")
        self.ready_s = time.perf_counter() - started
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(60)

    def reset_peak_rss(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def rss_mib(self, field: str) -> float:
        """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of the gateway, in MiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


class EmptyServer(pb_grpc.FlowServiceServicer):
    """A Python gRPC server that answers LogLikelihood with 64 zeros and does nothing else: what
    one hop through grpc.aio costs on this machine, the floor under any Python gateway."""

    async def LogLikelihood(self, request, context):
        return pb.LogLikelihoodResponse(log_prob=[0.0] * 64)

    @staticmethod
    def serve(port: int) -> None:
        async def run():
            server = grpc.aio.server(options=CHANNEL_OPTIONS)
            pb_grpc.add_FlowServiceServicer_to_server(EmptyServer(), server)
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            await server.wait_for_termination()

        run_event_loop(run())


async def closed_loop(call, concurrency: int, seconds: float) -> tuple[int, list[float]]:
    """``concurrency`` callers, each calling again as soon as its call returns, for ``seconds``:
    the calls completed and their latencies in seconds."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def caller():
        while (started := time.perf_counter()) < end:
            await call()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies), latencies


def triton_request(model: str, rows: np.ndarray) -> triton_pb.ModelInferRequest:
    """Triton's own inference request for a density model: the rows as raw bytes."""
    request = triton_pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(rows.shape))
    request.outputs.add(name="log_prob")
    request.raw_input_contents.append(np.ascontiguousarray(rows, np.float32).tobytes())
    return request


def table_row(what: str, gateway: str, reference: str, ratio: str, target: str) -> str:
    return f"| {what} | {gateway} | {reference} | {ratio} | {target} |"


async def measure(served: Served, empty_target: str, args, points: np.ndarray) -> list[str]:
    """Every comparison against the running ``served`` (and the empty server at
    ``empty_target``); rows of the results table."""
    rows = []
    async with grpc.aio.insecure_channel(served.target, options=CHANNEL_OPTIONS) as gateway_channel, \
            grpc.aio.insecure_channel(served.triton_url, options=CHANNEL_OPTIONS) as triton_channel, \
            grpc.aio.insecure_channel(empty_target, options=CHANNEL_OPTIONS) as empty_channel:
        gateway, triton = pb_grpc.FlowServiceStub(gateway_channel), triton_grpc.GRPCInferenceServiceStub(triton_channel)
        empty = pb_grpc.FlowServiceStub(empty_channel)

        def scores(model: str, n: int):
            request = pb.LogLikelihoodRequest(model=model, x=encode(points[:n]))
            return lambda: gateway.LogLikelihood(request)

        def direct(n: int):
            request = triton_request(f"{MOONS}-density", points[:n])
            return lambda: triton.ModelInfer(request)

        async def best_rates(calls: dict, rows_per_call: int, concurrency: int) -> dict[str, float]:
            rates = dict.fromkeys(calls, 0.0)
            for _ in range(args.rounds):
                for name, call in calls.items():
                    done, _ = await closed_loop(call, concurrency, args.seconds)
                    rates[name] = max(rates[name], done * rows_per_call / args.seconds)
            return rates

        def nothing(n: int):
            request = pb.LogLikelihoodRequest(model=MOONS, x=encode(points[:n]))
            return lambda: empty.LogLikelihood(request)

        for call in (scores(MOONS, 64), scores(UNBATCHED, 1), direct(64), nothing(64)):  # warm up channels, models
            await closed_loop(call, 4, 0.3)

        rates = await best_rates({"gateway": scores(MOONS, 64), "direct": direct(64), "empty": nothing(64)}, 64, 16)
        rows.append(table_row("LogLikelihood rows/s, 64 rows x 16 in flight (vs Triton-direct)",
                              f"{rates['gateway']:,.0f}", f"{rates['direct']:,.0f}",
                              f"{rates['gateway'] / rates['direct']:.2f}", ">= 0.7"))
        rows.append(table_row("the same through an empty Python gRPC server (vs Triton-direct)",
                              f"{rates['empty']:,.0f}", f"{rates['direct']:,.0f}",
                              f"{rates['empty'] / rates['direct']:.2f}", ""))

        latencies = {"gateway": [], "direct": [], "empty": []}
        for _ in range(args.rounds):
            for name, call in (("gateway", scores(MOONS, 1)), ("direct", direct(1)), ("empty", nothing(1))):
                latencies[name] += (await closed_loop(call, 1, args.seconds / 2))[1]
        p50 = {name: 1e3 * statistics.median(values) for name, values in latencies.items()}
        p99 = {name: 1e3 * float(np.quantile(values, 0.99)) for name, values in latencies.items()}
        rows.append(table_row("1-row latency p50, ms (vs Triton-direct)", f"{p50['gateway']:.2f}",
                              f"{p50['direct']:.2f}", f"+{p50['gateway'] - p50['direct']:.2f} ms", "<= +0.6 ms"))
        rows.append(table_row("1-row latency p99, ms (vs Triton-direct)", f"{p99['gateway']:.2f}",
                              f"{p99['direct']:.2f}", f"+{p99['gateway'] - p99['direct']:.2f} ms", ""))
        rows.append(table_row("1-row round trip p50 / p99 to the empty gRPC server, ms", f"{p50['empty']:.2f}",
                              f"{p99['empty']:.2f}", "", ""))

        rates = await best_rates({"on": scores(MOONS, 1), "off": scores(UNBATCHED, 1)}, 1, 64)
        rows.append(table_row("1-row LogLikelihood rows/s, 64 in flight (batching on vs off)",
                              f"{rates['on']:,.0f}", f"{rates['off']:,.0f}", f"{rates['on'] / rates['off']:.2f}",
                              ">= 4"))

        rows += await large_requests(served, gateway, triton, points, args)
        rows += await sample_memory(served, gateway)
    return rows


async def large_requests(served: Served, gateway, triton, points: np.ndarray, args) -> list[str]:
    """4096-row calls through the gateway against the same graphs run in this process, and
    (for the density) through Triton directly."""
    cores = len(os.sched_getaffinity(0))
    options = ort.SessionOptions()
    options.intra_op_num_threads = cores
    repository = Path(served.process.args[served.process.args.index("--model-repository") + 1])
    sessions = {d: ort.InferenceSession(str(repository / f"{MOONS}-{d}" / "1" / "model.onnx"), options)
                for d in ("density", "generation")}
    n = 4096
    x = points[:n]
    z = np.random.default_rng(0).standard_normal((n, 2), dtype=np.float32)
    score = pb.LogLikelihoodRequest(model=MOONS, x=encode(x))
    sample = pb.SampleRequest(model=MOONS, num_samples=n, seed=1, return_log_prob=True)
    direct = triton_request(f"{MOONS}-density", x)
    calls = {
        "density gateway": lambda: gateway.LogLikelihood(score),
        "density Triton-direct": lambda: triton.ModelInfer(direct),
        "density in-process": lambda: asyncio.to_thread(sessions["density"].run, None, {"x": x}),
        "generation gateway": lambda: gateway.Sample(sample),
        "generation in-process": lambda: asyncio.to_thread(sessions["generation"].run, None, {"z": z}),
    }
    rates = dict.fromkeys(calls, 0.0)
    for _ in range(args.rounds):
        for name, call in calls.items():
            done, _ = await closed_loop(call, 1, args.seconds / 2)
            rates[name] = max(rates[name], done * n / (args.seconds / 2))
    return [table_row(f"{n}-row {rpc} rows/s, one at a time (vs in-process ONNX Runtime, {cores} threads)",
                      f"{rates[f'{d} gateway']:,.0f}", f"{rates[f'{d} in-process']:,.0f}",
                      f"{rates[f'{d} gateway'] / rates[f'{d} in-process']:.2f}", ">= 0.85")
            for rpc, d in (("LogLikelihood", "density"), ("Sample", "generation"))] + [
        table_row(f"the same {n}-row density through Triton-direct (vs in-process ONNX Runtime)",
                  f"{rates['density Triton-direct']:,.0f}", f"{rates['density in-process']:,.0f}",
                  f"{rates['density Triton-direct'] / rates['density in-process']:.2f}", "")]


async def sample_memory(served: Served, gateway) -> list[str]:
    """What one 10^5-row Sample of the D=64 flow adds to the gateway's peak RSS, and the peak
    RSS of streaming 10^5 and 10^6 samples of the moons flow."""
    async def added_peak(work) -> tuple[float, float]:
        before = served.rss_mib("VmRSS")
        served.reset_peak_rss()
        await work()
        return served.rss_mib("VmHWM") - before, served.rss_mib("VmHWM")

    async def unary():
        nonlocal size
        response = await gateway.Sample(pb.SampleRequest(model=DIGITS, num_samples=n, seed=0, return_log_prob=True))
        size = (len(response.samples.data) + 4 * len(response.log_prob)) / 2**20

    def stream(rows: int):
        async def work():
            async for _ in gateway.SampleStream(pb.SampleRequest(model=MOONS, num_samples=rows, seed=0)):
                pass
        return work

    n, size = 100_000, 0.0
    await gateway.Sample(pb.SampleRequest(model=DIGITS, num_samples=1000, seed=0))
    await stream(10_000)()
    added, _ = await added_peak(unary)
    streamed = {rows: await added_peak(stream(rows)) for rows in (10**5, 10**6)}
    return [table_row(f"Sample of {n:,} rows (D=64): added peak RSS, MiB (vs response size)",
                      f"{added:.0f}", f"{size:.1f}", f"{added / size:.1f}x", "<= ~2x"),
            table_row("SampleStream of 10^6 rows (D=2): the gateway's peak RSS, MiB (vs 10^5 rows)",
                      f"{streamed[10**6][1]:.0f}", f"{streamed[10**5][1]:.0f}",
                      f"+{streamed[10**6][0] - streamed[10**5][0]:.1f} MiB", "<= 300 MB, flat")]


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of a run over the flows of :func:`prepare`: rounds, their length, the flows' folder."""
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one timed round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the best is kept)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per flow")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the trained and exported flows here and reuse them in later runs "
                             "(default: a temporary folder)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser)
    parser.add_argument("--empty-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.empty_server:
        EmptyServer.serve(args.empty_server)
        return
    print(f"# {platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
          f"grpcio {grpc.__version__}, onnxruntime {ort.__version__}\n", flush=True)
    with contextlib.ExitStack() as stack:
        folder = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flowserve-bench-")))
        folder.mkdir(parents=True, exist_ok=True)
        six, one = prepare(folder, args.steps)
        points = moons_points()
        served = Served(six, folder / "serve.log")
        empty_port = free_port()
        empty = subprocess.Popen([sys.executable, __file__, "--empty-server", str(empty_port)])
        try:
            rows = asyncio.run(measure(served, f"127.0.0.1:{empty_port}", args, points))
        finally:
            served.stop()
            empty.terminate()
            empty.wait()
        cold = {"one": [], "six": []}
        for _ in range(2):
            for name, repository in (("one", one), ("six", six)):
                start = Served(repository, folder / f"cold-{name}.log")
                cold[name].append(start.ready_s)
                start.stop()
        rows.append(table_row("cold start, s: six flows (vs one flow)", f"{min(cold['six']):.1f}",
                              f"{min(cold['one']):.1f}", f"{min(cold['six']) / min(cold['one']):.2f}", "six <= 5 s"))
    print("| measure | gateway | reference | ratio | target |\n|---|---|---|---|---|")
    print("\n".join(rows))


def moons_points(n: int = 4096) -> np.ndarray:
    from flowserve.export.data import two_moons

    return two_moons(n, noise=0.05, seed=1)


if __name__ == "__main__":
    main()

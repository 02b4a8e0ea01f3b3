"""The GPU check: flowserve's serving path on a GPU box, correctness first, then speed.

Two steps, because the GPU box (no network, at most 64 MiB carried) lacks what exports ONNX
and what installs Triton:

``prepare`` (here, with the project's environment) trains a RealNVP (D=2, two moons) and a
MAF (D=64) briefly, exports each to TorchScript and ONNX on CPU and GPU instances, writes
their inputs and float64 references, and gathers the wheels the box lacks (nvidia-pytriton,
tritonclient, gRPC's health and reflection, tqdm and flowserve itself) into ``DIR``
(default ``.gpucheck``, which git ignores)::

    .venv/bin/python benchmarks/gpu_check.py prepare

``run`` (on the box, after installing the wheels) writes its JSON to ``--out`` after every
phase, so a run cut short still reports what it saw, and exits 1 if a correctness check
failed::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpucheck/wheels/*.whl
    PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py run --out $OUT/gpu_check.json

Phases of ``run``:

* environment: versions, the GPU, and whether the committed gRPC stubs import here;
* doctor: ``flowserve doctor --json`` over the repository;
* triton: which models loaded; the ONNX models on GPU instances must be refused (the box's
  ONNX Runtime has no CUDA provider), every other model must load;
* correctness: every loaded model (density, generation, encode), called on Triton at 1, 64,
  100 (padded to a CUDA-graph bucket) and 4096 rows, against the float64 references: scaled
  gap at most 1e-4;
* cuda_graphs: rows/s of each TorchScript direction on the GPU at 4096 and 65536 rows, the
  runner's session with and without CUDA graphs, interleaved call by call;
* gateway: LogLikelihood of 64 rows with 16 calls in flight (from 4 client processes):
  Triton-direct, the gateway with 1 worker and with N workers, interleaved rounds;
* nvml: the gateway's GPU memory metric against ``nvidia-smi``.

``run --cpu-only`` leaves out the GPU models and phases: the same path on a machine without
a GPU (tests/e2e/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLOWS = {"rnvp": ("realnvp", "moons"), "maf": ("maf", "gaussian-64")}
VARIANTS = {  # name suffix: (format, instance kind); one ONNX flow on GPU instances, to be refused at load
    "ts-gpu": ("torchscript", "gpu"), "ts-cpu": ("torchscript", "cpu"), "onnx-cpu": ("onnx", "cpu"),
}
REFUSED_VARIANT = {"rnvp": {"onnx-gpu": ("onnx", "gpu")}}  # what fits in the 64 MiB carried
CHECK_ROWS = (1, 64, 100, 4096)
TOLERANCE = 1e-4  # the export's own parity bound, on the same scaled gap
TIMED_ROWS = (4096, 65536)
IN_FLIGHT, CLIENT_PROCESSES, GATEWAY_ROWS = 16, 4, 64
# What the box lacks (tritonclient's gRPC client needs rapidjson and packaging too), and the
# grpcio and protobuf the committed stubs are tested with here, which then take the place of
# the box's own whatever their versions: 47 MiB with the slimmed nvidia-pytriton.
WHEELS = ("nvidia-pytriton==0.7.0", "tritonclient==2.73.0", "python-rapidjson==1.23", "packaging==25.0",
          "grpcio-health-checking==1.81.1", "grpcio-reflection==1.81.1", "tqdm==4.70.1", "grpcio==1.85.1",
          "protobuf==6.33.6")
BOX_PYTHON = "3.12"


# ---------------------------------------------------------------- prepare (the development machine)

def prepare(directory: Path, steps: int, wheels: bool = True) -> None:
    """Export, write inputs and references, and (with ``wheels``) gather the wheels into
    ``directory``."""
    import torch

    from flowserve.cli.build import export
    from flowserve.contract.spec import GENERATION
    from flowserve.export.exporter.graphs import GRAPHS, model_spec, prepared_copy, served_directions
    from flowserve.export.exporter.triton_config import ServingConfig

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    references = {}
    with tempfile.TemporaryDirectory(prefix="flowserve-gpu-check-") as scratch:
        for flow, (family, data) in FLOWS.items():
            model, checkpoint = train_small(family, data, steps, Path(scratch))
            for variant, (fmt, kind) in {**VARIANTS, **REFUSED_VARIANT.get(flow, {})}.items():
                export(checkpoint, directory / "repository", name=f"{flow}-{variant}",
                       serving=ServingConfig(format=fmt, instance_kind=kind))
            # The data rows (for density and encode) are the flow's own samples; z is fresh noise.
            noise = [rng.standard_normal((max(CHECK_ROWS), model.noise_dim)).astype(np.float32) for _ in range(2)]
            with torch.no_grad():
                references[f"{flow}/x"] = GRAPHS[GENERATION](prepared_copy(model))(torch.from_numpy(noise[0]))[0].numpy()
            references[f"{flow}/z"] = noise[1]
            for direction in served_directions(model):
                spec = model_spec(model, direction)
                with torch.no_grad():
                    outputs = GRAPHS[direction](prepared_copy(model).double())(
                        torch.from_numpy(references[f"{flow}/{spec.input_names[0]}"]).double())
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                # float32 keeps the float64 reference to 6e-8 relative, far inside the tolerance
                references.update({f"{flow}/{direction}/{name}": output.float().numpy()
                                   for name, output in zip(spec.output_names, outputs)})
    np.savez(directory / "references.npz", **references)
    if wheels:
        gather_wheels(directory / "wheels")
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    print(f"prepared {directory}: {size / 2**20:.1f} MiB{' with the wheels' if wheels else ''}; carry it with "
          f"the working tree (64 MiB in all)")


def train_small(family: str, data: str, steps: int, scratch: Path):
    """``family`` trained briefly on ``data`` (``gaussian-64``: correlated Gaussian rows),
    with one hidden layer of 64 units, so that its eight exports stay small enough to carry;
    returns the model and its checkpoint."""
    import torch

    from flowserve.export.data import load_dataset, summarize
    from flowserve.export.flows.registry import build_flow, default_flow_config
    from flowserve.export.training import TrainConfig, save_checkpoint, train_flow

    if data == "gaussian-64":
        rng = np.random.default_rng(0)
        np.save(scratch / f"{data}.npy", (rng.normal(size=(4000, 64)) @ (rng.normal(size=(64, 64)) / 8))
                .astype(np.float32))
        data = str(scratch / f"{data}.npy")
    dataset = load_dataset(data, seed=0)
    torch.manual_seed(0)
    model = build_flow({**default_flow_config(family, dataset), "hidden_features": [64]})
    metrics = train_flow(model, dataset, TrainConfig(steps=steps, seed=0))
    checkpoint = scratch / f"{family}.pt"
    save_checkpoint(checkpoint, model, data_summary=summarize(dataset.train), metrics=metrics, dataset=dataset.name,
                    heldout=dataset.test, heldout_context=dataset.test_context)
    return model.eval(), checkpoint


def gather_wheels(target: Path) -> None:
    """The wheels the GPU box lacks, for its Python 3.12, and flowserve's own."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    platforms = [f"--platform={p}" for p in ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64",
                                             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")]
    for wheel in WHEELS:  # one at a time: pip matches all platforms of a call against every wheel
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version=3.12", "--implementation=cp", *platforms, "-d", str(target), wheel],
                       check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(target), str(ROOT)], check=True)
    (pytriton,) = target.glob("nvidia_pytriton-*.whl")
    slim_pytriton(pytriton)


def slim_pytriton(wheel: Path) -> None:
    """Rewrite nvidia-pytriton's wheel without the Python stubs the box does not run, and the
    libpython 3.13 that only the 3.13 stub loads: 15 of its 53 MiB."""
    def dropped(name: str) -> bool:
        stub = name.split("python_backend_stubs/")[1].split("/")[0] if "python_backend_stubs/" in name else None
        return (stub is not None and stub != BOX_PYTHON) or name.startswith("nvidia_pytriton.libs/libpython3")

    import zipfile

    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as copy:
        for item in source.infolist():
            if dropped(item.filename):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not dropped(line.split(",")[0])).encode()
            copy.writestr(item, data)
    slim.replace(wheel)


# ---------------------------------------------------------------- run (the GPU box)

class Report:
    """The JSON of results, rewritten after every phase."""

    def __init__(self, path: Path):
        self.path = path
        self.data = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "phases": {}, "failures": []}

    def phase(self, name: str, function, *args):
        """Run one phase; its result (or its error) goes into the report, which is written."""
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = function(*args)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a phase that breaks must not lose the others
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            self.data["failures"].append(f"{name}: {result['error']}")
        result = result if isinstance(result, dict) else {"result": result}
        result["seconds"] = round(time.perf_counter() - started, 1)
        self.data["phases"][name] = result
        self.write()
        print(json.dumps({k: v for k, v in result.items() if k != "traceback"}, default=str)[:4000], flush=True)
        return result

    def fail(self, message: str) -> None:
        self.data["failures"].append(message)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


def environment() -> dict:
    import grpc
    import onnxruntime
    import torch

    found = {"python": platform.python_version(), "machine": platform.machine(), "cores": os.cpu_count(),
             "numpy": np.__version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cuda_devices": torch.cuda.device_count(), "grpcio": grpc.__version__,
             "onnxruntime": onnxruntime.__version__, "onnxruntime_providers": onnxruntime.get_available_providers()}
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    for module in ("google.protobuf", "tritonclient", "pytriton", "grpc_health", "uvloop", "pynvml"):
        try:
            found[module] = getattr(__import__(module, fromlist=["_"]), "__version__", "present")
        except ImportError as exc:
            found[module] = f"missing: {exc}"
    try:  # the committed stubs were generated for a protobuf and grpcio of their own
        from flowserve.server.protocol.proto import flowserve_pb2, flowserve_pb2_grpc  # noqa: F401
        found["committed_stubs"] = "import"
    except Exception as exc:  # noqa: BLE001
        found["committed_stubs"] = f"{type(exc).__name__}: {exc}"
    return found


def doctor(repository: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "flowserve.cli", "doctor", "--model-repository", str(repository),
                           "--json"], capture_output=True, text=True, timeout=180, cwd=repository.parent)
    try:
        checks = json.loads(done.stdout)["checks"]
    except (json.JSONDecodeError, KeyError):
        return {"exit_code": done.returncode, "stdout": done.stdout[-2000:], "stderr": done.stderr[-2000:]}
    return {"exit_code": done.returncode, "checks": [f"{c['status']}: {c['name']}: {c['detail']}" for c in checks]}


def serving_repository(prepared: Path, target: Path, cpu_only: bool) -> Path:
    """A copy of the prepared repository; with ``cpu_only``, without the GPU variants."""
    shutil.copytree(prepared, target)
    if cpu_only:
        for path in target.iterdir():
            if "-gpu" in path.name:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return target


def triton_phase(triton, report: Report) -> dict:
    triton.start(ready_timeout=240)
    failed = dict(triton.failed_models)
    for model in sorted(p.parent.name for p in Path(triton.model_repository).glob("*/config.pbtxt")):
        refused = model in failed
        if "-onnx-gpu-" in model:
            if not refused or "no CUDA execution provider" not in failed[model]:
                report.fail(f"{model}: expected a refusal at load (no CUDA provider), got "
                            f"{failed.get(model, 'loaded')}")
        elif refused:
            report.fail(f"{model} did not load: {failed[model]}")
    return {"grpc": triton.grpc_url, "failed_models": failed}


def correctness(triton_url: str, references: dict, loaded: list[str], report: Report) -> dict:
    import tritonclient.grpc as triton_client

    from flowserve.contract.spec import direction_spec
    from flowserve.export.exporter.parity import scaled_gap

    client = triton_client.InferenceServerClient(triton_url)
    gaps = {}
    for model in loaded:
        flow, direction = model.split("-")[0], model.rsplit("-", 1)[1]
        spec = direction_spec(direction, references[f"{flow}/x"].shape[1], noise_dim=references[f"{flow}/z"].shape[1])
        source = references[f"{flow}/{spec.input_names[0]}"]
        names = spec.output_names
        for rows in CHECK_ROWS:
            request = triton_client.InferInput(spec.input_names[0], [rows, source.shape[1]], "FP32")
            request.set_data_from_numpy(np.ascontiguousarray(source[:rows]))
            answer = client.infer(model, [request], outputs=[triton_client.InferRequestedOutput(n) for n in names])
            gap = max(scaled_gap(answer.as_numpy(n).reshape(references[f"{flow}/{direction}/{n}"][:rows].shape),
                                 references[f"{flow}/{direction}/{n}"][:rows]) for n in names)
            gaps[f"{model}@{rows}"] = gap
            if not gap <= TOLERANCE:
                report.fail(f"{model} at {rows} rows: scaled gap {gap:.3g} > {TOLERANCE}")
    client.close()
    return {"worst": max(gaps.values(), default=None), "gaps": gaps}


def stand_in_stub_utils() -> types.ModuleType:
    """What the runner's TorchScript session uses of the stub's utilities, to run it in this
    process: its log and the config's dtype names."""
    utils = types.ModuleType("triton_python_backend_utils")
    utils.Logger = types.SimpleNamespace(log_info=print, log_warn=print)
    utils.triton_string_to_numpy = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64}.__getitem__
    return utils


def cuda_graphs(repository: Path, repeats: int) -> dict:
    """The runner's TorchScript session on cuda:0, with and without CUDA graphs, per direction."""
    import importlib.util

    import torch
    from google.protobuf.json_format import MessageToDict

    from flowserve.contract.spec import CUDA_GRAPH_PARAMETER
    from flowserve.export.exporter.triton_config import cuda_graph_buckets
    from flowserve.export.exporter.triton_config import parse_config_text as parse

    sys.modules["triton_python_backend_utils"] = stand_in_stub_utils()
    spec = importlib.util.spec_from_file_location("flowserve_runner", ROOT / "server/triton/runner/model.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    results = {}
    for flow in FLOWS:
        for direction in ("density", "generation"):
            model = repository / f"{flow}-ts-gpu-{direction}"
            config = MessageToDict(parse((model / "config.pbtxt").read_text()), preserving_proto_field_name=True)
            config["max_batch_size"] = max(TIMED_ROWS)
            parameters = config.setdefault("parameters", {})
            capturable = parameters.pop(CUDA_GRAPH_PARAMETER, None) is not None  # the exporter's finding
            path = str(model / "1" / "model.pt")
            sessions = {"eager": runner.TorchScriptSession(path, 1, 0, config)}
            key = f"{flow}-{direction}"
            results[key] = {"capturable": capturable}
            if capturable:
                buckets = ",".join(map(str, cuda_graph_buckets(max(TIMED_ROWS))))
                graphs = runner.TorchScriptSession(path, 1, 0, {**config, "parameters": {
                    **parameters, CUDA_GRAPH_PARAMETER: {"string_value": buckets}}})
                results[key]["captured"] = graphs.graphs is not None
                sessions["graphs"] = graphs
            for rows in TIMED_ROWS:
                inputs = [torch.randn(rows, int(t["dims"][0]), device="cuda:0") for t in config["input"]]
                times, outputs = {name: [] for name in sessions}, {}
                for _ in range(repeats):  # interleaved call by call
                    for name, session in sessions.items():
                        torch.cuda.synchronize()
                        started = time.perf_counter()
                        outputs[name] = session.run(None, None, inputs)
                        torch.cuda.synchronize()
                        times[name].append(time.perf_counter() - started)
                rates = {name: rows / statistics.median(values[2:]) for name, values in times.items()}
                found = {f"{name}_rows_per_s": round(rate) for name, rate in rates.items()}
                if capturable:
                    found["ratio"] = round(rates["graphs"] / rates["eager"], 2)
                    found["max_abs_diff"] = max(float((a - b).abs().nan_to_num().max())
                                                for a, b in zip(outputs["graphs"], outputs["eager"]))
                results[key][rows] = found
    return results


def _drive(job) -> int:
    """One client process: ``in_flight`` closed-loop callers, each on a connection of its own,
    for ``seconds``; returns the calls completed."""
    kind, target, model, points_path, seconds, in_flight = job
    import grpc

    points = np.load(points_path)[:GATEWAY_ROWS]
    if kind == "triton":
        from gateway import triton_request  # benchmarks/gateway.py, beside this file
        from tritonclient.grpc import service_pb2_grpc

        request = triton_request(f"{model}-density", points)
        stub_type, method = service_pb2_grpc.GRPCInferenceServiceStub, "ModelInfer"
    else:
        from flowserve.server.protocol.proto import flowserve_pb2, flowserve_pb2_grpc
        from flowserve.server.protocol.tensors import encode

        request = flowserve_pb2.LogLikelihoodRequest(model=model, x=encode(points))
        stub_type, method = flowserve_pb2_grpc.FlowServiceStub, "LogLikelihood"

    async def run() -> int:
        done = 0
        channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(in_flight)]
        end = time.perf_counter() + seconds

        async def caller(channel):
            nonlocal done
            call = getattr(stub_type(channel), method)
            while time.perf_counter() < end:
                await call(request, timeout=30)
                done += 1

        await asyncio.gather(*(caller(channel) for channel in channels))
        for channel in channels:
            await channel.close()
        return done

    return asyncio.run(run())


def gateway(triton_url: str, repository: Path, flow: str, points: Path, workdir: Path, seconds: float,
            rounds: int, workers: int, state: dict) -> dict:
    """Rows/s of 64-row LogLikelihood, 16 in flight: Triton-direct and the gateway with 1 and
    ``workers`` workers, in interleaved rounds (the best round of each is kept)."""
    from gateway import Served  # benchmarks/gateway.py, beside this file

    served = {}
    for count in sorted({1, workers}):
        served[count] = Served(repository, workdir / f"gateway-{count}.log", "--triton-url", triton_url,
                               "--workers", str(count))
        state.setdefault("gateways", []).append(served[count])
    state["metrics_url"] = served[max(served)].metrics_url
    targets = {"triton-direct": ("triton", triton_url), **{f"gateway, {n} worker(s)": ("gateway", server.target)
                                                          for n, server in served.items()}}
    rates = dict.fromkeys(targets, 0.0)
    per_process = IN_FLIGHT // CLIENT_PROCESSES
    with multiprocessing.get_context("spawn").Pool(CLIENT_PROCESSES) as pool:
        for name, (kind, target) in targets.items():  # warm-up: connections, models
            pool.map(_drive, [(kind, target, flow, str(points), 0.5, per_process)] * CLIENT_PROCESSES)
        for _ in range(rounds):
            for name, (kind, target) in targets.items():
                calls = sum(pool.map(_drive, [(kind, target, flow, str(points), seconds, per_process)]
                                     * CLIENT_PROCESSES))
                rates[name] = max(rates[name], calls * GATEWAY_ROWS / seconds)
    direct = rates["triton-direct"]
    return {"model": flow, "rows_per_call": GATEWAY_ROWS, "in_flight": IN_FLIGHT,
            "rows_per_s": {name: round(rate) for name, rate in rates.items()},
            "vs_triton_direct": {name: round(rate / direct, 2) for name, rate in rates.items()}}


def nvml(metrics_url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    smi = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    gateway = {s.labels["gpu"]: s.value / 2**20 for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "flowserve_gpu_memory_used_bytes"}
    found = {}
    for line in smi.strip().splitlines():
        index, used, total = (part.strip() for part in line.split(","))
        found[index] = {"nvidia_smi_used_mib": float(used), "gateway_used_mib": round(gateway.get(index, -1), 1),
                        "total_mib": float(total)}
    return found


def run(args) -> int:
    from flowserve.server.triton.launcher import TritonServer

    report = Report(args.out)
    report.data["command"] = " ".join(sys.argv)
    report.phase("environment", environment)
    workdir = Path(tempfile.mkdtemp(prefix="flowserve-gpu-check-"))
    repository = serving_repository(args.dir / "repository", workdir / "repository", args.cpu_only)
    references = dict(np.load(args.dir / "references.npz"))
    report.phase("doctor", doctor, repository)
    triton = TritonServer(repository, workdir / "triton")
    state = {}
    try:
        result = report.phase("triton", triton_phase, triton, report)
        if "error" not in result:
            loaded = sorted(p.parent.name for p in repository.glob("*/config.pbtxt")
                            if p.parent.name not in triton.failed_models)
            report.phase("correctness", correctness, triton.grpc_url, references, loaded, report)
            if not args.cpu_only:
                report.phase("cuda_graphs", cuda_graphs, repository, args.repeats)
            flow = "rnvp-onnx-cpu" if args.cpu_only else "rnvp-ts-gpu"
            points = workdir / "points.npy"
            np.save(points, references["rnvp/x"])
            workers = args.workers or max(2, min(8, (os.cpu_count() or 2) // 2))
            report.phase("gateway", gateway, triton.grpc_url, repository, flow, points, workdir, args.seconds,
                         args.rounds, workers, state)
            if not args.cpu_only and "metrics_url" in state:
                report.phase("nvml", nvml, state["metrics_url"])
    finally:
        for gateway_process in state.get("gateways", []):
            gateway_process.stop()
        triton.stop()
    report.data["passed"] = not report.data["failures"]
    report.write()
    print(f"{'PASSED' if report.data['passed'] else 'FAILED'}: {report.data['failures']}; report in {args.out}")
    return 0 if report.data["passed"] else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    prepare_parser = steps.add_parser("prepare", help="train, export and gather the wheels (development machine)")
    prepare_parser.add_argument("--dir", type=Path, default=ROOT / ".gpucheck")
    prepare_parser.add_argument("--steps", type=int, default=300, help="training steps per flow")
    prepare_parser.add_argument("--no-wheels", dest="wheels", action="store_false",
                                help="leave the wheels out (for run --cpu-only where they are installed)")
    run_parser = steps.add_parser("run", help="serve and measure (GPU box)")
    run_parser.add_argument("--dir", type=Path, default=ROOT / ".gpucheck")
    run_parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    run_parser.add_argument("--cpu-only", action="store_true", help="leave out the GPU models and phases")
    run_parser.add_argument("--seconds", type=float, default=3.0, help="length of one timed gateway round")
    run_parser.add_argument("--rounds", type=int, default=2, help="interleaved gateway rounds (the best is kept)")
    run_parser.add_argument("--repeats", type=int, default=30, help="timed calls per CUDA-graph measurement")
    run_parser.add_argument("--workers", type=int, default=0, help="gateway workers to compare with one "
                                                                   "(default: half the cores, 2 to 8)")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.dir, args.steps, args.wheels)
    else:
        sys.exit(run(args))


if __name__ == "__main__":
    main()

"""``flowserve doctor``: whether this machine can serve a model repository, checked before
serving. Each check prints ✓, ✗ with its fix, ! (works, with a caveat) or – (not applicable);
any ✗ makes the exit code 1.

What the machine offers is gathered once (:class:`Machine`); what the repository asks for is
read from its metadata and ``config.pbtxt`` files (:class:`ModelNeeds`); the checks are plain
functions of the two, so they can be tested with made-up machines. Two checks act: Triton's
Python stub is tested by serving a probe model on the real Triton and sending a known tensor
through it, and the ports are tested by binding them.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from flowserve.contract.metadata import read_all
from flowserve.contract.spec import MODEL_FILENAMES, RUNNER_BACKEND

OK, FAIL, WARN, NOT_APPLICABLE = "ok", "fail", "warn", "not applicable"
MARKS = {OK: "✓", FAIL: "✗", WARN: "!", NOT_APPLICABLE: "–"}
PROBE_MODEL = "flowserve-probe"
PROBE_ROWS = 64
NATIVE_BACKENDS = {"onnxruntime": "ONNX Runtime", "pytorch": "PyTorch"}


@dataclass
class Check:
    """One line of the report; a ✗ (``FAIL``) blocks serving."""

    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Machine:
    """What this machine offers the runner (this interpreter is the one Triton's stub runs)."""

    python: str
    numpy: str
    onnxruntime: str | None
    providers: list[str]
    torch: str | None = None
    torch_cuda: str | None = None  # the CUDA version torch was built for; None for a CPU build
    cuda_devices: int = 0
    gpus: list[str] | None = None  # NVML's view: "name, total GiB" per GPU; None when NVML cannot start
    nvml_error: str = ""


@dataclass
class ModelNeeds:
    """What one Triton model of a flow asks of the machine."""

    flow: str
    model: str
    backend: str
    model_file: Path
    kinds: list[str] = field(default_factory=list)  # "KIND_CPU" / "KIND_GPU", one per instance group
    config_error: str = ""  # why its config.pbtxt could not be read

    @property
    def wants_gpu(self) -> bool:
        return "KIND_GPU" in self.kinds

    @property
    def format(self) -> str:
        formats = {Path(filename).suffix: fmt for fmt, filename in MODEL_FILENAMES.items()}  # as the runner picks
        return formats.get(self.model_file.suffix, self.model_file.suffix)


def gather_machine(nvml=None) -> Machine:
    """Versions, providers and devices of this interpreter and machine; ``nvml`` stands in
    for ``pynvml`` (tests pass a fake)."""
    machine = Machine(python=f"{sys.version.split()[0]} ({sys.executable})", numpy=np.__version__,
                      onnxruntime=None, providers=[])
    try:
        import onnxruntime as ort

        machine.onnxruntime, machine.providers = ort.__version__, list(ort.get_available_providers())
    except ImportError:
        pass
    try:
        import torch

        machine.torch, machine.torch_cuda = torch.__version__, torch.version.cuda
        machine.cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        pass
    from flowserve.server.gateway.metrics import read_gpus

    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
        machine.gpus = [f"{gpu.name}, {gpu.total / 2**30:.0f} GiB" for gpu in read_gpus(nvml)]
    except Exception as exc:  # ImportError, or NVMLError_LibraryNotFound without a driver
        machine.nvml_error = f"{type(exc).__name__}: {exc}"
    return machine


def read_models(repository: Path) -> list[ModelNeeds]:
    """Each Triton model of each flow of ``repository``, as its ``config.pbtxt`` describes it."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    models = []
    for flow in read_all(repository).values():
        for model in flow.models.values():
            config_path = repository / model / "config.pbtxt"
            try:
                config = text_format.Parse(config_path.read_text(), mc.ModelConfig())
            except (OSError, text_format.ParseError) as exc:
                error = f"cannot read {config_path.name}: {exc}".splitlines()[0]
                models.append(ModelNeeds(flow.name, model, "", config_path, config_error=error))
                continue
            versions = sorted((int(p.name) for p in (repository / model).iterdir() if p.name.isdigit()), reverse=True)
            version = str(versions[0]) if versions else "1"
            kinds = [mc.ModelInstanceGroup.Kind.Name(group.kind) for group in config.instance_group] or ["KIND_CPU"]
            models.append(ModelNeeds(flow.name, model, config.backend,
                                     repository / model / version
                                     / (config.default_model_filename or MODEL_FILENAMES["onnx"]),
                                     kinds))
    return models


def environment_checks(machine: Machine, models: list[ModelNeeds]) -> list[Check]:
    """Python, numpy, torch, ONNX Runtime and NVML, each against what the models need."""
    wants_gpu = any(m.wants_gpu for m in models)
    wants_torch = any(m.format == "torchscript" and m.backend == RUNNER_BACKEND for m in models)
    checks = [Check("python", OK, machine.python)]
    if int(machine.numpy.split(".")[0]) >= 2:
        checks.append(Check("numpy", WARN, f"{machine.numpy}: Triton 2.51's stub garbles as_numpy() and empties "
                                           "Tensor(ndarray) under numpy 2; flowserve's runner uses DLPack instead, "
                                           "and the stub check below tries it",
                            "nvidia-pytriton pins numpy<2: pip install 'numpy<2' to stay on the tested path"))
    else:
        checks.append(Check("numpy", OK, machine.numpy))
    if machine.torch is None:
        checks.append(Check("torch", FAIL if wants_torch else NOT_APPLICABLE,
                            "not installed" + ("; TorchScript flows need it" if wants_torch else
                                               " (needed only for TorchScript flows)"),
                            "pip install torch (the CPU wheel, or a CUDA build for GPU instances)"
                            if wants_torch else ""))
    else:
        build = f"CUDA {machine.torch_cuda} build" if machine.torch_cuda else "CPU build"
        checks.append(Check("torch", OK, f"{machine.torch}, {build}, {machine.cuda_devices} CUDA device(s)"))
    if machine.onnxruntime is None:
        checks.append(Check("onnxruntime", FAIL, "not installed; the runner imports it for every model",
                            "pip install onnxruntime-gpu (its CPU provider works without a GPU)"))
    else:
        checks.append(Check("onnxruntime", OK, f"{machine.onnxruntime}, providers {', '.join(machine.providers)}"))
    if machine.gpus:
        checks.append(Check("GPUs (NVML)", OK, "; ".join(f"{i}: {gpu}" for i, gpu in enumerate(machine.gpus))))
    elif wants_gpu:
        checks.append(Check("GPUs (NVML)", FAIL, f"a model asks for a GPU, and NVML sees none "
                                                 f"({machine.nvml_error or '0 GPUs'})",
                            "run on a machine with an NVIDIA GPU and driver, or export with --instance-kind cpu"))
    else:
        checks.append(Check("GPUs (NVML)", NOT_APPLICABLE,
                            f"no model asks for a GPU ({machine.nvml_error or '0 GPUs'})"))
    return checks


def model_checks(machine: Machine, models: list[ModelNeeds], file_loads: Callable[[ModelNeeds], str | None],
                 cuda_starts: Callable[[Path], str | None]) -> list[Check]:
    """One line per flow: each of its models against this machine. ``file_loads`` opens a
    model's file on the CPU and ``cuda_starts`` tries ONNX Runtime's CUDA provider on one:
    each returns None if it works, else why not."""
    checks = []
    for flow in dict.fromkeys(m.flow for m in models):
        problems, caveats, parts = {}, {}, {}  # reason -> the flow's models it holds for
        for model in (m for m in models if m.flow == flow):
            short = model.model.removeprefix(f"{flow}-")
            if model.config_error:
                problems.setdefault(model.config_error, []).append(short)
                continue
            kinds = "+".join(sorted(set(model.kinds)))
            parts.setdefault(f"{model.format} on {model.backend}, {kinds}", []).append(short)
            if model.backend in NATIVE_BACKENDS:
                caveats.setdefault(f"needs Triton's {NATIVE_BACKENDS[model.backend]} backend, which the embedded "
                                   "Triton lacks", []).append(short)
                continue
            if not model.model_file.exists():
                problems.setdefault(f"{model.model_file.name} is missing", []).append(short)
            elif model.format == "torchscript" and machine.torch is None:
                problems.setdefault("TorchScript, and torch is not installed", []).append(short)
            elif (machine.onnxruntime or model.format != "onnx") and (reason := file_loads(model)):
                problems.setdefault(f"{model.model_file.name} does not load: {reason}", []).append(short)
            if model.wants_gpu:
                for reason in _gpu_problems(machine, model, cuda_starts):
                    problems.setdefault(reason, []).append(short)
        if problems:
            status, found = FAIL, problems
            fix = f"export the flow again: flowserve export ... --name {flow} (--instance-kind cpu where this " \
                  "machine has no GPU for it)"
        elif caveats:
            status, found, fix = WARN, caveats, "serve it from an NGC Triton image, with serve --triton-url"
        else:
            status, found, fix = OK, parts, ""
        detail = "; ".join(f"{' and '.join(names)}: {reason}" for reason, names in found.items())
        checks.append(Check(f"flow {flow}", status, detail, fix))
    return checks


def _gpu_problems(machine: Machine, model: ModelNeeds, cuda_starts: Callable[[Path], str | None]) -> list[str]:
    if not machine.gpus and not machine.cuda_devices:
        return ["asks for a GPU; this machine has none"]
    if model.format == "torchscript" and not machine.cuda_devices:
        build = f"CUDA {machine.torch_cuda} build" if machine.torch_cuda else "a CPU-only build"
        return [f"asks for a GPU; torch {machine.torch} ({build}) sees no CUDA device"]
    if model.format == "onnx":
        if "CUDAExecutionProvider" not in machine.providers:
            return ["asks for a GPU; ONNX Runtime has no CUDA execution provider (install onnxruntime-gpu)"]
        reason = cuda_starts(model.model_file) if model.model_file.exists() else None
        if reason:
            return [f"asks for a GPU; ONNX Runtime's CUDA provider does not start: {reason}"]
    return []


def model_file_loads(model: ModelNeeds) -> str | None:
    """None if the model's file opens on the CPU (ONNX Runtime, or torch for TorchScript),
    else the first line of why not (naming the file, not its path, so that a flow's two
    models share one line)."""
    try:
        if model.format == "onnx":
            import onnxruntime as ort

            ort.InferenceSession(str(model.model_file), providers=["CPUExecutionProvider"])
        elif model.format == "torchscript":
            import torch

            torch.jit.load(str(model.model_file), map_location="cpu")
        else:
            return f"{model.format} is neither ONNX nor TorchScript"
    except Exception as exc:  # noqa: BLE001 - each runtime raises its own kinds
        return f"{type(exc).__name__}: {exc}".split("\n")[0].replace(str(model.model_file), model.model_file.name)
    return None


def cuda_session_starts(model_file: Path) -> str | None:
    """None if ONNX Runtime runs ``model_file`` with its CUDA provider, else why not."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model_file), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors are not OSError or RuntimeError
        return f"{type(exc).__name__}: {exc}".split("\n")[0]
    if session.get_providers()[0] == "CUDAExecutionProvider":
        return None
    return "it fell back to the CPU (missing CUDA or cuDNN libraries; ONNX Runtime's error is printed above)"


def port_checks(host: str, ports: dict[str, int]) -> list[Check]:
    """Whether each port (by its ``serve`` option: ``{"port": 8500, ...}``) can be bound on ``host`` now."""
    checks = []
    for option, port in ports.items():
        name = "gateway port" if option == "port" else option.replace("-", " ")
        with socket.socket() as sock:
            # As gRPC binds: a port left in TIME_WAIT by a stopped serve is free, a listening one is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                checks.append(Check(name, OK, f"{host}:{port} is free"))
            except OSError as exc:
                checks.append(Check(name, FAIL, f"cannot bind {host}:{port}: {exc.strerror}",
                                    f"stop what holds it, or pass serve (and doctor) another --{option}"))
    return checks


def triton_checks(timeout: float) -> list[Check]:
    """The embedded Triton: installed, and its Python stub round-trips a known tensor."""
    from flowserve.server.triton.launcher import TritonInstallation, TritonLaunchError

    try:
        install = TritonInstallation.find()
    except TritonLaunchError as exc:
        return [Check("triton", FAIL, str(exc), "pip install nvidia-pytriton, or serve with --triton-url"),
                Check("triton stub", NOT_APPLICABLE, "no embedded Triton to test")]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return [Check("triton", OK, f"{install.binary} (stub for Python {version})"),
            stub_probe(timeout)]


def stub_probe(timeout: float) -> Check:
    """Serve a probe model on the embedded Triton and send it a known tensor: it must come back
    unchanged through the runner's own path (the runner also refuses to load if its own round
    trip fails)."""
    import tritonclient.grpc as triton_grpc

    from flowserve.server.triton.launcher import TritonLaunchError, TritonServer
    from flowserve.server.triton.probe import PROBE_INPUT, echo_config

    numpy_fix = "give the stub's Python (the python3 of this environment) numpy<2: pip install 'numpy<2'"
    other_fix = f"the stub runs this environment's python3 ({sys.executable}); see the reason, and Triton's log"
    known = (np.arange(PROBE_ROWS * 3, dtype=np.float32).reshape(PROBE_ROWS, 3) - 17) / 8
    with tempfile.TemporaryDirectory(prefix="flowserve-doctor-") as workdir:
        repository = Path(workdir) / "repository"
        (repository / PROBE_MODEL / "1").mkdir(parents=True)
        (repository / PROBE_MODEL / "config.pbtxt").write_text(echo_config(PROBE_MODEL, 3, PROBE_ROWS))
        server = TritonServer(repository, Path(workdir) / "triton")
        started = time.monotonic()
        try:
            server.start(ready_timeout=timeout)
        except TritonLaunchError as exc:
            reason = server.failed_models.get(PROBE_MODEL) or str(exc)
            return Check("triton stub", FAIL, f"the probe model did not load: {reason}",
                         numpy_fix if "numpy" in reason else other_fix)
        client = triton_grpc.InferenceServerClient(server.grpc_url)
        try:
            tensor = triton_grpc.InferInput(PROBE_INPUT, list(known.shape), "FP32")
            tensor.set_data_from_numpy(known)
            response = client.infer(PROBE_MODEL, [tensor]).get_response()
            back = np.frombuffer(response.raw_output_contents[0], np.float32)
            seconds = time.monotonic() - started
        except Exception as exc:  # noqa: BLE001 - tritonclient's errors, or a malformed answer
            return Check("triton stub", FAIL, f"the probe call failed: {type(exc).__name__}: {exc}", other_fix)
        finally:
            client.close()
            server.kill()  # a probe has nothing to drain
    if back.size != known.size or not np.array_equal(back.reshape(known.shape), known):
        return Check("triton stub", FAIL, f"a float32[{PROBE_ROWS}, 3] tensor came back as {back.size} value(s) "
                                          f"{back[:4].tolist()}..., not as sent (numpy {np.__version__})", numpy_fix)
    return Check("triton stub", OK, f"a float32[{PROBE_ROWS}, 3] tensor went client → Triton → stub (numpy "
                                    f"{np.__version__}) → client unchanged ({seconds:.1f} s with Triton's start)")


def run_checks(args) -> list[Check]:
    """Every check, in the order printed."""
    machine = gather_machine()
    repository = Path(args.model_repository)
    models = read_models(repository) if repository.is_dir() else []
    checks = environment_checks(machine, models)
    checks += triton_checks(args.ready_timeout) if not args.skip_triton else [
        Check("triton stub", NOT_APPLICABLE, "skipped (--skip-triton)")]
    checks += port_checks(args.host, {"port": args.port, "metrics-port": args.metrics_port})
    if not repository.is_dir():
        checks.append(Check("model repository", NOT_APPLICABLE, f"{repository} does not exist (flowserve export "
                                                                 "writes one)"))
    elif not models:
        checks.append(Check("model repository", WARN, f"{repository} has no flows", "flowserve export ..."))
    return checks + model_checks(machine, models, model_file_loads, cuda_session_starts)


def doctor_command(args) -> None:
    """Print every check (as JSON with ``--json``); RuntimeError (exit code 1) if any is a ✗."""
    checks = run_checks(args)
    blocking = [c.name for c in checks if c.status == FAIL]
    if args.json:
        print(json.dumps({"ok": not blocking, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for check in checks:
            print(f"{MARKS[check.status]} {check.name:<{width}}  {check.detail}")
            if check.fix and check.status in (FAIL, WARN):
                print(f"  {'':<{width}}  fix: {check.fix}")
        if not blocking:
            print("flowserve doctor: ready to serve")
    if blocking:
        raise RuntimeError(f"{len(blocking)} blocking problem(s): {', '.join(blocking)}")

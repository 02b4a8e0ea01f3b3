"""Start and stop the ``tritonserver`` that ships in the ``nvidia-pytriton`` wheel.

The wheel carries Triton 2.51 with the Python backend only. To serve flowserve models it
needs, found and set up here:

* a backend directory holding the Python backend (``libtriton_python.so``, its utils and
  the stub built for this Python) and the ``flowserve_runner`` runner;
* ``LD_LIBRARY_PATH`` with the wheel's bundled libraries;
* this environment's ``bin`` (or that of another interpreter, ``stub_python``) first on
  ``PATH``: the stub ignores ``PYTHONPATH`` and takes its interpreter, and so numpy,
  onnxruntime and torch, from ``python3`` on ``PATH``.

Triton runs in its own process group, so stopping it also stops its stub processes, and
on Linux it is told to die with its parent, so a killed launcher leaves no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from flowserve.contract.spec import RUNNER_BACKEND

log = logging.getLogger(__name__)


class TritonLaunchError(RuntimeError):
    """Triton could not be found, started, or did not become ready."""


@dataclass(frozen=True)
class TritonInstallation:
    """Paths inside the installed ``nvidia-pytriton`` wheel, and the interpreter its Python
    stub will run."""

    binary: Path
    python_backend: Path
    stub: Path
    libraries: Path
    stub_python: Path

    @classmethod
    def find(cls, stub_python: Path | None = None) -> "TritonInstallation":
        """Locate ``tritonserver`` and its pieces in the installed wheel; the stub runs
        ``stub_python`` (default: this interpreter), with that interpreter's packages."""
        # Found, not imported: importing pytriton loads its client (and gevent), which serve does not use.
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonLaunchError(
                "no embedded Triton: nvidia-pytriton is not installed. Pass --triton-url (or FLOWSERVE_TRITON_URL) "
                "to use a running Triton, or pip install nvidia-pytriton"
            )
        root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
        python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
        if stub_python is not None:
            python_version = _python_version(stub_python)
        found = cls(
            binary=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / python_version / "triton_python_backend_stub",
            libraries=root.parent.parent / "nvidia_pytriton.libs",
            stub_python=Path(stub_python or sys.executable),
        )
        for path in (found.binary, found.python_backend, found.stub, found.libraries):
            if not path.exists():
                raise TritonLaunchError(f"incomplete nvidia-pytriton install: {path} is missing")
        return found

    def build_backend_directory(self, target: Path) -> Path:
        """Create ``target`` with the Python backend and the ``flowserve_runner`` runner."""
        python_dir = target / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(self.python_backend / name, python_dir / name)
        shutil.copy2(self.stub, python_dir / "triton_python_backend_stub")
        runner_dir = target / RUNNER_BACKEND
        runner_dir.mkdir(exist_ok=True)
        runner = resources.files("flowserve.server.triton") / "runner" / "model.py"
        (runner_dir / "model.py").write_text(runner.read_text())
        return target

    def environment(self) -> dict[str, str]:
        """Environment for ``tritonserver`` and its Python stubs."""
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(self.libraries), env.get("LD_LIBRARY_PATH", "")) if p
        )
        env["PATH"] = os.pathsep.join((str(self.stub_python.parent), env.get("PATH", "")))
        return env


def _python_version(python: Path) -> str:
    """``major.minor`` of the interpreter ``python``."""
    try:
        found = subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise TritonLaunchError(f"cannot run the stub's Python {python}: {exc}") from None
    return found.stdout.strip()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_PR_SET_PDEATHSIG = 1
# Resolved here, in the parent: the child may only make async-signal-safe calls between
# fork and exec, and loading a library is not one of them.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class TritonServer:
    """A ``tritonserver`` child process serving ``model_repository`` on local ports."""

    model_repository: Path
    workdir: Path
    grpc_port: int = 0
    metrics_port: int = 0
    stub_python: Path | None = None
    process: subprocess.Popen | None = None
    failed_models: dict[str, str] = field(default_factory=dict)
    """Models that did not load at the last start, each with Triton's reason."""

    def __post_init__(self):
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self.workdir / "tritonserver.log"

    def start(self, ready_timeout: float = 120.0) -> "TritonServer":
        """Start Triton and wait until it reports ready, noting the models that failed to load
        in :attr:`failed_models`; raise TritonLaunchError if it is not ready, or if the
        repository has models and none of them loaded."""
        repository = Path(self.model_repository).resolve()
        if not repository.is_dir():
            raise TritonLaunchError(f"model repository {repository} does not exist")
        install = TritonInstallation.find(self.stub_python)
        self.workdir.mkdir(parents=True, exist_ok=True)
        backends = install.build_backend_directory(self.workdir / "backends")
        command = [
            str(install.binary),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            f"--grpc-port={self.grpc_port}",
            "--grpc-address=127.0.0.1",
            "--allow-http=false",
            f"--metrics-port={self.metrics_port}",
            "--metrics-address=127.0.0.1",
            # A model that fails to load leaves the others serving; start() reports it, with Triton's reason.
            "--exit-on-error=false",
            # Ready means up: model by model readiness is the gateway's (server/gateway/health.py), and a
            # strict server would turn unready while any one model reloads.
            "--strict-readiness=false",
            # Explicit control: every model loads at start, and the gateway loads new versions
            # and reloads broken models through the repository API (server/gateway/health.py).
            "--model-control-mode=explicit",
            "--load-model=*",
            "--log-verbose=0",
            # The gateway has drained its calls when Triton is stopped. A model whose stub
            # was killed never finishes unloading, and Triton would wait 30 s for it.
            "--exit-timeout-secs=5",
            # One loading thread per model: Triton's default (4) loads a repository of six
            # flows (twelve models, a stub process each) in about 5.3 s here instead of 3.6 s.
            f"--model-load-thread-count={max(4, len(list(repository.glob('*/config.pbtxt'))))}",
        ]
        log.info("starting Triton: %s (log: %s)", " ".join(command), self.log_path)
        with open(self.log_path, "ab") as log_file:  # appended: a restart keeps the crash's lines
            self.process = subprocess.Popen(
                command,
                env=install.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if _prctl is not None else None,
            )
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        import tritonclient.grpc as triton_grpc

        client = triton_grpc.InferenceServerClient(self.grpc_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise TritonLaunchError(
                        f"tritonserver exited with code {self.process.returncode} before it was ready; "
                        f"errors and last lines of {self.log_path}:\n{self.log_tail()}"
                    )
                ready = False
                with contextlib.suppress(Exception):
                    ready = client.is_server_ready(client_timeout=1.0)
                if ready:
                    log.info("Triton ready on %s", self.grpc_url)
                    try:
                        index = client.get_model_repository_index(as_json=True).get("models", [])
                    except Exception as exc:  # tritonclient's InferenceServerException
                        raise TritonLaunchError(f"Triton is ready but did not list its models: {exc}") from exc
                    self._note_failed_models(index)
                    return
                time.sleep(0.05)
        finally:
            client.close()
        raise TritonLaunchError(
            f"tritonserver was not ready after {timeout:.0f} s; errors and last lines of {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def _note_failed_models(self, index: list[dict]) -> None:
        """Keep each model of the repository that is not READY, with Triton's reason (from its
        repository index, or its log for a model it could not even index); raise when the
        repository has models and none of them is READY."""
        ready = {m["name"] for m in index if m.get("state") == "READY"}  # one entry per version
        reasons = {m["name"]: m["reason"] for m in index if m.get("reason")}
        models = sorted(p.parent.name for p in Path(self.model_repository).glob("*/config.pbtxt"))
        self.failed_models = {name: self._load_failure(name, reasons.get(name)) for name in models if name not in ready}
        if models and len(self.failed_models) == len(models):
            reasons = "\n".join(f"  {name}: {reason}" for name, reason in self.failed_models.items())
            raise TritonLaunchError(f"Triton loaded none of the {len(models)} model(s) of {self.model_repository}:\n"
                                    f"{reasons}\n(Triton's log: {self.log_path})")

    def _load_failure(self, model: str, reason: str | None) -> str:
        """The first line of Triton's reason (it appends the runner's traceback after it)."""
        if not reason and self.log_path.exists():
            pattern = re.compile(rf"failed to load (?:model )?'{re.escape(model)}'(?: version \d+)?: (.*)")
            lines = self.log_path.read_text(errors="replace").splitlines()
            found = [m.group(1) for m in map(pattern.search, lines) if m]
            reason = found[-1].rstrip('"') if found else None
        return (reason or "not loaded; see Triton's log").replace("\\n", "\n").split("\n")[0]

    def log_tail(self, lines: int = 5) -> str:
        """Triton's error lines (glog ``E`` lines) and the last ``lines`` lines of its log."""
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        errors = [line for line in text[:-lines] if re.match(r"E\d{4} ", line)]
        return "\n".join(errors[-10:] + text[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Triton and its stubs: SIGTERM to the process group, SIGKILL after ``timeout``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("Triton did not stop within %.0f s; killing it", timeout)
        # Also after a crash: stubs that outlived tritonserver share its process group.
        self.kill()

    def kill(self) -> None:
        """Kill Triton and its stubs at once (SIGKILL to the process group): for a Triton
        with nothing to drain."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def is_running(self) -> bool:
        """Whether the tritonserver process is alive."""
        return self.process is not None and self.process.poll() is None

    def restart(self, ready_timeout: float = 120.0) -> "TritonServer":
        """Stop what is left of Triton (its stubs too) and start it again on the same ports."""
        self.stop()
        return self.start(ready_timeout)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class TritonGaveUp(RuntimeError):
    """The embedded Triton died more often than the supervisor may restart it."""


@dataclass
class TritonSupervisor:
    """Restarts the embedded Triton when its process dies.

    Restarts wait a backoff that doubles from ``first_backoff_s`` up to ``max_backoff_s``, and
    falls back to the first after ``stable_s`` of uptime. After ``max_restarts`` restarts
    without such a stable spell, :meth:`watch` raises :class:`TritonGaveUp`. The gateway stays
    up meanwhile: calls get UNAVAILABLE and health reports NOT_SERVING until Triton is back.
    """

    triton: TritonServer
    max_restarts: int = 5
    ready_timeout: float = 120.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    stable_s: float = 60.0
    poll_s: float = 0.2

    async def watch(self, on_restart=lambda: None) -> None:
        """Watch and restart until cancelled; ``on_restart()`` is called as each restart begins.
        Uptime and backoffs are kept on the running loop's clock."""
        import asyncio

        clock = asyncio.get_running_loop().time
        restarts, backoff, up_since = 0, self.first_backoff_s, clock()
        while True:
            await asyncio.sleep(self.poll_s)
            if self.triton.is_running():
                if clock() - up_since >= self.stable_s:
                    restarts, backoff = 0, self.first_backoff_s
                continue
            code = self.triton.process.returncode
            if restarts >= self.max_restarts:
                raise TritonGaveUp(f"Triton exited with code {code} after {restarts} restart(s); giving up. "
                                   f"Last lines of {self.triton.log_path}:\n{self.triton.log_tail()}")
            log.error("Triton exited with code %s; restarting it in %.1f s (restart %d of at most %d)",
                      code, backoff, restarts + 1, self.max_restarts)
            await asyncio.sleep(backoff)
            restarts, backoff = restarts + 1, min(2 * backoff, self.max_backoff_s)
            on_restart()
            try:
                await asyncio.to_thread(self.triton.restart, self.ready_timeout)
            except TritonLaunchError as exc:
                log.error("Triton did not come back: %s", exc)
                continue
            up_since = clock()
            log.warning("Triton restarted on %s", self.triton.grpc_url)
            for model, reason in self.triton.failed_models.items():
                log.error("model %r failed to load and is not served: %s", model, reason)

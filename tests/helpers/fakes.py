"""Stand-ins for what the fast lanes lack: ``InMemoryBackend`` for Triton, a conditional and
an unconditional flow whose answers depend on every row's inputs (so a row that travels with
another's context shows), ``serve_and_call`` (the real gateway on loopback in front of them),
the batcher and health on the in-memory backend, the runner beside a stand-in for Triton's
``triton_python_backend_utils``, and a flow's repository files without a real export
(``write_flow``, for ``flowserve doctor``); ``npy_bytes``, an array as an .npy body."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flowserve.contract.metadata import FlowMetadata
from flowserve.contract.spec import (
    CONTEXT,
    DENSITY,
    DIRECTIONS,
    EMBED,
    EMBEDDED_CONTEXT,
    ENCODE,
    DirectionSpec,
    direction_spec,
    triton_model_name,
)
from flowserve.server.gateway.app import Gateway, GatewayConfig
from flowserve.server.gateway.backend import QueuePolicy
from flowserve.server.gateway.batching import BatchingBackend
from flowserve.server.gateway.catalog import ModelCatalog
from flowserve.server.gateway.health import FlowHealth
from flowserve.server.gateway.metrics import GatewayMetrics
from flowserve.server.protocol.errors import BackendUnavailable

ROOT = Path(__file__).resolve().parents[2]
CONDITIONAL = "digits-cond"
UNCONDITIONAL = "digits-plain"
EVENT_SHAPE = (1, 2, 2)
EVENT_DIM = 4
NOISE_DIM = 6  # neither D nor D + 1, so a wrong noise width shows
CONTEXT_SHAPE = (3,)
CHUNK = 4  # the stand-in's max_batch_size: 10 rows go to Triton as 4 + 4 + 2


def flow_metadata(name: str, **fields) -> FlowMetadata:
    """A flow's metadata with ``fields`` set and the other serving fields at their defaults."""
    models = {d: triton_model_name(name, d) for d in DIRECTIONS}
    return FlowMetadata(**{"name": name, "family": "vae", "event_shape": EVENT_SHAPE, "models": models, **fields})


def write_metadata(repository: Path, name: str, **fields) -> None:
    flow_metadata(name, **fields).write(repository)


def fake_density(x: np.ndarray, context: np.ndarray) -> np.ndarray:
    """What the stand-in's density model answers: depends on each row's x and context."""
    return x.sum(axis=1) + 100 * context.sum(axis=1)


def fake_generation(z: np.ndarray, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the stand-in's generation model answers: x and log_prob from each row's z and context."""
    return z[:, :EVENT_DIM] + context.sum(axis=1, keepdims=True), z.sum(axis=1) + 100 * context.sum(axis=1)


def fake_encode(x: np.ndarray, context: np.ndarray, noise_dim: int) -> dict[str, np.ndarray]:
    """What the stand-in's encode model answers: z (x shifted by the context, cut or padded with
    zeros to ``noise_dim``), log|det| and log_prob from each row."""
    z = np.zeros((len(x), noise_dim), np.float32)
    width = min(noise_dim, x.shape[1])
    z[:, :width] = x[:, :width] + context.sum(axis=1, keepdims=True)
    return {"z": z, "log_det": x.sum(axis=1), "log_prob": fake_density(x, context)}


def fake_embedding(context: np.ndarray, width: int) -> np.ndarray:
    """What the stand-in's embed model answers: ``width`` values from each context row."""
    squashed = np.tanh(context)  # finite for any finite context
    return (squashed[:, :1] * np.arange(1, width + 1, dtype=np.float32) + squashed.sum(axis=1, keepdims=True)
            ).astype(np.float32)


def fake_answer(spec, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The stand-in Triton's answer: from each row's inputs, so a context row that travels
    with the wrong x or z row changes the result."""
    rows = next(iter(inputs.values())).shape[0]
    context = inputs.get(CONTEXT, inputs.get(EMBEDDED_CONTEXT, np.zeros((rows, 0), np.float32)))
    if spec.direction == EMBED:
        return {EMBEDDED_CONTEXT: fake_embedding(context, spec.outputs[0].dims[0])}
    if spec.direction == DENSITY:
        return {"log_prob": fake_density(inputs["x"], context)}
    if spec.direction == ENCODE:
        return fake_encode(inputs["x"], context, spec.outputs[0].dims[0])
    x, log_prob = fake_generation(inputs["z"], context)
    return {"x": x, "log_prob": log_prob}


class InMemoryBackend:
    """A :class:`flowserve.server.gateway.backend.Backend` standing in for Triton.

    Each call answers ``answer(spec, inputs)`` and is recorded as ``(model, spec, inputs)``
    with its timeout in ``timeouts``. Calls sleep ``delay`` seconds (a callable gets the
    call's index), wait for ``gate`` if one is set, and raise ``failure`` if it is set.
    """

    def __init__(self, answer: Callable[[DirectionSpec, dict[str, np.ndarray]], dict[str, np.ndarray]],
                 max_batch_size: int = 4, versions: dict[str, list[str]] | None = None):
        self.answer = answer
        self.chunk = max_batch_size
        self.versions = versions or {}
        self.calls: list[tuple[str, DirectionSpec, dict[str, np.ndarray]]] = []
        self.timeouts: list[float | None] = []
        self.forgotten = 0
        self.delay: float | Callable[[int], float] = 0.0
        self.gate: asyncio.Event | None = None
        self.failure: Exception | None = None
        self.running = self.most_running = self.finished = 0
        self.batching = True
        self.queue = QueuePolicy()  # no limits
        self.unready: set[str] = set()
        """Models that report not ready until loaded again (``loads`` records "-m" for unload m, "m" for load)."""
        self.broken: set[str] = set()
        """Models that report ready but fail their probes until loaded again (``probes`` records them)."""
        self.loads: list[str] = []
        self.probes: list[str] = []

    async def is_ready(self) -> bool:
        return True

    async def model_versions(self) -> dict[str, list[str]]:
        return self.versions

    async def model_ready(self, model: str) -> bool:
        return model not in self.unready

    async def probe(self, model: str, spec: DirectionSpec, timeout: float) -> None:
        self.probes.append(model)
        if model in self.broken:
            raise BackendUnavailable(f"{model} is broken")

    async def load_model(self, model: str) -> None:
        self.loads.append(model)
        self.unready.discard(model)
        self.broken.discard(model)

    async def unload_model(self, model: str) -> None:
        self.loads.append(f"-{model}")

    async def max_batch_size(self, model: str) -> int:
        return self.chunk

    async def dynamic_batching(self, model: str) -> bool:
        return self.batching

    async def queue_policy(self, model: str) -> QueuePolicy:
        return self.queue

    def forget_configs(self) -> None:
        self.forgotten += 1

    async def infer(self, model, spec, inputs, timeout):
        index = len(self.calls)
        self.calls.append((model, spec, {name: array.copy() for name, array in inputs.items()}))
        self.timeouts.append(timeout)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay(index) if callable(self.delay) else self.delay)
            if self.gate is not None:
                await self.gate.wait()
            if self.failure is not None:
                raise self.failure
            return self.answer(spec, inputs)
        finally:
            self.running -= 1
            self.finished += 1

    async def close(self) -> None:
        pass

    def chunks(self, name: str) -> list[np.ndarray]:
        """Every call's input ``name``, in call order."""
        return [inputs[name] for _, _, inputs in self.calls]


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of an .npy file (what a client of the HTTP API sends)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def serve_and_call(config: GatewayConfig, calls: Callable[..., object], backend: InMemoryBackend | None = None):
    """Run the gateway of ``config`` on ``backend`` (default: a new in-memory one) and
    ``calls(target)`` in a thread beside it, or ``calls(target, http_url)`` when ``config``
    has an HTTP port; returns what ``calls`` returned and the gateway's metrics registry."""
    async def scenario():
        async with Gateway(config, backend or InMemoryBackend(fake_answer, max_batch_size=4)) as gateway:
            http = [] if gateway.http_port is None else [f"{'https' if config.tls else 'http'}://127.0.0.1:"
                                                         f"{gateway.http_port}"]
            return await asyncio.to_thread(calls, f"127.0.0.1:{gateway.port}", *http), gateway.metrics.registry

    return asyncio.run(scenario())


SPEC = direction_spec(DENSITY, 2)
"""The batcher tests' direction: density of a 2-D flow."""


def row_sums(spec, inputs):
    """An answer of each row's own: the sum of its x."""
    return {"log_prob": inputs["x"].sum(axis=1)}


def rows(start: int, count: int) -> dict[str, np.ndarray]:
    """``count`` rows of x, numbered from ``start`` so that each row can be told apart."""
    return {"x": np.arange(2 * start, 2 * (start + count), dtype=np.float32).reshape(count, 2)}


def batcher(answer=row_sums, max_batch_size: int = 8, delay=0.01, in_flight: int = 1):
    """An in-memory backend whose calls take ``delay`` seconds, and the batcher in front of it."""
    backend = InMemoryBackend(answer, max_batch_size=max_batch_size)
    backend.delay = delay
    return backend, BatchingBackend(backend, max_batches_in_flight=in_flight)


FLOWS = ("left", "right")


def write_flows(repository) -> None:
    """The metadata of two 2-D flows, ``left`` and ``right``."""
    for flow in FLOWS:
        models = {d: triton_model_name(flow, d) for d in DIRECTIONS}
        FlowMetadata(name=flow, family="maf", event_shape=(2,), models=models).write(repository)


def zeros(spec, inputs):
    """An answer of zeros of the direction's output shapes."""
    rows = next(iter(inputs.values())).shape[0]
    return {t.name: np.zeros((rows, *t.dims), t.dtype) for t in spec.outputs}


def health_of(tmp_path, **options) -> tuple[FlowHealth, InMemoryBackend, GatewayMetrics]:
    """``FlowHealth`` over the two flows of :func:`write_flows` on an in-memory backend."""
    write_flows(tmp_path)
    backend, metrics = InMemoryBackend(zeros), GatewayMetrics()
    return FlowHealth(backend, ModelCatalog(tmp_path), metrics, **options), backend, metrics


class _CapsuleHolder:
    """A CPU DLPack capsule behind the ``__dlpack__`` protocol that ``np.from_dlpack`` reads."""

    def __init__(self, capsule):
        self.capsule = capsule

    def __dlpack__(self, stream=None):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)


class StubTensor:
    """A stand-in for the stub's ``pb_utils.Tensor``: DLPack in and out, as the real one, and
    ``as_numpy`` for the test's own reading."""

    def __init__(self, name: str, array: np.ndarray):
        self.name, self.array = name, array

    @classmethod
    def from_dlpack(cls, name: str, source) -> "StubTensor":
        source = _CapsuleHolder(source) if type(source).__name__ == "PyCapsule" else source
        return cls(name, np.array(np.from_dlpack(source)))  # a copy, as the stub's answer to Triton is

    def __dlpack__(self, stream=None):
        return self.array.__dlpack__()

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()

    def shape(self) -> list[int]:
        return list(self.array.shape)

    def as_numpy(self) -> np.ndarray:
        return self.array


class StubResponse:
    """A stand-in for ``pb_utils.InferenceResponse``."""

    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name: t.as_numpy() for t in output_tensors}
        self.error = error


def stub_utils() -> types.ModuleType:
    """A stand-in for the stub's ``triton_python_backend_utils``: what the runner uses of it."""
    utils = types.ModuleType("triton_python_backend_utils")
    utils.Tensor = StubTensor
    utils.InferenceResponse = StubResponse
    utils.TritonError = str
    utils.logged = []  # (level, message) of everything the runner logged
    utils.Logger = types.SimpleNamespace(log_info=lambda message: utils.logged.append(("info", message)),
                                         log_warn=lambda message: utils.logged.append(("warn", message)))
    utils.triton_string_to_numpy = lambda name: {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64}[name]
    utils.get_input_tensor_by_name = lambda request, name: request[name]
    return utils


def load_runner(monkeypatch, utils: types.ModuleType | None = None):
    """The Triton runner module, loaded from its file as Triton's stub loads it, beside
    ``utils`` (default :func:`stub_utils`) as the stub's own ``triton_python_backend_utils``."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils or stub_utils())
    path = ROOT / "server" / "triton" / "runner" / "model.py"
    spec = importlib.util.spec_from_file_location("flowserve_runner", path)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner


def runner_args(model_dir: Path, config: dict, kind: str = "CPU") -> dict[str, str]:
    """The ``args`` Triton hands a runner instance's ``initialize``."""
    return {"model_config": json.dumps(config), "model_repository": str(model_dir), "model_version": "1",
            "model_instance_kind": kind, "model_instance_device_id": "0"}


def write_flow(repository, name: str, *, backend: str = "flowserve_runner", filename: str = "model.onnx",
               kind: str = "KIND_CPU", with_files: bool = True) -> None:
    """A flow's metadata and the ``config.pbtxt`` (and, ``with_files``, an empty model file) of each direction."""
    models = {d: triton_model_name(name, d) for d in DIRECTIONS}
    FlowMetadata(name=name, family="realnvp", event_shape=(2,), models=models).write(repository)
    for model in models.values():
        (repository / model / "1").mkdir(parents=True)
        (repository / model / "config.pbtxt").write_text(
            f'name: "{model}"\nbackend: "{backend}"\ndefault_model_filename: "{filename}"\n'
            f"instance_group {{ count: 1 kind: {kind} }}\n")
        if with_files:
            (repository / model / "1" / filename).write_bytes(b"")

"""Asyncio client of Triton's gRPC inference protocol, speaking domain errors."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException

from flowserve.spec import DirectionSpec

from .domain import BackendError, BackendUnavailable, DeadlineExceeded, FlowServeError

# Triton's answers by gRPC status code (tritonclient puts ``str(grpc.StatusCode.X)`` in
# ``status()``). NOT_FOUND: the model is not loaded on Triton although its flow is in the
# catalog, which is the server's state, not the client's fault.
_ERROR_OF_STATUS = {
    "StatusCode.DEADLINE_EXCEEDED": DeadlineExceeded,
    "StatusCode.UNAVAILABLE": BackendUnavailable,
    "StatusCode.CANCELLED": BackendUnavailable,
    "StatusCode.NOT_FOUND": BackendUnavailable,
}
# Fallback for errors tritonclient raises itself, without a gRPC status: its message text.
_ERROR_OF_MESSAGE = {
    "Deadline Exceeded": DeadlineExceeded,
    "is not ready": BackendUnavailable,
    "unknown model": BackendUnavailable,
}


def translate_error(exc: InferenceServerException, model: str) -> FlowServeError:
    """The domain error of a tritonclient error: by gRPC status code, or, for errors that
    carry no status, by the message text; anything else is a ``BackendError``."""
    message = exc.message() or str(exc)
    if exc.status():
        error = _ERROR_OF_STATUS.get(exc.status(), BackendError)
    else:
        error = next((e for text, e in _ERROR_OF_MESSAGE.items() if text in message), BackendError)
    if error is DeadlineExceeded:
        return DeadlineExceeded(f"deadline exceeded while {model!r} was running on Triton")
    if error is BackendUnavailable:
        return BackendUnavailable(f"Triton cannot serve {model!r}: {message}")
    return BackendError(f"Triton failed on {model!r}: {message}")


class TritonBackend:
    """The gateway's connection to one Triton server (a :class:`~flowserve.server.backend.Backend`)."""

    def __init__(self, url: str):
        self.url = url
        # Round robin over every address the name resolves to: with a headless Service
        # ("dns:///triton:8001") requests spread over all Triton pods, not one connection.
        self._client = triton_aio.InferenceServerClient(url, channel_args=[
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.lb_policy_name", "round_robin"),
        ])
        self._configs: dict[str, dict] = {}

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self, timeout: float = 1.0) -> bool:
        """Whether Triton answers and reports itself ready."""
        try:
            return await self._client.is_server_ready(client_timeout=timeout)
        except InferenceServerException:
            return False

    async def model_versions(self) -> dict[str, list[str]]:
        """Ready versions of every model Triton has in its repository."""
        try:
            index = await self._client.get_model_repository_index(as_json=True, client_timeout=5.0)
        except InferenceServerException as exc:
            raise translate_error(exc, "the repository index") from exc
        versions: dict[str, list[str]] = {}
        for entry in index.get("models", []):
            if entry.get("state") == "READY":
                versions.setdefault(entry["name"], []).append(entry.get("version", ""))
        return versions

    def forget_configs(self) -> None:
        """Drop the cached model configs; the next call of each model fetches its config again."""
        self._configs.clear()

    async def _config(self, model: str) -> dict:
        """The model's config on Triton, cached per model."""
        if model not in self._configs:
            try:
                response = await self._client.get_model_config(model, as_json=True, client_timeout=5.0)
            except InferenceServerException as exc:
                raise translate_error(exc, model) from exc
            self._configs[model] = response["config"]
        return self._configs[model]

    async def max_batch_size(self, model: str) -> int:
        """``max_batch_size`` from the model's config on Triton."""
        return int((await self._config(model)).get("max_batch_size", 0)) or 1

    async def _wire_names(self, model: str, spec: DirectionSpec) -> DirectionSpec:
        """The spec as Triton names its tensors: the spec's own names, or ``INPUT__<i>`` /
        ``OUTPUT__<i>`` when the model's config uses those (Triton's PyTorch backend)."""
        config = await self._config(model)
        if [t["name"] for t in config.get("input", [])] == spec.positional().input_names:
            return spec.positional()
        return spec

    async def infer(
        self, model: str, spec: DirectionSpec, inputs: dict[str, np.ndarray], timeout: float | None
    ) -> dict[str, np.ndarray]:
        """Run one batch through ``model``; outputs, keyed by the spec's names, are reshaped to [rows, *dims]."""
        wire = await self._wire_names(model, spec)
        requested = []
        for tensor, wire_tensor in zip(spec.inputs, wire.inputs):
            array = inputs[tensor.name]
            infer_input = triton_aio.InferInput(wire_tensor.name, list(array.shape), tensor.triton_dtype)
            infer_input.set_data_from_numpy(array)
            requested.append(infer_input)
        outputs = [triton_aio.InferRequestedOutput(t.name) for t in wire.outputs]
        try:
            result = await self._client.infer(model, requested, outputs=outputs, client_timeout=timeout)
        except InferenceServerException as exc:
            raise translate_error(exc, model) from exc
        rows = next(iter(inputs.values())).shape[0]
        return {t.name: result.as_numpy(w.name).reshape(rows, *t.dims) for t, w in zip(spec.outputs, wire.outputs)}

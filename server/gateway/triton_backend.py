"""Asyncio client of Triton's gRPC inference protocol, speaking domain errors.

It calls Triton's generated stubs (``GRPCInferenceService``) directly: tensors go out as the
request's raw bytes and come back as views of the response's raw bytes, with no wrapper
objects and no copies in between.
"""

from __future__ import annotations

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_grpc

from flowserve.contract.spec import QUEUE_SIZE_PARAMETER, QUEUE_TIMEOUT_PARAMETER, DirectionSpec
from flowserve.server.protocol.errors import (
    BackendError,
    BackendUnavailable,
    DeadlineExceeded,
    FlowServeError,
    ResourceExhausted,
)

from .backend import QueuePolicy

MAX_TRITON_MESSAGE_BYTES = 2**31 - 1
_LOAD_TIMEOUT_S = 300.0  # a model load runs its warm-up batches, up to max_batch_size rows
# Triton's answers by gRPC status code. NOT_FOUND: the model is not loaded on Triton although
# its flow is in the catalog, which is the server's state, not the client's fault.
_ERROR_OF_STATUS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: BackendUnavailable,
    grpc.StatusCode.CANCELLED: BackendUnavailable,
    grpc.StatusCode.NOT_FOUND: BackendUnavailable,
}


# A Python-backend model whose stub process died answers INTERNAL with this until it is
# reloaded (server/gateway/health.py does): the client may retry.
_DEAD_STUB = "is not healthy"
# The dynamic batcher's queue policy rejects with UNAVAILABLE and one of these.
_QUEUE_REJECTIONS = ("Exceeds maximum queue size", "Request timeout expired")
_QUEUE_RETRY_AFTER_S = 0.1


def translate_error(code: grpc.StatusCode, details: str, model: str) -> FlowServeError:
    """The domain error of a failed call to Triton, by its gRPC status code (any code not
    listed is a ``BackendError``), except two answers known by their message: a dead stub
    (``BackendUnavailable``) and a refusal of the queue policy (``ResourceExhausted``)."""
    error = _ERROR_OF_STATUS.get(code, BackendError)
    if code == grpc.StatusCode.INTERNAL and _DEAD_STUB in details:
        error = BackendUnavailable
    if code == grpc.StatusCode.UNAVAILABLE and any(text in details for text in _QUEUE_REJECTIONS):
        return ResourceExhausted(f"Triton's queue for {model!r} is full: {details}; retry later",
                                 retry_after_s=_QUEUE_RETRY_AFTER_S)
    if error is DeadlineExceeded:
        return DeadlineExceeded(f"deadline exceeded while {model!r} was running on Triton")
    if error is BackendUnavailable:
        return BackendUnavailable(f"Triton cannot serve {model!r}: {details}")
    return BackendError(f"Triton failed on {model!r}: {details}")


class TritonBackend:
    """The gateway's connection to one Triton server (a :class:`~flowserve.server.gateway.backend.Backend`)."""

    def __init__(self, url: str):
        self.url = url
        # Round robin over every address the name resolves to: with a headless Service
        # ("dns:///triton:8001") requests spread over all Triton pods, not one connection.
        self._channel = grpc.aio.insecure_channel(url, options=[
            ("grpc.max_send_message_length", MAX_TRITON_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_TRITON_MESSAGE_BYTES),
            ("grpc.lb_policy_name", "round_robin"),
            # Reconnect within a second once a restarted Triton listens again (gRPC's default
            # backoff grows to two minutes).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ])
        self._stub = triton_grpc.GRPCInferenceServiceStub(self._channel)
        self._configs: dict[str, mc.ModelConfig] = {}

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request, timeout: float | None, what: str):
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc.code(), exc.details() or "", what) from exc

    async def is_ready(self, timeout: float = 1.0) -> bool:
        """Whether Triton answers and reports itself ready."""
        try:
            return (await self._call(self._stub.ServerReady, triton_pb.ServerReadyRequest(), timeout, "")).ready
        except FlowServeError:
            return False

    async def model_versions(self) -> dict[str, list[str]]:
        """Ready versions of every model Triton has in its repository."""
        index = await self._call(self._stub.RepositoryIndex, triton_pb.RepositoryIndexRequest(), 5.0,
                                 "the repository index")
        versions: dict[str, list[str]] = {}
        for entry in index.models:
            if entry.state == "READY":
                versions.setdefault(entry.name, []).append(entry.version)
        return versions

    async def model_ready(self, model: str) -> bool:
        """Whether Triton reports ``model`` ready."""
        return (await self._call(self._stub.ModelReady, triton_pb.ModelReadyRequest(name=model), 2.0, model)).ready

    async def probe(self, model: str, spec: DirectionSpec, timeout: float) -> None:
        """Run one row of zeros through ``model``; raises the domain error of its failure."""
        await self.infer(model, spec, {t.name: np.zeros((1, *t.dims), t.dtype) for t in spec.inputs}, timeout)

    async def load_model(self, model: str) -> None:
        """Load ``model`` (Triton in explicit model control mode): new versions or files of a
        loaded model are loaded beside it, and its old version serves until they are ready."""
        await self._call(self._stub.RepositoryModelLoad, triton_pb.RepositoryModelLoadRequest(model_name=model),
                         _LOAD_TIMEOUT_S, model)

    async def unload_model(self, model: str) -> None:
        """Unload ``model`` (Triton in explicit model control mode)."""
        await self._call(self._stub.RepositoryModelUnload, triton_pb.RepositoryModelUnloadRequest(model_name=model),
                         _LOAD_TIMEOUT_S, model)

    def forget_configs(self) -> None:
        """Drop the cached model configs; the next call of each model fetches its config again."""
        self._configs.clear()

    async def _config(self, model: str) -> mc.ModelConfig:
        """The model's config on Triton, cached per model."""
        if model not in self._configs:
            response = await self._call(self._stub.ModelConfig, triton_pb.ModelConfigRequest(name=model), 5.0, model)
            self._configs[model] = response.config
        return self._configs[model]

    async def max_batch_size(self, model: str) -> int:
        """``max_batch_size`` from the model's config on Triton."""
        return (await self._config(model)).max_batch_size or 1

    async def dynamic_batching(self, model: str) -> bool:
        """Whether the model's config turns Triton's dynamic batcher on."""
        return (await self._config(model)).HasField("dynamic_batching")

    async def queue_policy(self, model: str) -> QueuePolicy:
        """The model's queue bounds: from its config's parameters (flowserve's exports), or
        else its dynamic batcher's default queue policy."""
        config = await self._config(model)
        parameters = config.parameters
        if QUEUE_SIZE_PARAMETER in parameters:
            return QueuePolicy(int(parameters[QUEUE_SIZE_PARAMETER].string_value),
                               int(parameters[QUEUE_TIMEOUT_PARAMETER].string_value) / 1000)
        policy = config.dynamic_batching.default_queue_policy
        return QueuePolicy(policy.max_queue_size, policy.default_timeout_microseconds / 1e6)

    async def _wire_names(self, model: str, spec: DirectionSpec) -> DirectionSpec:
        """The spec as Triton names its tensors: the spec's own names, or ``INPUT__<i>`` /
        ``OUTPUT__<i>`` when the model's config uses those (Triton's PyTorch backend)."""
        config = await self._config(model)
        if [t.name for t in config.input] == spec.positional().input_names:
            return spec.positional()
        return spec

    async def infer(
        self, model: str, spec: DirectionSpec, inputs: dict[str, np.ndarray], timeout: float | None
    ) -> dict[str, np.ndarray]:
        """Run one batch through ``model``; outputs, keyed by the spec's names, are read-only
        [rows, *dims] views of Triton's response."""
        wire = await self._wire_names(model, spec)
        request = triton_pb.ModelInferRequest(model_name=model)
        for tensor, wire_tensor in zip(spec.inputs, wire.inputs):
            array = inputs[tensor.name]
            request.inputs.add(name=wire_tensor.name, datatype=tensor.triton_dtype, shape=array.shape)
            request.raw_input_contents.append(np.ascontiguousarray(array, tensor.dtype).tobytes())
        for wire_tensor in wire.outputs:
            request.outputs.add(name=wire_tensor.name)
        response = await self._call(self._stub.ModelInfer, request, timeout, model)
        rows = next(iter(inputs.values())).shape[0]
        position = {output.name: i for i, output in enumerate(response.outputs)}
        try:
            return {t.name: np.frombuffer(response.raw_output_contents[position[w.name]], t.dtype).reshape(rows, *t.dims)
                    for t, w in zip(spec.outputs, wire.outputs)}
        except (KeyError, ValueError) as exc:
            raise BackendError(f"Triton's answer from {model!r} does not match the flow's outputs: {exc}") from exc

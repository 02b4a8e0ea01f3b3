"""A small synchronous client of the flowserve gateway, used by the CLI."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowserve.server.protocol import tensors
from flowserve.server.protocol.auth import bearer_metadata
from flowserve.server.protocol.names import flow_health_service
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc
from flowserve.server.protocol.tls import ClientTLS


@dataclass(frozen=True)
class Samples:
    """Sample's answer: x [num_samples, *event_shape] (with samples_per_context N:
    [B, N, *event_shape]) and log p of the same leading shape when asked for. A stream's chunk
    is [rows, *event_shape]; ``first_row`` places it among the call's rows and
    ``context_index`` (with samples_per_context) says which context each row belongs to.
    Truncated to the support box: the fraction of the call's draws (so far, for a chunk) that
    fell inside it, and their number."""

    x: np.ndarray
    log_prob: np.ndarray | None
    seed: int
    first_row: int = 0
    context_index: np.ndarray | None = None
    acceptance_rate: float = 0.0
    draws: int = 0


@dataclass(frozen=True)
class Scores:
    """LogLikelihood's answer: log p(x | context) per row, and bits/dim when asked for."""

    log_prob: np.ndarray
    bits_per_dim: np.ndarray | None


@dataclass(frozen=True)
class Encoded:
    """Encode's answer: each row's base noise z [N, noise_dim], log|det dz/dx| and log p(x | context)."""

    z: np.ndarray
    log_det: np.ndarray
    log_prob: np.ndarray


class FlowClient:
    """Calls ``flowserve.v1.FlowService`` at ``target`` (``host:port``).

    ``tls``: connect over TLS (None: plaintext). ``token``: sent as ``authorization: Bearer
    <token>`` on every call; :attr:`metadata` carries it for calls made on :attr:`stub` directly.
    """

    def __init__(self, target: str, timeout: float = 60.0, *, tls: ClientTLS | None = None,
                 token: str | None = None):
        self.metadata = () if token is None else (bearer_metadata(token),)
        self.timeout = timeout
        options = [
            ("grpc.max_receive_message_length", tensors.MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", tensors.MAX_MESSAGE_BYTES),
        ]
        if tls is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, tls.credentials(), options=options + tls.channel_options())
        self.stub = pb_grpc.FlowServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "FlowClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health(self, flow: str | None = None) -> str:
        """The gRPC health status of the whole server (service ``""``), or of one ``flow``:
        ``"SERVING"`` when it can serve. Health needs no token."""
        request = health_pb2.HealthCheckRequest(service="" if flow is None else flow_health_service(flow))
        response = health_pb2_grpc.HealthStub(self.channel).Check(request, timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata).models)

    def sample(
        self, model: str, num_samples: int = 0, seed: int | None = None, temperature: float | None = None,
        return_log_prob: bool = True, context: np.ndarray | None = None, samples_per_context: int | None = None,
        *, truncate_to_support: bool = False, max_draws: int | None = None,
    ) -> Samples:
        """Draw samples; ``context`` is [*context_shape] (one for all) or [num_samples, *context_shape].
        With ``samples_per_context`` N, ``context`` is [B, *context_shape] and the answer holds
        N samples for each context: x [B, N, *event_shape], log_prob [B, N].
        ``truncate_to_support``: only samples inside the flow's support box, in at most
        ``max_draws`` draws (unset: the gateway's bound)."""
        request = sample_request(model, num_samples, seed, temperature, return_log_prob, context, samples_per_context,
                                 truncate_to_support=truncate_to_support, max_draws=max_draws)
        response = self.stub.Sample(request, timeout=self.timeout, metadata=self.metadata)
        samples = _samples(response, return_log_prob)
        if samples_per_context is not None and samples.log_prob is not None:
            return dataclasses.replace(samples, log_prob=samples.log_prob.reshape(samples.x.shape[:2]))
        return samples

    def sample_stream(
        self, model: str, num_samples: int = 0, seed: int | None = None, temperature: float | None = None,
        return_log_prob: bool = True, context: np.ndarray | None = None, samples_per_context: int | None = None,
        *, truncate_to_support: bool = False, max_draws: int | None = None,
    ) -> Iterator[Samples]:
        """Draw any number of samples, in consecutive chunks as the gateway sends them: the same
        seed gives the rows of :meth:`sample`. The client's timeout bounds the whole stream."""
        request = sample_request(model, num_samples, seed, temperature, return_log_prob, context, samples_per_context,
                                 truncate_to_support=truncate_to_support, max_draws=max_draws)
        for response in self.stub.SampleStream(request, timeout=self.timeout, metadata=self.metadata):
            yield _samples(response, return_log_prob, samples_per_context)

    def log_likelihood(self, model: str, x: np.ndarray, context: np.ndarray | None = None, *,
                       truncate_to_support: bool = False) -> np.ndarray:
        """log p(x | context) of each row of ``x``; see :meth:`score` for bits/dim."""
        return self.score(model, x, context, truncate_to_support=truncate_to_support).log_prob

    def score(
        self, model: str, x: np.ndarray, context: np.ndarray | None = None, return_bits_per_dim: bool = False, *,
        truncate_to_support: bool = False,
    ) -> Scores:
        """LogLikelihood of each row of ``x``; ``context`` is [N, *context_shape] or [*context_shape].
        ``truncate_to_support``: -inf for rows outside the flow's support box."""
        request = pb.LogLikelihoodRequest(model=model, x=tensors.encode(x), return_bits_per_dim=return_bits_per_dim,
                                          truncate_to_support=truncate_to_support)
        if context is not None:
            request.context.CopyFrom(tensors.encode(context))
        response = self.stub.LogLikelihood(request, timeout=self.timeout, metadata=self.metadata)
        bits_per_dim = np.asarray(response.bits_per_dim, dtype=np.float32) if return_bits_per_dim else None
        return Scores(np.asarray(response.log_prob, dtype=np.float32), bits_per_dim)

    def encode(self, model: str, x: np.ndarray, context: np.ndarray | None = None) -> Encoded:
        """Encode each row of ``x`` (x -> z); ``context`` is [N, *context_shape] or [*context_shape].
        FAILED_PRECONDITION for a flow that cannot encode (a VAE)."""
        request = pb.EncodeRequest(model=model, x=tensors.encode(x))
        if context is not None:
            request.context.CopyFrom(tensors.encode(context))
        response = self.stub.Encode(request, timeout=self.timeout, metadata=self.metadata)
        return Encoded(tensors.decode(response.z, "z"), np.asarray(response.log_det, dtype=np.float32),
                       np.asarray(response.log_prob, dtype=np.float32))


def sample_request(model: str, num_samples: int, seed: int | None, temperature: float | None,
                   return_log_prob: bool, context: np.ndarray | pb.Tensor | None,
                   samples_per_context: int | None = None, *, truncate_to_support: bool = False,
                   max_draws: int | None = None) -> pb.SampleRequest:
    """A SampleRequest; ``seed``, ``temperature``, ``samples_per_context`` and ``max_draws``
    stay unset when None, as does ``context`` (an array, or a Tensor message as it is)."""
    request = pb.SampleRequest(model=model, num_samples=num_samples, return_log_prob=return_log_prob,
                               truncate_to_support=truncate_to_support)
    if max_draws is not None:
        request.max_draws = max_draws
    if samples_per_context is not None:
        request.samples_per_context = samples_per_context
    if seed is not None:
        request.seed = seed
    if temperature is not None:
        request.temperature = temperature
    if context is not None:
        request.context.CopyFrom(context if isinstance(context, pb.Tensor) else tensors.encode(context))
    return request


def _samples(response: pb.SampleResponse, return_log_prob: bool, samples_per_context: int | None = None) -> Samples:
    """The Samples of a response; with ``samples_per_context``, a stream's chunk (flat rows)
    also gets each row's context index, from its first row."""
    x = tensors.decode(response.samples, "samples")
    log_prob = np.asarray(response.log_prob, dtype=np.float32) if return_log_prob else None
    index = None if samples_per_context is None else (response.first_row + np.arange(len(x))) // samples_per_context
    return Samples(x, log_prob, response.seed, response.first_row, index, response.acceptance_rate, response.draws)

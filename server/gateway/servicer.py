"""The thin gRPC servicer: protos to domain objects, the service, and back.

Sample, SampleStream, LogLikelihood and Encode answer with ``tensors.Serialized`` responses, already
in protobuf's wire format (one copy of the arrays instead of four); the handlers that the
interceptor builds send them as they are."""

from __future__ import annotations

import grpc
import numpy as np

from flowserve.contract.metadata import EXACT, LOWER_BOUND
from flowserve.contract.spec import DENSITY, ENCODE, GENERATION
from flowserve.server.protocol import tensors
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc

from .domain import EncodeQuery, LogLikelihoodQuery, SampleQuery
from .service import FlowService

DIRECTION_ENUM = {DENSITY: pb.DIRECTION_DENSITY, GENERATION: pb.DIRECTION_GENERATION, ENCODE: pb.DIRECTION_ENCODE}
LOG_LIKELIHOOD_KIND_ENUM = {
    EXACT: pb.LOG_LIKELIHOOD_KIND_EXACT,
    LOWER_BOUND: pb.LOG_LIKELIHOOD_KIND_LOWER_BOUND,
}


def _context(request: pb.SampleRequest | pb.LogLikelihoodRequest | pb.EncodeRequest) -> np.ndarray | None:
    """The request's context array, or None when the field is unset."""
    if not request.HasField("context"):
        return None
    return tensors.decode(request.context, "context", "[*context_shape] or [N, *context_shape]")


def _sample_query(request: pb.SampleRequest) -> SampleQuery:
    return SampleQuery(
        model=request.model,
        num_samples=request.num_samples,
        seed=request.seed if request.HasField("seed") else None,
        temperature=request.temperature if request.HasField("temperature") else 1.0,
        return_log_prob=request.return_log_prob,
        context=_context(request),
        samples_per_context=request.samples_per_context if request.HasField("samples_per_context") else None,
        truncate_to_support=request.truncate_to_support,
        max_draws=request.max_draws if request.HasField("max_draws") else None,
    )


class FlowServicer(pb_grpc.FlowServiceServicer):
    """flowserve.v1.FlowService over a FlowService."""

    def __init__(self, service: FlowService):
        self.service = service

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        models = await self.service.list_models()
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(
                name=m.name,
                family=m.family,
                event_shape=list(m.event_shape),
                versions=list(m.versions),
                directions=[DIRECTION_ENUM[d] for d in m.directions],
                ready=m.ready,
                metadata=m.metadata,
                context_shape=list(m.context_shape),
                log_likelihood_kind=LOG_LIKELIHOOD_KIND_ENUM[m.log_likelihood],
            )
            for m in models
        ])

    async def Sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext):
        query = _sample_query(request)
        result = await self.service.sample(query, timeout=context.time_remaining())
        rows = len(result.samples) * (query.samples_per_context or 1)
        return tensors.sample_response(result.samples, result.log_prob, result.seed, rows=rows,
                                       acceptance_rate=result.acceptance_rate, draws=result.draws)

    async def SampleStream(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext):
        async for chunk in self.service.sample_stream(_sample_query(request), timeout=context.time_remaining()):
            yield tensors.sample_response(chunk.samples, chunk.log_prob, chunk.seed, chunk.first_row,
                                          acceptance_rate=chunk.acceptance_rate, draws=chunk.draws)

    async def LogLikelihood(self, request: pb.LogLikelihoodRequest, context: grpc.aio.ServicerContext):
        query = LogLikelihoodQuery(
            model=request.model,
            x=tensors.decode(request.x, "x"),
            context=_context(request),
            return_bits_per_dim=request.return_bits_per_dim,
            truncate_to_support=request.truncate_to_support,
        )
        result = await self.service.log_likelihood(query, timeout=context.time_remaining())
        return tensors.log_likelihood_response(result.log_prob, result.bits_per_dim)

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext):
        query = EncodeQuery(model=request.model, x=tensors.decode(request.x, "x"), context=_context(request))
        result = await self.service.encode(query, timeout=context.time_remaining())
        return tensors.encode_response(result.z, result.log_det, result.log_prob)

"""Context and bits/dim on the real Triton and gateway: an unconditional flow refuses a
context, reports an exact likelihood, and gives bits/dim from its log-density."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from helpers.flows import SMALL_CHUNKS

from flowserve.server.client import FlowClient
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.protocol.tensors import encode


def test_live_bits_per_dim_is_log_prob_in_bits_per_dimension(live_server, live_stub, moons):
    x = moons["test"][:300]
    with FlowClient(live_server.target) as client:
        scores = client.score(SMALL_CHUNKS, x, return_bits_per_dim=True)
        assert client.score(SMALL_CHUNKS, x).bits_per_dim is None
    assert scores.bits_per_dim.shape == (300,)
    np.testing.assert_allclose(scores.bits_per_dim, -scores.log_prob.astype(np.float64) / (2 * math.log(2)),
                               rtol=0, atol=1e-6)
    plain = live_stub.LogLikelihood(pb.LogLikelihoodRequest(model=SMALL_CHUNKS, x=encode(x)), timeout=30)
    assert len(plain.log_prob) == 300 and len(plain.bits_per_dim) == 0


@pytest.mark.parametrize("method", ["Sample", "LogLikelihood"])
def test_live_context_for_an_unconditional_model_is_invalid_argument(live_stub, method):
    context = encode(np.ones((3, 2), np.float32))
    if method == "Sample":
        request = pb.SampleRequest(model=SMALL_CHUNKS, num_samples=3, context=context)
    else:
        request = pb.LogLikelihoodRequest(model=SMALL_CHUNKS, x=encode(np.zeros((3, 2))), context=context)
    with pytest.raises(grpc.RpcError) as info:
        getattr(live_stub, method)(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"context.shape is [3, 2] but model '{SMALL_CHUNKS}' takes no context" in info.value.details()


def test_live_list_models_reports_no_context_and_an_exact_likelihood(live_server):
    with FlowClient(live_server.target) as client:
        models = client.list_models()
    assert models and all(list(m.context_shape) == [] for m in models)
    assert all(m.log_likelihood_kind == pb.LOG_LIKELIHOOD_KIND_EXACT for m in models)

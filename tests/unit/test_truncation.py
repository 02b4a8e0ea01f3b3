"""Support-truncated sampling and scoring in the gateway's service, on the in-memory backend
(whose generation gives x = z[:, :4] + sum(context), exactly normal): every kept sample lies
in the box, the acceptance rate is the box's mass, the draws stay within their bound, and
the samples depend on the seed alone (not on Triton's batch size, Sample or SampleStream,
B x N or repeated contexts)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from helpers import fakes
from helpers.clock import run_on_virtual_clock
from helpers.fakes import InMemoryBackend, fake_answer, write_metadata

from flowserve.contract.spec import GENERATION, triton_model_name
from flowserve.server.gateway.catalog import ModelCatalog
from flowserve.server.gateway.domain import LogLikelihoodQuery, SampleQuery
from flowserve.server.gateway.service import TRUNCATION_BLOCK, FlowService, GatewayLimits
from flowserve.server.protocol.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

BOXED, CONDITIONAL, OPEN = "boxed", "boxed-cond", "open"
BOX = {"low": [-1.0, -1.0, -1.0, None], "high": [1.0, 1.0, 1.0, None]}
"""Three bounded values and one open: the fake's x is N(context sum, 1) per value, so the box
holds erf(1/sqrt 2)^3 = 0.318 of the mass at context 0."""
MASS = math.erf(1 / math.sqrt(2)) ** 3


def service(tmp_path, max_batch_size: int = 512, **limits) -> FlowService:
    tmp_path.mkdir(exist_ok=True)
    write_metadata(tmp_path, BOXED, noise_dim=fakes.NOISE_DIM, support_box=BOX)
    write_metadata(tmp_path, CONDITIONAL, noise_dim=fakes.NOISE_DIM, support_box=BOX,
                   context_shape=list(fakes.CONTEXT_SHAPE))
    write_metadata(tmp_path, OPEN, noise_dim=fakes.NOISE_DIM)
    return FlowService(InMemoryBackend(fake_answer, max_batch_size=max_batch_size), ModelCatalog(tmp_path),
                       GatewayLimits(**limits))


def sample(svc: FlowService, **fields):
    return asyncio.run(svc.sample(SampleQuery(**{"return_log_prob": True, "truncate_to_support": True, **fields})))


def stream(svc: FlowService, **fields):
    async def collect():
        query = SampleQuery(**{"return_log_prob": True, "truncate_to_support": True, **fields})
        return [chunk async for chunk in svc.sample_stream(query)]
    return asyncio.run(collect())


def inside(x: np.ndarray) -> np.ndarray:
    rows = x.reshape(len(x), -1)
    return (np.abs(rows[:, :3]) <= 1).all(axis=1)


def test_every_kept_sample_is_inside_and_the_acceptance_rate_is_the_boxs_mass(tmp_path):
    rows = TRUNCATION_BLOCK + 904  # two blocks
    result = sample(service(tmp_path), model=BOXED, num_samples=rows, seed=3)
    assert result.samples.shape == (rows, *fakes.EVENT_SHAPE) and inside(result.samples).all()
    error = math.sqrt(MASS * (1 - MASS) / result.draws)
    assert abs(result.acceptance_rate - MASS) < 4 * error
    assert rows / MASS * 0.8 < result.draws < rows / MASS * 4  # surplus candidates, but not many
    # each bounded value is N(0, 1) truncated to [-1, 1]: variance 1 - 2 phi(1) / (2 Phi(1) - 1)
    variance = 1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2))
    flat = result.samples.reshape(rows, -1)
    assert np.allclose(flat[:, :3].var(axis=0), variance, rtol=0.1)
    assert abs(flat[:, 3].var() - 1) < 0.1  # the open side is not truncated


def test_the_seed_alone_decides_the_samples(tmp_path):
    rows = TRUNCATION_BLOCK + 100
    expected = sample(service(tmp_path / "a", max_batch_size=512), model=BOXED, num_samples=rows, seed=7)
    other_batches = sample(service(tmp_path / "b", max_batch_size=300), model=BOXED, num_samples=rows, seed=7)
    chunks = stream(service(tmp_path / "c", max_batch_size=1000), model=BOXED, num_samples=rows, seed=7)
    assert np.array_equal(other_batches.samples, expected.samples)
    assert np.array_equal(np.concatenate([c.samples for c in chunks]), expected.samples)
    assert np.array_equal(np.concatenate([c.log_prob for c in chunks]), expected.log_prob)
    assert [c.first_row for c in chunks] == [0, 1000, 2000, 3000, 4000, TRUNCATION_BLOCK]  # chunks end with blocks
    assert chunks[-1].draws == expected.draws and chunks[-1].acceptance_rate == expected.acceptance_rate
    assert [c.draws for c in chunks] == sorted(c.draws for c in chunks)  # each chunk reports the call so far
    untruncated = asyncio.run(service(tmp_path / "d").sample(SampleQuery(model=BOXED, num_samples=rows, seed=7)))
    assert not np.array_equal(untruncated.samples, expected.samples) and untruncated.draws == 0


def test_each_context_gets_samples_inside_the_box_and_b_by_n_is_the_repeated_call(tmp_path):
    contexts = np.array([[0, 0, 0], [0.2, 0.2, 0.2], [-0.3, 0, 0]], np.float32)  # shifts 0, 0.6, -0.3
    svc = service(tmp_path, max_batch_size=64)
    per_context = sample(svc, model=CONDITIONAL, context=contexts, num_samples=0, samples_per_context=500,
                         seed=5)
    repeated = sample(svc, model=CONDITIONAL, context=np.repeat(contexts, 500, axis=0), num_samples=1500, seed=5)
    assert per_context.samples.shape == (3, 500, *fakes.EVENT_SHAPE)
    assert np.array_equal(per_context.samples.reshape(repeated.samples.shape), repeated.samples)
    assert inside(repeated.samples).all()
    # the fake shifts x by the context's sum, so the box cuts a different share for each context
    means = per_context.samples.reshape(3, 500, -1)[:, :, :3].mean(axis=(1, 2))
    assert means[1] > 0.1 and means[2] < -0.05 and abs(means[0]) < 0.05


def test_the_draws_stay_within_their_bound_and_then_the_call_is_refused(tmp_path):
    svc = service(tmp_path, max_batch_size=512)
    with pytest.raises(ResourceExhausted, match=r"kept \d+ of 1000 samples inside the support box in 1000 draws "
                                                r"\(acceptance rate 0\.3\d*\)"):
        sample(svc, model=BOXED, num_samples=1000, seed=1, max_draws=1000)
    generation = triton_model_name(BOXED, GENERATION)
    drawn = sum(len(inputs["z"]) for model, _, inputs in svc.backend.calls if model == generation)
    assert drawn == 1000
    result = sample(svc, model=BOXED, num_samples=1000, seed=1, max_draws=20_000)
    assert result.draws <= 20_000 and inside(result.samples).all()


def test_a_truncated_call_holds_its_rounds_candidates_in_the_in_flight_budget(tmp_path):
    svc = service(tmp_path)

    async def scenario() -> tuple[int, int]:
        svc.backend.gate = asyncio.Event()
        query = SampleQuery(model=BOXED, num_samples=100, seed=1, truncate_to_support=True, max_draws=1000)
        call = asyncio.create_task(svc.sample(query))
        await asyncio.sleep(0.01)  # waiting on the backend, its rows reserved
        held = svc._rows_in_flight
        streamed = svc.sample_stream(SampleQuery(model=BOXED, num_samples=10_000, seed=1, truncate_to_support=True))
        first = asyncio.create_task(anext(streamed))
        await asyncio.sleep(0.01)
        both = svc._rows_in_flight
        svc.backend.gate.set()
        await call, await first
        await streamed.aclose()
        return held, both

    held, both = run_on_virtual_clock(scenario())
    assert held == 100 + 1000  # its results, and candidates up to its draw bound
    assert both - held == TRUNCATION_BLOCK + 4 * TRUNCATION_BLOCK  # a block of results, a round of candidates
    assert svc._rows_in_flight == 0


@pytest.mark.parametrize(("fields", "error", "message"), [
    ({"model": OPEN}, FailedPrecondition, "model 'open' has no support box to truncate to"),
    ({"model": BOXED, "truncate_to_support": False, "max_draws": 50}, InvalidArgument,
     "max_draws bounds truncated sampling: it goes with truncate_to_support"),
    ({"model": BOXED, "max_draws": 9}, InvalidArgument, r"max_draws must be in 10\.\.1000 for 10 samples"),
    ({"model": BOXED, "max_draws": 1001}, InvalidArgument, r"max_draws must be in 10\.\.1000"),
])
def test_truncation_that_cannot_be_served_is_refused_by_name(tmp_path, fields, error, message):
    with pytest.raises(error, match=message):
        sample(service(tmp_path), num_samples=10, **fields)


def test_scores_outside_the_box_are_minus_infinity_when_asked(tmp_path):
    svc = service(tmp_path)
    x = np.array([[0, 0, 0, 5], [0, 2, 0, 0], [1, -1, 1, -9]], np.float32).reshape(3, *fakes.EVENT_SHAPE)
    plain = asyncio.run(svc.log_likelihood(LogLikelihoodQuery(model=BOXED, x=x)))
    truncated = asyncio.run(svc.log_likelihood(LogLikelihoodQuery(model=BOXED, x=x, truncate_to_support=True)))
    assert np.isfinite(plain.log_prob).all()
    assert truncated.log_prob[1] == -np.inf and np.array_equal(truncated.log_prob[[0, 2]], plain.log_prob[[0, 2]])
    with pytest.raises(FailedPrecondition, match="model 'open' has no support box"):
        asyncio.run(svc.log_likelihood(LogLikelihoodQuery(model=OPEN, x=x, truncate_to_support=True)))

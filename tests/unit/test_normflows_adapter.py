"""The normflows adapter, in process: each supported flow computes normflows' own numbers in
both directions (before and after its matrices are computed for export), and what it cannot
export is refused by name. Exports and live serving are in tests/e2e/test_normflows.py."""

from __future__ import annotations

import normflows as nf
import pytest
import torch
from helpers import normflows_flows
from helpers.flows import add_weight_noise
from helpers.normflows_flows import library_generation, library_log_prob

from flowserve.export.adapters.builder import wrap
from flowserve.export.adapters.normflows import NormflowsFlow

pytestmark = pytest.mark.filterwarnings("ignore:torch.lu is deprecated:UserWarning")  # normflows' Invertible1x1Conv

# name: (builder, context values)
FLOWS = {
    "realnvp": (normflows_flows.realnvp, 0),
    "coupling-blocks": (normflows_flows.coupling_blocks, 0),
    "glow": (normflows_flows.glow, 0),
    "maf": (normflows_flows.maf, 0),
    "maf-conditional": (lambda: normflows_flows.maf(context=3), 3),
    "coupled-spline": (normflows_flows.coupled_spline, 0),
    "autoregressive-spline": (normflows_flows.autoregressive_spline, 0),
    "autoregressive-spline-conditional": (lambda: normflows_flows.autoregressive_spline(context=3), 3),
}


def random_flow(name: str) -> tuple[NormflowsFlow, torch.Tensor, torch.Tensor | None]:
    """The flow ``name`` in float64 with seeded noise on every weight, its ActNorms
    initialised on a batch (as training does), and data rows (some beyond the splines'
    tail bound of 4) and contexts to evaluate it at."""
    make, context = FLOWS[name]
    torch.manual_seed(0)
    flow = make()
    add_weight_noise(flow)
    model = NormflowsFlow(flow.double(), context)
    x = 3 * torch.randn(32, *model.event_shape, dtype=torch.float64)
    contexts = torch.randn(32, context, dtype=torch.float64) if context else None
    with torch.no_grad():
        library_log_prob(flow, x, contexts)
    return model.eval(), x, contexts


@pytest.mark.parametrize("name", FLOWS)
def test_the_normflows_adapter_computes_what_normflows_computes(name):
    model, x, context = random_flow(name)
    z = torch.randn(32, model.noise_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_log_prob = library_log_prob(model.flow, x, context)
        expected_x, expected_sample_log_prob = library_generation(model.flow, z, context)
        for stage in ("normflows' matrices", "matrices computed for export"):
            assert torch.allclose(model.log_prob(x, context), expected_log_prob, rtol=0, atol=1e-10), stage
            samples, log_prob = model.sample_with_log_prob(z, context)
            assert torch.allclose(samples, expected_x, rtol=0, atol=1e-10), stage
            assert torch.allclose(log_prob, expected_sample_log_prob, rtol=0, atol=1e-10), stage
            encoded, log_det, encoded_log_prob = model.encode(samples, context)
            assert torch.allclose(encoded, z, rtol=0, atol=1e-9) and torch.equal(encoded_log_prob,
                                                                                 model.log_prob(samples, context))
            model.prepare_for_export()
    assert samples.shape == (32, *model.event_shape) and log_det.shape == (32,)
    assert model.config()["library"].startswith("normflows 1.7")


def test_a_glow_flow_serves_the_images_its_squeeze_makes():
    model, _, _ = random_flow("glow")
    assert model.event_shape == (1, 8, 8) and model.noise_dim == 64  # a 4 x 4 x 4 base, squeezed
    assert model.config()["transforms"][:4] == ["Split", "AffineCoupling", "Merge", "Invertible1x1Conv"]


def test_layers_and_bases_normflows_cannot_export_are_refused_by_name():
    planar = nf.NormalizingFlow(nf.distributions.DiagGaussian(2), [nf.flows.Planar((2,))])
    with pytest.raises(ValueError, match="normflows layer Planar cannot be exported; supported: ActNorm, "):
        NormflowsFlow(planar)
    circular = nf.NormalizingFlow(nf.distributions.DiagGaussian(2), [
        nf.flows.CircularCoupledRationalQuadraticSpline(2, 1, 8, [0])])
    with pytest.raises(ValueError, match="normflows layer CircularCoupledRationalQuadraticSpline cannot be exported"):
        NormflowsFlow(circular)
    mixture = nf.NormalizingFlow(nf.distributions.GaussianMixture(3, 2), [nf.flows.Permute(2)])
    with pytest.raises(ValueError, match="base distribution GaussianMixture cannot be exported"):
        NormflowsFlow(mixture)
    with pytest.raises(TypeError, match="expected a normflows NormalizingFlow or ConditionalNormalizingFlow, got "
                                        "MultiscaleFlow"):
        NormflowsFlow(nf.MultiscaleFlow([nf.distributions.DiagGaussian(2)], [[nf.flows.Permute(2)]], [],
                                        class_cond=False))
    warm = normflows_flows.realnvp()
    warm.q0.temperature = 0.5
    with pytest.raises(ValueError, match="set q0.temperature = None"):
        NormflowsFlow(warm)


def test_an_actnorm_that_never_saw_data_is_refused_at_export():
    model = NormflowsFlow(normflows_flows.realnvp())
    with pytest.raises(ValueError, match="ActNorm was never initialised"):
        model.prepare_for_export()
    model.log_prob(torch.randn(8, 2))  # normflows initialises it on this batch
    assert model.prepare_for_export() is model


def test_a_flow_and_its_rows_must_agree_on_context_and_size():
    with pytest.raises(ValueError, match="ConditionalNormalizingFlow is served with a context; the rows given have "
                                         "none"):
        NormflowsFlow(normflows_flows.maf(context=2))
    with pytest.raises(ValueError, match="NormalizingFlow is served without a context"):
        NormflowsFlow(normflows_flows.maf(), context=2)
    assert isinstance(wrap(normflows_flows.glow(), 64), NormflowsFlow)  # image rows arrive flattened
    with pytest.raises(ValueError, match=r"the normflows flow is over rows of 64 values \(1 x 8 x 8\), not 12"):
        wrap(normflows_flows.glow(), 12)

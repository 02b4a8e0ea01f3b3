"""The adapters of zuko and nflows flows, in process: each computes what its library
computes, refuses what it cannot export by name, and users' builder files get the adapter
of their library. Exports and live serving are in tests/e2e/test_adapters_export.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zuko
from helpers.library_adapters import (
    NFLOWS_FLOWS,
    ZUKO_FLOWS,
    inputs,
    library_generation,
    library_log_prob,
    perturbed,
    perturbed_nflows,
)
from helpers.library_flows import nflows_maf
from helpers.sbi_posteriors import SBI_MODELS, THETA, X, sbi_generation, sbi_log_prob, sbi_posterior
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow as NflowsBase
from nflows.nn.nets import ResidualNet
from nflows.transforms.base import CompositeTransform
from nflows.transforms.coupling import AffineCouplingTransform
from sbi.neural_nets import posterior_nn
from sbi.utils import BoxUniform

from flowserve.export.adapters.builder import wrap
from flowserve.export.adapters.nflows import NflowsFlow
from flowserve.export.adapters.sbi import SbiPosterior, box_support
from flowserve.export.adapters.zuko import ZukoFlow
from flowserve.export.data import two_moons
from flowserve.export.exporter.graphs import EmbeddingApart
from flowserve.export.exporter.pipeline import export_model
from flowserve.export.exporter.triton_config import ServingConfig


# name: (builder, features, context, autoregressive transforms)
@pytest.mark.parametrize("name", ZUKO_FLOWS)
def test_the_adapter_computes_what_zuko_computes(name):
    model = perturbed(name)
    x, context = inputs(model, 16, seed=1)
    z, _ = inputs(model, 16, seed=2)
    with torch.no_grad():
        assert torch.equal(model.log_prob(x, context), library_log_prob(model, x, context))
        for got, expected in zip(model.sample_with_log_prob(z, context), library_generation(model, z, context)):
            assert torch.equal(got, expected)


def test_the_adapter_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(TypeError, match="expected a zuko.flows.Flow, got Linear"):
        ZukoFlow(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="ZukoFlow exports to onnx only, not torchscript"):
        export_model(perturbed("maf"), tmp_path, name="ts", example_data=np.zeros((4, 4), np.float32),
                     serving=ServingConfig(format="torchscript"))


# name: (builder, context, autoregressive layers)
@pytest.mark.parametrize("name", NFLOWS_FLOWS)
def test_the_nflows_adapter_computes_what_nflows_computes(name):
    model = perturbed_nflows(name)
    x, context = inputs(model, 16, seed=1)
    z, _ = inputs(model, 16, seed=2)
    x = 3 * x  # some values beyond the splines' tail bound of 4
    with torch.no_grad():
        assert torch.equal(model.log_prob(x, context), library_log_prob(model, x, context))
        for got, expected in zip(model.sample_with_log_prob(z, context), library_generation(model, z, context)):
            assert torch.equal(got, expected)


def test_the_nflows_adapter_names_a_layer_it_cannot_export():
    mask = (torch.arange(4) % 2).long()
    coupling = AffineCouplingTransform(mask, lambda inputs, outputs: ResidualNet(inputs, outputs, 8))
    with pytest.raises(ValueError, match="nflows transform AffineCouplingTransform cannot be exported"):
        NflowsFlow(NflowsBase(CompositeTransform([coupling]), StandardNormal([4])))
    with pytest.raises(TypeError, match="expected an nflows.flows.Flow"):
        NflowsFlow(torch.nn.Linear(2, 2))


BUILDER = '''
import zuko


def build():
    return zuko.flows.MAF(2, transforms=3)


def build_conditional():
    return zuko.flows.NSF(2, 1, transforms=2)


def not_a_flow():
    return "a string"
'''


@pytest.fixture
def user_files(tmp_path):
    """A builder file, a MAF's state dict (untrained: only the errors matter here), and rows."""
    builder = tmp_path / "my_flows.py"
    builder.write_text(BUILDER)
    torch.manual_seed(0)
    model = ZukoFlow(zuko.flows.MAF(2, transforms=3), 2)
    rows = two_moons(1000, seed=1)
    torch.save(model.flow.state_dict(), tmp_path / "maf.pt")
    np.save(tmp_path / "heldout.npy", rows[-100:])
    return tmp_path, model


@pytest.mark.parametrize(("function", "extra", "message"), [
    ("missing", [], "has no function 'missing'"),
    ("not_a_flow", [], "the builder returned a str, which is neither a zuko, nflows or normflows flow, an sbi "
                       "posterior nor a torch.nn.Module"),
    ("build_conditional", ["--weights", "maf.pt"], "maf.pt does not fit the flow the builder returns"),
    ("build", ["--data", "wide.npy"], "the zuko flow is over 2 features, not 3"),
    ("build", ["--data", "nowhere.npy"], "nowhere.npy"),
])
def test_cli_export_of_a_users_flow_says_what_is_wrong(user_files, capsys, monkeypatch, function, extra, message):
    from flowserve import cli

    folder, _ = user_files
    np.save(folder / "wide.npy", np.zeros((20, 3), np.float32))
    monkeypatch.chdir(folder)
    arguments = ["--data", "heldout.npy", *extra] if "--data" not in extra else extra
    code = cli.main(["export", "--module", f"my_flows.py:{function}", *arguments, "--model-repository", "repo"])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (folder / "repo").exists()


def test_cli_export_wants_a_checkpoint_or_a_module(capsys):
    from flowserve import cli

    assert cli.main(["export"]) == 1
    assert "give a checkpoint of flowserve train, or --module FILE.py:FUNCTION with --data" in capsys.readouterr().err


def test_builders_flows_get_their_librarys_adapter():
    assert isinstance(wrap(zuko.flows.MAF(2, transforms=1), 2), ZukoFlow)
    adapted = wrap(nflows_maf(2, context=1, layers=1), 2, 1)
    assert isinstance(adapted, NflowsFlow) and adapted.context_dim == 1
    with pytest.raises(ValueError, match="the nflows flow is over 2 features, not 3"):
        wrap(nflows_maf(2, layers=1), 3)
    own = perturbed("maf")  # already follows the protocol
    assert wrap(own, 4) is own


@pytest.mark.parametrize("make", [lambda: perturbed("nsf-embedded"), lambda: perturbed_nflows("maf-embedded")],
                         ids=["zuko", "nflows"])
def test_a_librarys_embedding_net_is_the_context_embedding_the_exporter_serves_apart(make):
    model = make()
    apart = EmbeddingApart(model)
    assert (apart.context_dim, apart.embedded_dim) == (3, 5)
    x, context = inputs(model, 16, seed=4)
    z, _ = inputs(model, 16, seed=5)
    with torch.no_grad():
        embedded = apart.context_embedding(context)
        assert torch.equal(apart.log_prob(x, embedded), library_log_prob(model, x, context))
        for got, expected in zip(apart.sample_with_log_prob(z, embedded), library_generation(model, z, context)):
            assert torch.equal(got, expected)
    assert model.context_embedding is not None  # the user's model is left as it was


def test_flows_without_an_embedding_net_have_no_context_embedding():
    assert perturbed_nflows("maf-conditional").context_embedding is None  # nflows' default identity
    assert perturbed("nsf-conditional").context_embedding is None
    with pytest.raises(ValueError, match="an embedding needs the size of the context"):
        ZukoFlow(zuko.flows.NSF(4, 5), 4, embedding=torch.nn.Linear(3, 5))


@pytest.mark.parametrize("model", SBI_MODELS)
@pytest.mark.filterwarnings("ignore:torch.triangular_solve is deprecated")  # nflows' LULinear, in sbi's nsf
def test_an_sbi_posterior_serves_sbis_numbers(model):
    posterior = sbi_posterior(model)
    served = wrap(posterior, THETA, X).double()
    posterior.posterior_estimator.double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, X, generator=generator, dtype=torch.float64) + 1.0
    z = torch.randn(16, THETA, generator=generator, dtype=torch.float64)
    prior_theta = 4 * torch.rand(16, THETA, generator=generator, dtype=torch.float64) - 2
    with torch.no_grad():
        theta, log_prob = served.sample_with_log_prob(z, x)
        assert torch.allclose(theta, sbi_generation(posterior, z, x), rtol=0, atol=1e-10)
        estimator_log_prob = posterior.posterior_estimator.log_prob(theta.unsqueeze(0), x)[0]
        assert torch.allclose(log_prob, estimator_log_prob, rtol=1e-6, atol=0)
        # sbi's posterior gives -inf outside the prior's support, so compare inside it
        expected = sbi_log_prob(posterior, prior_theta, x).double()
        assert torch.allclose(served.log_prob(prior_theta, x), expected, rtol=1e-6, atol=0)
    assert served.support_box == ([-2.0] * THETA, [2.0] * THETA)
    assert served.config()["library"].startswith("sbi ")
    embedding = served.context_embedding
    assert isinstance(embedding, torch.nn.Sequential) and type(embedding[0]).__name__ == "Standardize"


def test_sbi_estimators_that_are_not_flows_are_refused_by_name():
    torch.manual_seed(0)
    theta, x = torch.randn(64, 2), torch.randn(64, 2)
    mixture = posterior_nn(model="mdn", num_components=2)(theta, x)
    with pytest.raises(ValueError, match="sbi estimator MixtureDensityEstimator cannot be served"):
        SbiPosterior(mixture)


def test_a_prior_support_is_recorded_when_it_is_a_box():
    low = torch.tensor([-1.0, 0.0])
    assert box_support(BoxUniform(low, torch.tensor([1.0, 3.0])), 2) == ([-1.0, 0.0], [1.0, 3.0])
    normal = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    assert box_support(normal, 2) is None  # the whole space: nothing to truncate
    gamma = torch.distributions.Independent(torch.distributions.Gamma(torch.ones(2), torch.ones(2)), 1)
    assert box_support(gamma, 2) == ([0.0, 0.0], [math.inf, math.inf])

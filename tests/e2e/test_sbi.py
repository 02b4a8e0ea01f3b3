"""An sbi posterior trained with sbi, exported with ``flowserve export --module`` from a
builder file and its saved weights, and served by Triton through the gateway: sbi's numbers,
the closed-form posterior, and sampling truncated to a box given at export against sbi's own
rejection sampling."""

from __future__ import annotations

import copy
import math

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from helpers.processes import start_serve, stop_serve, wait_for_health
from sbi.inference import NPE
from sbi.samplers.rejection.rejection import accept_reject_sample
from sbi.utils import BoxUniform, within_support
from scipy import stats
from torch.utils.tensorboard import SummaryWriter

from flowserve import cli
from flowserve.contract.metadata import FlowMetadata, metadata_path
from flowserve.server.client import FlowClient

# The builder file a user writes: the posterior as sbi builds it, to load the saved weights into.
BUILDER = '''
import torch
from sbi.inference.posteriors.direct_posterior import DirectPosterior
from sbi.neural_nets import posterior_nn

DIM = 3
PRIOR = torch.distributions.MultivariateNormal(torch.zeros(DIM), 0.1 * torch.eye(DIM))


def estimator():
    """sbi's MAF of θ given x, x through an embedding net (behind sbi's z-scoring)."""
    embedding = torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    return posterior_nn(model="maf", hidden_features=50, num_transforms=5, embedding_net=embedding)


def build():
    batch = torch.randn(2, DIM)  # shapes only: the weights and the z-scoring come from the saved state
    return DirectPosterior(estimator()(batch, batch), PRIOR)
'''
DIM, OBSERVATIONS, PER = 3, 16, 500
BOX = 0.25  # the box given at export: [-0.25, 0.25]^3, 7% of the first observation's posterior
NAME = "gaussian-npe"


def simulate(theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The Gaussian linear simulator: x ~ N(θ, 0.1 I). Under the prior N(0, 0.1 I) the
    posterior is N(x / 2, 0.05 I)."""
    return theta + math.sqrt(0.1) * torch.randn(theta.shape, generator=generator)


def typical_observations(generator: torch.Generator) -> np.ndarray:
    """OBSERVATIONS draws of the simulator under the prior, among those within 1.8 standard
    deviations (of x, which is N(0, 0.2 I)) in every value: NPE learns the posterior where
    the simulations were, and its fit thins out in the tails."""
    theta = math.sqrt(0.1) * torch.randn(20 * OBSERVATIONS, DIM, generator=generator)
    x = simulate(theta, generator)
    return x[(x.abs() < 1.8 * math.sqrt(0.2)).all(dim=1)][:OBSERVATIONS].numpy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The builder file, sbi's trained posterior (float64 copy as the reference) and the
    repository its CLI export wrote."""
    folder = tmp_path_factory.mktemp("sbi")
    (folder / "gaussian_npe.py").write_text(BUILDER)
    builder: dict = {}
    exec(BUILDER, builder)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)  # not the global seed: the noise must not be θ's draws
    theta = builder["PRIOR"].sample((10_000,))
    x = simulate(theta, generator)
    inference = NPE(prior=builder["PRIOR"], density_estimator=builder["estimator"](), show_progress_bars=False,
                    summary_writer=SummaryWriter(folder / "sbi-logs"))  # sbi's default writes into the cwd
    estimator = inference.append_simulations(theta, x).train(training_batch_size=256, learning_rate=1e-3,
                                                             stop_after_epochs=30, max_num_epochs=100,
                                                             show_train_summary=False)
    torch.save(estimator.state_dict(), folder / "estimator.pt")
    np.save(folder / "theta.npy", theta[:512].numpy())
    np.save(folder / "x.npy", x[:512].numpy())
    low, high = ",".join([str(-BOX)] * DIM), ",".join([str(BOX)] * DIM)
    code = cli.main(["export", "--module", f"{folder / 'gaussian_npe.py'}:build", "--weights",
                     str(folder / "estimator.pt"), "--data", str(folder / "theta.npy"), "--context",
                     str(folder / "x.npy"), f"--support-low={low}", f"--support-high={high}", "--name", NAME,
                     "--model-repository", str(folder / "repo")])
    assert code == 0
    reference = builder["build"]()
    reference.posterior_estimator.load_state_dict(estimator.state_dict())
    reference.posterior_estimator.double().eval()
    return folder, reference


@pytest.fixture(scope="module")
def served(trained):
    """What the gateway answers for the observations, in one Triton run."""
    folder, _ = trained
    observations = typical_observations(torch.Generator().manual_seed(2))
    theta = np.random.default_rng(2).normal(0, 0.3, (OBSERVATIONS, DIM)).astype(np.float32)
    answers = {"observations": observations, "theta": theta}
    process, port, _ = start_serve(folder / "repo", folder / "serve")
    target = f"127.0.0.1:{port}"
    try:
        wait_for_health(target, process, health_pb2.HealthCheckResponse.SERVING)
        with FlowClient(target) as client:
            answers["model"] = next(m for m in client.list_models() if m.name == NAME)
            answers["samples"] = client.sample(NAME, seed=3, context=observations, samples_per_context=PER)
            answers["stream"] = list(client.sample_stream(NAME, seed=3, context=observations, samples_per_context=PER))
            answers["log_prob"] = client.log_likelihood(NAME, theta, observations)
            answers["truncated_log_prob"] = client.log_likelihood(NAME, theta, observations, truncate_to_support=True)
            answers["truncated"] = client.sample(NAME, 4000, seed=4, context=observations[0],
                                                 truncate_to_support=True)
            with pytest.raises(grpc.RpcError) as refused:
                client.sample(NAME, 4000, seed=4, context=observations[0], truncate_to_support=True, max_draws=4000)
            answers["refused"] = refused.value
    finally:
        assert stop_serve(process) == 0
    return answers


def test_the_export_records_sbi_its_embedding_apart_and_the_box(trained, served):
    folder, _ = trained
    meta = FlowMetadata.read(metadata_path(folder / "repo", NAME))
    assert meta.family == "sbi" and meta.architecture["estimator"] == "NFlowsFlow" and "embed" in meta.models
    assert meta.architecture["library"].startswith("sbi 0.27") and meta.graphs["generation"]["loops"] == 5
    assert meta.support_box == {"low": [-BOX] * DIM, "high": [BOX] * DIM}
    assert served["model"].metadata["support_box.high"] == f"[{BOX}, {BOX}, {BOX}]"


def test_served_samples_and_log_p_are_sbis(trained, served):
    _, reference = trained
    observations = torch.from_numpy(served["observations"]).double()
    noise = np.random.Generator(np.random.PCG64(3)).standard_normal((OBSERVATIONS * PER, DIM), dtype=np.float32)
    net = reference.posterior_estimator.net
    contexts = observations.repeat_interleave(PER, dim=0)
    with torch.no_grad():
        expected, _ = net._transform.inverse(torch.from_numpy(noise).double(), context=net._embedding_net(contexts))
        expected_log_prob = torch.stack([reference.log_prob(torch.from_numpy(served["theta"][i:i + 1]).double(),
                                                            x=observations[i], norm_posterior=False)[0]
                                         for i in range(OBSERVATIONS)])
    samples = served["samples"]
    assert samples.x.shape == (OBSERVATIONS, PER, DIM)
    np.testing.assert_allclose(samples.x.reshape(-1, DIM), expected.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(served["log_prob"], expected_log_prob.numpy(), rtol=1e-4, atol=0)
    streamed = np.concatenate([chunk.x for chunk in served["stream"]])
    np.testing.assert_array_equal(streamed, samples.x.reshape(-1, DIM))


def test_served_samples_pass_a_two_sample_test_against_the_closed_form_posterior(served):
    """Per observation and value, Kolmogorov-Smirnov against N(x / 2, 0.05 I), Bonferroni-corrected."""
    rng = np.random.default_rng(5)
    threshold = 0.01 / (OBSERVATIONS * DIM)
    p_values = []
    for observation, samples in zip(served["observations"], served["samples"].x, strict=True):
        exact = observation / 2 + math.sqrt(0.05) * rng.standard_normal((PER, DIM))
        p_values += [stats.ks_2samp(samples[:, d], exact[:, d]).pvalue for d in range(DIM)]
    assert min(p_values) > threshold, sorted(p_values)[:5]


def test_truncated_sampling_keeps_to_the_box_and_accepts_as_often_as_sbi(trained, served):
    _, reference = trained
    truncated = served["truncated"]
    assert truncated.x.shape == (4000, DIM) and (np.abs(truncated.x) <= BOX).all()
    assert 4000 <= truncated.draws <= 4000 * 100
    box = BoxUniform(-BOX * torch.ones(DIM), BOX * torch.ones(DIM))
    observation = torch.from_numpy(served["observations"][:1])
    estimator = copy.deepcopy(reference.posterior_estimator).float()  # nflows samples its base noise in float32
    torch.manual_seed(6)
    with torch.no_grad():
        _, sbi_rate = accept_reject_sample(estimator.sample, lambda t: within_support(box, t),
                                           num_samples=4000, show_progress_bars=False,
                                           proposal_sampling_kwargs={"condition": observation})
    sbi_rate = float(sbi_rate.reshape(-1)[0])
    # sbi drew at least 4000 / rate proposals: the error bound below is conservative
    error = math.sqrt(sbi_rate * (1 - sbi_rate) * (1 / truncated.draws + sbi_rate / 4000))
    assert 0.05 < sbi_rate < 0.9 and abs(truncated.acceptance_rate - sbi_rate) < 4 * error
    assert served["refused"].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "kept" in served["refused"].details() and "4000 draws" in served["refused"].details()
    inside = (np.abs(served["theta"]) <= BOX).all(axis=1)
    assert 0 < inside.sum() < OBSERVATIONS
    np.testing.assert_array_equal(served["truncated_log_prob"][inside], served["log_prob"][inside])
    assert (served["truncated_log_prob"][~inside] == -np.inf).all()

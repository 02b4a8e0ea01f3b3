"""sbi posteriors as sbi builds them (``posterior_nn``), for the adapter tests: untrained,
with seeded noise on every weight, over θ (3) given x (3) through an embedding net (x -> 4)
behind sbi's z-scoring, with a box prior."""

from __future__ import annotations

import torch
from helpers.flows import add_weight_noise
from sbi.inference.posteriors.direct_posterior import DirectPosterior
from sbi.neural_nets import posterior_nn
from sbi.utils import BoxUniform

SBI_MODELS = ("maf", "nsf", "zuko_maf", "zuko_nsf")
"""``posterior_nn`` models: sbi's nflows MAF and NSF, and its zuko MAF and NSF."""
THETA, X = 3, 3


def sbi_posterior(model: str, seed: int = 0) -> DirectPosterior:
    """sbi's ``model`` in a DirectPosterior with the prior U([-2, 2]^3)."""
    torch.manual_seed(seed)
    prior = BoxUniform(-2 * torch.ones(THETA), 2 * torch.ones(THETA))
    theta = prior.sample((256,))
    x = 0.5 * theta + 0.3 * torch.randn_like(theta) + 1.0  # z-scoring that is not the identity
    estimator = posterior_nn(model=model, hidden_features=16, num_transforms=2,
                             embedding_net=torch.nn.Linear(X, 4))(theta, x)
    add_weight_noise(estimator)
    return DirectPosterior(estimator.eval(), prior)


def sbi_generation(posterior: DirectPosterior, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """θ from base noise z given x, through sbi's own flow (its nflows or zuko net)."""
    estimator = posterior.posterior_estimator
    if type(estimator).__name__ == "ZukoFlow":
        return estimator.net(estimator.embedding_net(x)).transform.inv(z)
    return estimator.net._transform.inverse(z, context=estimator.net._embedding_net(x))[0]


def sbi_log_prob(posterior: DirectPosterior, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sbi's unnormalized log posterior of each (θ, x) row: ``log_prob(norm_posterior=False)``."""
    return torch.cat([posterior.log_prob(theta[i:i + 1], x=x[i:i + 1], norm_posterior=False)
                      for i in range(len(theta))])

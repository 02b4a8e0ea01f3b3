"""An sbi posterior (or the density estimator inside it) as a servable model.

sbi (0.27) wraps an nflows or a zuko flow in its own estimator classes: ``NFlowsFlow`` (the
``maf`` and ``nsf`` of ``posterior_nn``) and ``ZukoFlow`` (``zuko_maf``, ``zuko_nsf``...).
Its z-scoring of θ is the flow's first transform, its z-scoring of x sits in front of the
embedding net; both are kept as they are. The flow is served through flowserve's nflows or
zuko adapter, with sbi's embedding net (z-scoring included) as the context embedding that
flowserve exports apart. A ``DirectPosterior`` also gives its prior, whose support, when it
is a box, is recorded for support-truncated sampling.

Served log p is the flow's: sbi's ``log_prob(..., norm_posterior=False)`` inside the prior's
support (sbi gives -inf outside it; the gateway does so when a request asks to truncate).
"""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

import torch
from sbi.inference.posteriors.direct_posterior import DirectPosterior
from sbi.neural_nets.estimators.nflows_flow import NFlowsFlow
from sbi.neural_nets.estimators.zuko_flow import ZukoFlow as SbiZukoFlow
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from .nflows import NflowsFlow
from .zuko import ZukoFlow


class SbiPosterior(nn.Module):
    """``posterior`` (an sbi ``DirectPosterior``, or an ``NFlowsFlow`` or ``ZukoFlow``
    estimator) in flowserve's model protocol: θ given x. ``support_box`` is ``(low, high)``,
    per feature of θ (``±inf`` for an open side): the prior's support where it is a box, else
    None."""

    family = "sbi"
    export_formats = ("onnx",)
    """sbi's flows have autoregressive inverses, exported as ONNX loops."""

    def __init__(self, posterior: DirectPosterior | NFlowsFlow | SbiZukoFlow):
        super().__init__()
        prior = None
        estimator = posterior
        if isinstance(posterior, DirectPosterior):
            estimator, prior = posterior.posterior_estimator, posterior.prior
        if not isinstance(estimator, (NFlowsFlow, SbiZukoFlow)):
            raise ValueError(f"sbi estimator {type(estimator).__name__} cannot be served; flowserve serves sbi's "
                             "normalizing flows: NFlowsFlow (posterior_nn 'maf', 'nsf') and ZukoFlow ('zuko_*')")
        if len(estimator.input_shape) != 1 or len(estimator.condition_shape) != 1:
            raise ValueError(f"sbi estimator over θ of shape {list(estimator.input_shape)} given x of shape "
                             f"{list(estimator.condition_shape)}: flowserve serves one-dimensional θ and x")
        features, context = int(estimator.input_shape[0]), int(estimator.condition_shape[0])
        if isinstance(estimator, NFlowsFlow):
            self.flow = NflowsFlow(estimator.net, context)
        else:
            embedding = estimator.embedding_net
            self.flow = ZukoFlow(estimator.net, features, context,
                                 embedding=None if isinstance(embedding, nn.Identity) else embedding)
        self.backend = type(estimator).__name__
        self.event_shape = (features,)
        self.noise_dim = features
        self.context_dim = context
        self.support_box = None if prior is None else box_support(prior, features)
        self.prior = None if prior is None else type(prior).__name__

    @property
    def context_embedding(self) -> nn.Module | None:
        """sbi's embedding net of x, its z-scoring included (exported apart)."""
        return self.flow.context_embedding

    def encode(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        return self.flow.encode(x, context)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.flow.log_prob(x, context)

    def sample_with_log_prob(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow.sample_with_log_prob(z, context)

    def prepare_for_export(self) -> SbiPosterior:
        prepare = getattr(self.flow, "prepare_for_export", None)
        if prepare is not None:
            self.flow = prepare()
        return self

    def config(self) -> dict[str, Any]:
        """sbi's version, its estimator class, the prior and the flow's layers."""
        flow = self.flow.config()
        return {**flow, "library": f"sbi {metadata.version('sbi')}", "estimator": self.backend,
                "flow_library": flow["library"], **({"prior": self.prior} if self.prior else {})}


def box_support(prior: Distribution, features: int) -> tuple[list[float], list[float]] | None:
    """``(low, high)`` per feature when ``prior``'s support is a box with a closed side (sbi's
    ``BoxUniform``, intervals, half-lines); None for the whole space or any other support."""
    support = getattr(prior, "support", None)
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    low = high = None
    if support is constraints.real:
        low, high = -torch.inf, torch.inf
    elif isinstance(support, (constraints.interval, constraints.half_open_interval)):
        low, high = support.lower_bound, support.upper_bound
    elif isinstance(support, (constraints.greater_than, constraints.greater_than_eq)):
        low, high = support.lower_bound, torch.inf
    elif isinstance(support, constraints.less_than):
        low, high = -torch.inf, support.upper_bound
    if low is None:
        return None
    low, high = (torch.as_tensor(v, dtype=torch.float64).expand(features).tolist() for v in (low, high))
    return None if all(map(math.isinf, low + high)) else (low, high)

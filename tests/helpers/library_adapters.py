"""The flows of tests/helpers/library_flows.py and others of zuko and nflows, in their
adapters with seeded random weights, and what their libraries compute for them."""

from __future__ import annotations

import torch
import zuko
from helpers.flows import add_weight_noise
from helpers.library_flows import nflows_maf, nflows_spline_coupling
from torch import nn

from flowserve.export.adapters.nflows import NflowsFlow
from flowserve.export.adapters.zuko import ZukoFlow

ZUKO_FLOWS = {
    "maf": (lambda: zuko.flows.MAF(4, transforms=3), 4, 0, 3),
    "nsf": (lambda: zuko.flows.NSF(4, transforms=2), 4, 0, 2),
    "nsf-coupling": (lambda: zuko.flows.NSF(4, transforms=2, passes=2), 4, 0, 2),
    "nsf-conditional": (lambda: zuko.flows.NSF(4, 3, transforms=2), 4, 3, 2),
    "realnvp": (lambda: zuko.flows.RealNVP(4, transforms=2), 4, 0, 0),
    "nsf-embedded": (lambda: zuko.flows.NSF(4, 5, transforms=2), 4, 3, 2),
}
ZUKO_EMBEDDINGS = {"nsf-embedded": lambda: nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 5))}
"""The embedding nets of the ZUKO_FLOWS that take one: context -> what the flow takes."""


def perturbed(name: str) -> ZukoFlow:
    """The zuko flow ``name`` with seeded noise on every weight (zuko starts near the identity)."""
    make, features, context, _ = ZUKO_FLOWS[name]
    torch.manual_seed(0)
    flow = make()
    add_weight_noise(flow)
    embedding = ZUKO_EMBEDDINGS[name]() if name in ZUKO_EMBEDDINGS else None
    return ZukoFlow(flow, features, context, embedding=embedding).eval()


def _zuko_context(model: ZukoFlow, context: torch.Tensor | None) -> torch.Tensor | None:
    """The context as the zuko flow takes it: through the user's embedding net, if any."""
    embedding = model.context_embedding
    return context if embedding is None or context is None else embedding(context)


def inputs(model: ZukoFlow, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(rows, model.context_dim, generator=generator) if model.context_dim else None
    return torch.randn(rows, model.noise_dim, generator=generator), context


def library_log_prob(model, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """log p(x | context) as the model's own library computes it."""
    if isinstance(model, ZukoFlow):
        return model.flow(_zuko_context(model, context)).log_prob(x)
    return model.flow.log_prob(x, context)


def library_generation(model, z: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x from base noise z, and log p(x), as the model's own library computes them."""
    if isinstance(model, ZukoFlow):
        distribution = model.flow(_zuko_context(model, context))
        x, ladj = distribution.transform.inv.call_and_ladj(z)
        return x, distribution.base.log_prob(z) - ladj
    embedded = model.flow._embedding_net(context)
    x, logabsdet = model.flow._transform.inverse(z, context=embedded)
    return x, model.flow._distribution.log_prob(z, embedded) - logabsdet


def library_encode(model, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The base noise z of x, and log|det dz/dx|, as the model's own library computes them."""
    if isinstance(model, ZukoFlow):
        return model.flow(_zuko_context(model, context)).transform.call_and_ladj(x)
    return model.flow._transform(x, context=model.flow._embedding_net(context))


NFLOWS_FLOWS = {
    "maf": (lambda: nflows_maf(4), 0, 3),
    "maf-conditional": (lambda: nflows_maf(4, context=2), 2, 3),
    "maf-embedded": (lambda: nflows_maf(4, context=3, embedded=5), 3, 3),
    "spline-coupling": (lambda: nflows_spline_coupling(4), 0, 0),
}


def perturbed_nflows(name: str) -> NflowsFlow:
    make, context, _ = NFLOWS_FLOWS[name]
    torch.manual_seed(0)
    flow = make()
    add_weight_noise(flow)
    return NflowsFlow(flow.eval(), context).eval()

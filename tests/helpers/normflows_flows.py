"""normflows flows as a user's builder file holds them (each function returns an untrained
flow; the defaults fit two moons, and ``glow`` 8x8 digits), and what normflows computes for
them. The adapter tests build them directly; the live test exports them with ``flowserve
export --module normflows_flows.py:FUNCTION``."""

from __future__ import annotations

import normflows as nf
import torch
from normflows.distributions.base import ConditionalDiagGaussian


def realnvp(features: int = 2, layers: int = 4) -> nf.NormalizingFlow:
    """normflows' README RealNVP: masked affine couplings with alternating masks and ActNorm."""
    mask = torch.arange(features) % 2
    flows = []
    for index in range(layers):
        scale, shift = (nf.nets.MLP([features, 32, 32, features], init_zeros=True) for _ in range(2))
        flows += [nf.flows.MaskedAffineFlow(mask if index % 2 else 1 - mask, shift, scale), nf.flows.ActNorm(features)]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(features), flows)


def coupling_blocks(features: int = 4, layers: int = 2) -> nf.NormalizingFlow:
    """Affine coupling blocks (split, couple, merge) between swaps and invertible affine maps."""
    flows = []
    for index in range(layers):
        net = nf.nets.MLP([features // 2, 16, 2 * (features - features // 2)])
        flows += [nf.flows.AffineCouplingBlock(net, scale_map=("exp", "sigmoid")[index % 2]),
                  nf.flows.Permute(features, mode="swap"), nf.flows.InvertibleAffine(features, use_lu=bool(index % 2)),
                  nf.flows.AffineConstFlow((features,))]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(features), flows)


def glow(channels: int = 4, side: int = 4, blocks: int = 3) -> nf.NormalizingFlow:
    """Glow blocks over ``channels`` x ``side`` x ``side`` (channel and checkerboard splits,
    1x1 convolutions with and without LU), squeezed to ``channels / 4`` x ``2 side`` x
    ``2 side`` images."""
    modes = ("channel", "checkerboard", "channel_inv", "checkerboard_inv")
    flows = [nf.flows.GlowBlock(channels, 16, split_mode=modes[index % 4], use_lu=index % 2 == 0, init_zeros=False)
             for index in range(blocks)]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian((channels, side, side)), flows + [nf.flows.Squeeze()])


def maf(features: int = 2, layers: int = 3, context: int = 0) -> nf.NormalizingFlow:
    """normflows' MAF: masked affine autoregressive layers between random permutations."""
    flows = []
    for _ in range(layers):
        flows += [nf.flows.MaskedAffineAutoregressive(features, 32, context_features=context or None, num_blocks=2),
                  nf.flows.Permute(features, mode="shuffle")]
    if context:
        return nf.ConditionalNormalizingFlow(nf.distributions.DiagGaussian(features), flows)
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(features), flows)


def coupled_spline(features: int = 2, layers: int = 2) -> nf.NormalizingFlow:
    """normflows' neural spline flow: coupled rational-quadratic splines and LU-linear permutations."""
    flows = []
    for index in range(layers):
        flows += [nf.flows.CoupledRationalQuadraticSpline(features, 1, 32, num_bins=6, tail_bound=4.0,
                                                          reverse_mask=index % 2 == 1),
                  nf.flows.LULinearPermute(features)]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(features, trainable=False), flows)


def autoregressive_spline(features: int = 2, layers: int = 2, context: int = 0) -> nf.NormalizingFlow:
    """Autoregressive rational-quadratic splines and LU-linear permutations; with ``context``,
    a conditional flow over a Gaussian whose mean and scale come from the context too."""
    flows = []
    for _ in range(layers):
        flows += [nf.flows.AutoregressiveRationalQuadraticSpline(features, 1, 32, num_context_channels=context or None,
                                                                 num_bins=6, tail_bound=4.0),
                  nf.flows.LULinearPermute(features)]
    if context:
        base = ConditionalDiagGaussian(features, nf.nets.MLP([context, 16, 2 * features]))
        return nf.ConditionalNormalizingFlow(base, flows)
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(features), flows)


def autoregressive_spline_conditional() -> nf.ConditionalNormalizingFlow:
    """The autoregressive spline flow given one context value."""
    return autoregressive_spline(context=1)


def library_generation(flow: nf.NormalizingFlow, z: torch.Tensor,
                       context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples and their log-density as normflows' ``sample`` computes them when its base
    Gaussian draws the standard normal noise ``z`` ``[B, D]``: the Gaussian's own location
    and scale, its ``log_prob``, then the flow's layers."""
    base = flow.q0
    if isinstance(base, ConditionalDiagGaussian):
        loc, log_scale = base.context_encoder(context).chunk(2, dim=-1)
    else:
        loc, log_scale = base.loc, base.log_scale
    x = loc + torch.exp(log_scale) * z.reshape(-1, *base.shape)
    log_prob = base.log_prob(x, context)
    keywords = {} if context is None else {"context": context}
    for layer in flow.flows:
        x, log_det = layer(x, **keywords)
        log_prob = log_prob - log_det
    return x, log_prob


def library_log_prob(flow: nf.NormalizingFlow, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """normflows' own ``log_prob``."""
    return flow.log_prob(x) if context is None else flow.log_prob(x, context)

"""The check that an exported graph computes what the PyTorch model computes."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flowserve.contract.spec import DENSITY, EMBED, ENCODE, GENERATION

from ..flows.base import Flow, ServableModel
from .formats import load_exported

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
SPREAD_SLACK = 4.0
NUDGES = (1, 2, 4, 8)  # float32 spacings, down and up, where the spread is sampled

# A direction run eagerly: (model, points, contexts or None, dtype) -> outputs, each [B, ...].
Direction = Callable[[ServableModel, np.ndarray, np.ndarray | None, torch.dtype], list[np.ndarray]]


class ExportParityError(RuntimeError):
    """The exported graph's outputs differ from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class ParityInputs:
    """Where parity is checked: data rows, base noise, and their contexts (or None)."""

    x: np.ndarray
    z: np.ndarray
    x_context: np.ndarray | None = None
    z_context: np.ndarray | None = None


def gaps(exported, reference, spread=0.0) -> np.ndarray:
    """Each value's difference between ``exported`` and ``reference`` beyond ``SPREAD_SLACK``
    times ``spread``: absolute where ``|reference| <= 1``, relative to ``|reference|`` above.

    float32 carries about 7 significant digits, so a value's rounding grows with it: a data
    feature of 2500 has a spacing of 2.4e-4, and so does a log-density of -2500; on raw
    breast-cancer features (log p of 30 to 60) rounding alone reached 1.7e-4. ``spread`` is
    how far float32 itself strays near each point (see :class:`Reference`).
    """
    reference = np.asarray(reference, np.float64)
    difference = np.abs(np.asarray(exported, np.float64) - reference) - SPREAD_SLACK * np.asarray(spread)
    return np.maximum(difference, 0.0) / np.maximum(1.0, np.abs(reference))


def scaled_gap(exported, reference, spread=0.0) -> float:
    """The largest of :func:`gaps` (NaN if any value is NaN)."""
    return float(np.max(gaps(exported, reference, spread)))


def _density(model, x, context, dtype):
    """log p(x), the density direction."""
    shaped = torch.from_numpy(x).to(dtype).reshape(-1, *model.event_shape)
    return [model.log_prob(shaped, _tensor(context, dtype)).numpy()]


def _generation(model, z, context, dtype):
    """x and its log p from noise z, the generation direction."""
    x, log_prob = model.sample_with_log_prob(torch.from_numpy(z).to(dtype), _tensor(context, dtype))
    return [x.flatten(1).numpy(), log_prob.numpy()]


def _encode(model, x, context, dtype):
    """z, log|det dz/dx| and log p of data x, the encode direction."""
    shaped = torch.from_numpy(x).to(dtype).reshape(-1, *model.event_shape)
    z, log_det, log_prob = model.encode(shaped, _tensor(context, dtype))
    return [z.flatten(1).numpy(), log_det.numpy(), log_prob.numpy()]


def _embedding(model, context, _, dtype):
    """The embedded context, the embed model's output."""
    return [model.context_embedding(torch.from_numpy(context).to(dtype)).numpy()]


def _tensor(array: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array).to(dtype)


def _nudged(points: np.ndarray, spacings: int) -> np.ndarray:
    """``points`` moved by ``spacings`` float32 spacings (down if negative)."""
    towards = np.float32(np.inf if spacings > 0 else -np.inf)
    for _ in range(abs(spacings)):
        points = np.nextafter(points, towards)
    return points


class Reference:
    """What the exported graphs are compared with: the model in float64, and float32's
    spread at the points where the graphs differ from it.

    Where a flow stretches space (a narrow spline bin, a steep coupling) or sums large terms
    that cancel, float32 cannot resolve the result, whatever runs it. At a point whose gap
    exceeds a tenth of the tolerance, the spread is the largest difference between float32
    PyTorch and float64 at the point and at ``NUDGES`` float32 spacings below and above it;
    the point is then judged beyond ``SPREAD_SLACK`` times that. A model that cannot be
    copied to float64, fails in it, or keeps float32 outputs, is its own reference in
    float32 with no spread (and one warning).
    """

    def __init__(self, model: ServableModel, tolerance: float):
        self.model, self.tolerance = model, tolerance
        try:
            self.model64 = copy.deepcopy(model).double()
        except (RuntimeError, TypeError):
            self._without_float64()

    def _without_float64(self) -> None:
        log.warning("%s does not run in float64: parity is checked against float32 PyTorch",
                    type(self.model).__name__)
        self.model64 = None

    def _float64(self, direction: Direction, points: np.ndarray, context: np.ndarray | None):
        outputs = direction(self.model64, points, context, torch.float64)
        if not all(out.dtype == np.float64 for out in outputs):
            raise TypeError("float32 outputs from a float64 model")
        return outputs

    def largest_gaps(self, direction: Direction, points: np.ndarray, context: np.ndarray | None,
                     exported: list[np.ndarray]) -> list[float]:
        """Each output's largest gap between ``exported`` and ``direction`` at ``points``."""
        if self.model64 is not None:
            try:
                return self._largest_gaps(direction, points, context, exported)
            except (RuntimeError, TypeError):
                self._without_float64()
        reference = direction(self.model, points, context, torch.float32)
        return [scaled_gap(out, ref) for out, ref in zip(exported, reference, strict=True)]

    def _largest_gaps(self, direction, points, context, exported):
        reference = self._float64(direction, points, context)
        found = [gaps(out, ref) for out, ref in zip(exported, reference, strict=True)]
        rows = np.any([gap.reshape(len(gap), -1).max(axis=1) > self.tolerance / 10 for gap in found], axis=0)
        if rows.any():
            spread = self._spread(direction, points[rows], None if context is None else context[rows],
                                  [ref[rows] for ref in reference])
            for gap, out, ref, s in zip(found, exported, reference, spread, strict=True):
                gap[rows] = gaps(out[rows], ref[rows], s)
        return [float(np.max(gap)) for gap in found]

    def _spread(self, direction, points, context, reference):
        spread = [np.abs(low - ref) for low, ref in
                  zip(direction(self.model, points, context, torch.float32), reference, strict=True)]
        for spacings in (*NUDGES, *(-n for n in NUDGES)):
            moved = _nudged(points, spacings)
            for s, low, high in zip(spread, direction(self.model, moved, context, torch.float32),
                                    self._float64(direction, moved, context), strict=True):
                np.maximum(s, np.abs(low - high), out=s)
        return spread


def check_parity(
    model: ServableModel, graphs: dict[str, bytes], fmt: str, inputs: ParityInputs,
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, float]:
    """Largest gaps (:func:`gaps`) between the exported graphs and the :class:`Reference`.

    Checks log_prob of both graphs, the generated x, (for flows) the generation graph on
    the latents of the data points, where PyTorch's round trip lands, and the encode graph's
    z, log|det| and log_prob where there is one. With an embed graph, it checks the embedded
    contexts, and each direction is run on the embed graph's outputs, as the gateway runs it.
    Raises ExportParityError above ``tolerance``.
    """
    runners = {d: load_exported(fmt, data) for d, data in graphs.items()}
    reference = Reference(model, tolerance)
    report = {}
    x_ctx = () if inputs.x_context is None else (inputs.x_context,)
    z_ctx = () if inputs.z_context is None else (inputs.z_context,)
    if EMBED in runners:  # the directions take the embed graph's outputs, as the gateway gives them
        embed = runners.pop(EMBED)
        x_ctx, z_ctx = tuple(embed(inputs.x_context)), tuple(embed(inputs.z_context))
        with torch.no_grad():
            (report["embedded_context"],) = reference.largest_gaps(_embedding, inputs.x_context, None, list(x_ctx))
    flat = inputs.x.reshape(len(inputs.x), -1)
    with torch.no_grad():
        (density,) = reference.largest_gaps(_density, flat, inputs.x_context, runners[DENSITY](flat, *x_ctx))
        generated_x, generated_log_prob = reference.largest_gaps(
            _generation, inputs.z, inputs.z_context, runners[GENERATION](inputs.z, *z_ctx))
    report.update(density_log_prob=density, generation_x=generated_x, generation_log_prob=generated_log_prob)
    if ENCODE in runners:
        with torch.no_grad():
            encoded = reference.largest_gaps(_encode, flat, inputs.x_context, runners[ENCODE](flat, *x_ctx))
        report.update(zip(("encode_z", "encode_log_det", "encode_log_prob"), encoded))
    if isinstance(model, Flow):
        with torch.no_grad():
            shaped = torch.from_numpy(inputs.x).reshape(-1, *model.event_shape)
            latent = model.to_latent(shaped, _tensor(inputs.x_context, torch.float32))[0].numpy()
            report["round_trip_x"] = reference.largest_gaps(
                _generation, latent, inputs.x_context, runners[GENERATION](latent, *x_ctx))[0]
    if not max(report.values()) <= tolerance:  # also catches NaN
        raise ExportParityError(f"{fmt} differs from PyTorch by more than {tolerance:g}: {report}")
    return report


PARITY_ROWS = 512
"""Samples and noise rows in :func:`parity_inputs`: every check runs batches this large."""


def parity_inputs(
    model: ServableModel, heldout: torch.Tensor, heldout_context: torch.Tensor | None = None,
    rows: int = PARITY_ROWS, seed: int = 0,
) -> ParityInputs:
    """Held-out data plus the model's own samples, and fresh base noise; the samples and
    the noise take the held-out contexts in turn.

    These are where the model is used. Far in the tails log p reaches -1e4 and beyond,
    where float32 itself cannot resolve 1e-4.
    """
    generator = torch.Generator().manual_seed(seed)
    heldout = heldout.reshape(-1, *model.event_shape)
    context = None
    if model.context_dim:
        context = heldout_context[torch.arange(rows) % len(heldout_context)]
    with torch.no_grad():
        samples = model.sample_with_log_prob(torch.randn(rows, model.noise_dim, generator=generator), context)[0]
    x = torch.cat([heldout, samples])
    return ParityInputs(
        x=x.reshape(len(x), -1).numpy(),
        z=torch.randn(rows, model.noise_dim, generator=generator).numpy(),
        x_context=None if context is None else torch.cat([heldout_context, context]).numpy(),
        z_context=None if context is None else context.numpy(),
    )

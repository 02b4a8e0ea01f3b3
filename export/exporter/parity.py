"""The check that an exported graph computes what the PyTorch model computes."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flowserve.spec import DENSITY, GENERATION

from ..flows.base import Flow, ServableModel
from .formats import load_exported

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
SPREAD_SLACK = 4.0

# A direction run eagerly: (model, points, contexts or None, dtype) -> outputs, flattened per row.
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


def scaled_gap(exported, reference, spread=0.0) -> float:
    """Largest difference between ``exported`` and ``reference`` beyond ``SPREAD_SLACK``
    times ``spread``: absolute where ``|reference| <= 1``, relative to ``|reference|`` above.

    float32 carries about 7 significant digits, so a value's rounding grows with it: a data
    feature of 2500 has a spacing of 2.4e-4, and so does a log-density of -2500; on raw
    breast-cancer features (log p of 30 to 60) rounding alone reached 1.7e-4. ``spread`` is
    how far float32 itself strays at each point (see :func:`reference_and_spread`).
    """
    reference = np.asarray(reference, np.float64)
    difference = np.abs(np.asarray(exported, np.float64) - reference) - SPREAD_SLACK * np.asarray(spread)
    return float(np.max(np.maximum(difference, 0.0) / np.maximum(1.0, np.abs(reference))))


def _density(model, x, context, dtype):
    """log p(x), the density direction."""
    shaped = torch.from_numpy(x).to(dtype).reshape(-1, *model.event_shape)
    return [model.log_prob(shaped, _tensor(context, dtype)).numpy()]


def _generation(model, z, context, dtype):
    """x and its log p from noise z, the generation direction."""
    x, log_prob = model.sample_with_log_prob(torch.from_numpy(z).to(dtype), _tensor(context, dtype))
    return [x.flatten(1).numpy(), log_prob.numpy()]


def _tensor(array: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array).to(dtype)


def reference_and_spread(
    direction: Direction, model: ServableModel, model64: ServableModel | None,
    points: np.ndarray, context: np.ndarray | None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``direction``'s outputs at ``points`` in float64, and how far float32 PyTorch strays
    from float64 within one float32 spacing of each point.

    A point where a flow stretches space (a narrow spline bin, a steep coupling) turns
    float32 rounding into a large error in float32 PyTorch and ONNX alike; the spread
    measures that, so such points are judged on what float32 can resolve there. Without
    a float64 copy of the model, the reference is float32 PyTorch and the spread is zero.
    """
    if model64 is not None:
        try:
            reference = direction(model64, points, context, torch.float64)
            if all(out.dtype == np.float64 for out in reference):
                spread = [np.zeros_like(out) for out in reference]
                for step in (-np.inf, np.inf):
                    moved = np.nextafter(points, np.float32(step))
                    for s, low, high in zip(spread, direction(model, moved, context, torch.float32),
                                            direction(model64, moved, context, torch.float64)):
                        np.maximum(s, np.abs(low - high), out=s)
                for s, low, high in zip(spread, direction(model, points, context, torch.float32), reference):
                    np.maximum(s, np.abs(low - high), out=s)
                return reference, spread
        except (RuntimeError, TypeError):
            pass
        log.warning("%s does not run in float64: parity is checked against float32 PyTorch",
                    type(model).__name__)
    reference = direction(model, points, context, torch.float32)
    return reference, [np.zeros_like(out) for out in reference]


def float64_copy(model: ServableModel) -> ServableModel | None:
    """The model in float64, or None where it cannot be copied."""
    try:
        return copy.deepcopy(model).double()
    except (RuntimeError, TypeError):
        return None


def check_parity(
    model: ServableModel, graphs: dict[str, bytes], fmt: str, inputs: ParityInputs,
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, float]:
    """Largest differences between the exported graphs and a float64 PyTorch reference,
    by :func:`scaled_gap`.

    Checks log_prob of both graphs, the generated x, and (for flows) the generation graph on
    the latents of the data points, where PyTorch's round trip lands.
    Raises ExportParityError above ``tolerance``.
    """
    runners = {d: load_exported(fmt, data) for d, data in graphs.items()}
    x_ctx = () if inputs.x_context is None else (inputs.x_context,)
    z_ctx = () if inputs.z_context is None else (inputs.z_context,)
    model64 = float64_copy(model)
    flat = inputs.x.reshape(len(inputs.x), -1)
    with torch.no_grad():
        (density_ref,), (density_spread,) = reference_and_spread(_density, model, model64, flat, inputs.x_context)
        (x_ref, log_prob_ref), (x_spread, log_prob_spread) = reference_and_spread(
            _generation, model, model64, inputs.z, inputs.z_context)
    (exported_density,) = runners[DENSITY](flat, *x_ctx)
    exported_x, exported_log_prob = runners[GENERATION](inputs.z, *z_ctx)
    report = {
        "density_log_prob": scaled_gap(exported_density, density_ref, density_spread),
        "generation_x": scaled_gap(exported_x, x_ref, x_spread),
        "generation_log_prob": scaled_gap(exported_log_prob, log_prob_ref, log_prob_spread),
    }
    if isinstance(model, Flow):
        with torch.no_grad():
            shaped = torch.from_numpy(inputs.x).reshape(-1, *model.event_shape)
            latent = model.to_latent(shaped, _tensor(inputs.x_context, torch.float32))[0].numpy()
            (round_trip_ref, _), (round_trip_spread, _) = reference_and_spread(
                _generation, model, model64, latent, inputs.x_context)
        report["round_trip_x"] = scaled_gap(runners[GENERATION](latent, *x_ctx)[0], round_trip_ref,
                                            round_trip_spread)
    if not max(report.values()) <= tolerance:  # also catches NaN
        raise ExportParityError(f"{fmt} differs from PyTorch by more than {tolerance:g}: {report}")
    return report


def parity_inputs(
    model: ServableModel, heldout: torch.Tensor, heldout_context: torch.Tensor | None = None,
    rows: int = 512, seed: int = 0,
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

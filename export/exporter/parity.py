"""The check that an exported graph computes what the PyTorch model computes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowserve.spec import DENSITY, GENERATION

from ..flows.base import Flow, ServableModel
from .formats import load_exported

PARITY_TOLERANCE = 1e-4


class ExportParityError(RuntimeError):
    """The exported graph's outputs differ from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class ParityInputs:
    """Where parity is checked: data rows, base noise, and their contexts (or None)."""

    x: np.ndarray
    z: np.ndarray
    x_context: np.ndarray | None = None
    z_context: np.ndarray | None = None


def scaled_gap(exported, reference) -> float:
    """Largest difference between ``exported`` and ``reference``: absolute where
    ``|reference| <= 1``, relative to ``|reference|`` above.

    float32 carries about 7 significant digits, so a value's rounding grows with it: a data
    feature of 2500 has a spacing of 2.4e-4, and so does a log-density of -2500; on raw
    breast-cancer features (log p of 30 to 60) rounding alone reached 1.7e-4. An absolute
    bound fails such graphs on rounding alone; a relative one still catches a wrong graph.
    """
    reference = np.asarray(reference, np.float64)
    difference = np.abs(np.asarray(exported, np.float64) - reference)
    return float(np.max(difference / np.maximum(1.0, np.abs(reference))))


def check_parity(
    model: ServableModel, graphs: dict[str, bytes], fmt: str, inputs: ParityInputs,
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, float]:
    """Largest differences between the exported graphs and PyTorch, by :func:`scaled_gap`.

    Checks log_prob of both graphs, the generated x, and (for flows) the generation graph on
    the latents of the data points, where PyTorch's round trip lands.
    Raises ExportParityError above ``tolerance``.
    """
    runners = {d: load_exported(fmt, data) for d, data in graphs.items()}
    x_ctx = () if inputs.x_context is None else (inputs.x_context,)
    z_ctx = () if inputs.z_context is None else (inputs.z_context,)
    tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    flat = inputs.x.reshape(len(inputs.x), -1)
    with torch.no_grad():
        shaped = torch.from_numpy(inputs.x).reshape(-1, *model.event_shape)
        torch_density = model.log_prob(shaped, tensor(inputs.x_context)).numpy()
        torch_x, torch_log_prob = model.sample_with_log_prob(torch.from_numpy(inputs.z), tensor(inputs.z_context))
    (exported_density,) = runners[DENSITY](flat, *x_ctx)
    exported_x, exported_log_prob = runners[GENERATION](inputs.z, *z_ctx)

    report = {
        "density_log_prob": scaled_gap(exported_density, torch_density),
        "generation_x": scaled_gap(exported_x, torch_x.flatten(1).numpy()),
        "generation_log_prob": scaled_gap(exported_log_prob, torch_log_prob.numpy()),
    }
    if isinstance(model, Flow):
        with torch.no_grad():
            latent = model.to_latent(shaped, tensor(inputs.x_context))[0]
            reference = model.from_latent(latent, tensor(inputs.x_context))[0].flatten(1).numpy()
        report["round_trip_x"] = scaled_gap(runners[GENERATION](latent.numpy(), *x_ctx)[0], reference)
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

"""Every flow family by name, and building a model from its plain config.

The names are data, so importing this module does not import torch (the CLI's choices
come from :data:`FAMILY_NAMES`); a family's module is imported when it is built. To add
a family, write its module beside the others and add one line to :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import DensityModel

FAMILIES = {
    "nice": "nice:NICE",
    "realnvp": "realnvp:RealNVP",
    "glow": "glow:Glow",
    "maf": "autoregressive:MAF",
    "iaf": "autoregressive:IAF",
    "nsf": "nsf:NSF",
    "vae": "vae:VAE",
}
"""Family name -> ``module:class`` in this package."""
FAMILY_NAMES = tuple(FAMILIES)


def family_class(family: str) -> type[DensityModel]:
    """The model class of ``family``; raises ValueError for an unknown name."""
    if family not in FAMILIES:
        raise ValueError(f"unknown flow family {family!r}; known families: {sorted(FAMILIES)}")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def default_flow_config(family: str, dataset) -> dict[str, Any]:
    """A sensible config of ``family`` for ``dataset`` (a ``data.Dataset``).

    Pixel data is dequantized to logits; continuous data is standardised with the
    training split's statistics, which thereby become part of the exported graphs.
    Widths grow with the dimension; images get the multi-scale convolutional
    architectures (Real NVP, Glow), the other families see them flattened.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown flow family {family!r}; known families: {sorted(FAMILIES)}")
    if dataset.levels is not None:
        preprocessing = {"kind": "dequantize", "levels": int(dataset.levels)}
    else:
        flat = dataset.train.reshape(len(dataset.train), -1).astype("float64")
        std = flat.std(0)
        if not (std > 0).all():
            raise ValueError(f"feature {int((std > 0).argmin())} of {dataset.name!r} is constant in the training "
                             "split: a density over it is degenerate; drop the column")
        preprocessing = {"kind": "standardize", "mean": flat.mean(0).tolist(), "std": std.tolist()}
    width = max(64, 2 * dataset.dim)
    options: dict[str, Any] = {"hidden_features": [width, width]}
    if family == "vae":
        options["latent_dim"] = 2 if dataset.dim <= 4 else min(16, dataset.dim // 2)
    if family in ("realnvp", "glow") and len(dataset.event_shape) == 3:
        options["hidden_channels"] = 64
    return {"family": family, "event_shape": list(dataset.event_shape), "context_dim": dataset.context_dim,
            "preprocessing": preprocessing, **options}


def build_flow(config: dict[str, Any]) -> DensityModel:
    """Build the model that ``config`` (as returned by ``config()``) describes."""
    options = dict(config)
    family = options.pop("family", None)
    cls = family_class(family)
    if "event_shape" not in options:
        raise ValueError(f"config of flow family {family!r} lacks event_shape")
    try:
        return cls(**options)
    except TypeError as error:
        raise ValueError(f"invalid config for flow family {family!r}: {error}") from error

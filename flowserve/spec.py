"""The contract between exporter, Triton configs, the Python runner and the gateway.

Tensor names, dtypes and shapes of both directions of a flow live here and nowhere else:
the ONNX export call, ``config.pbtxt`` and the gateway's Triton client are all generated
from :func:`direction_spec`. This module imports nothing heavy (no torch) so the gateway
can use it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DENSITY = "density"
GENERATION = "generation"
DIRECTIONS = (DENSITY, GENERATION)

METADATA_SUFFIX = ".flowserve.json"
METADATA_SCHEMA_VERSION = 1
# Metadata keys besides the required ones (name, family, event_shape, models), with defaults:
#   noise_dim      base-noise values per generated row; default prod(event_shape)
#   context_shape  shape of one row's context; [] (the default) means no context input
#   log_likelihood "exact" (default) or "lower_bound" (an importance-weighted bound, e.g. a VAE)
#   support        [low, high]: the range every data value must lie in (pixel models); absent: any value
# Triton models served by the PyTorch backend name their tensors as DirectionSpec.positional();
# the gateway reads each model's config from Triton to know which names to send.
LOG_LIKELIHOOD_KINDS = ("exact", "lower_bound")

log = logging.getLogger(__name__)

_FLOW_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a Triton model; ``dims`` excludes the batch dimension."""

    name: str
    dims: tuple[int, ...]
    dtype: str = "float32"

    @property
    def triton_dtype(self) -> str:
        """Datatype as Triton's inference protocol spells it (``FP32``)."""
        return {"float32": "FP32"}[self.dtype]

    @property
    def config_dtype(self) -> str:
        """Datatype as ``config.pbtxt`` spells it (``TYPE_FP32``)."""
        return "TYPE_" + self.triton_dtype


@dataclass(frozen=True)
class DirectionSpec:
    """Inputs and outputs of one direction of a flow, as a Triton model exposes them."""

    direction: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def positional(self) -> DirectionSpec:
        """The same tensors named ``INPUT__<i>`` and ``OUTPUT__<i>``, as Triton's PyTorch
        backend requires for TorchScript models."""
        return DirectionSpec(
            self.direction,
            inputs=tuple(TensorSpec(f"INPUT__{i}", t.dims, t.dtype) for i, t in enumerate(self.inputs)),
            outputs=tuple(TensorSpec(f"OUTPUT__{i}", t.dims, t.dtype) for i, t in enumerate(self.outputs)),
        )


def bits_per_dim(log_likelihood, dim: int):
    """Nats per example to bits per dimension: ``-log_likelihood / (dim ln 2)``."""
    return -log_likelihood / (dim * math.log(2.0))


CONTEXT = "context"
"""Name of the optional per-row conditioning input (e.g. a one-hot class label)."""


def direction_spec(direction: str, event_dim: int, *, noise_dim: int | None = None,
                   context_dim: int = 0) -> DirectionSpec:
    """Tensor spec of ``direction`` for a flow over ``event_dim``-dimensional events.

    density:    x[B, D] (, context[B, C]) -> log_prob[B]
    generation: z[B, N] (, context[B, C]) -> x[B, D], log_prob[B]   (log-density of the generated x)

    ``noise_dim`` N is the base noise per row, ``D`` unless the model draws more (a VAE
    draws its latent and its decoder noise). ``context`` exists only when ``context_dim > 0``.
    """
    if event_dim < 1 or context_dim < 0 or (noise_dim is not None and noise_dim < 1):
        raise ValueError(f"invalid dims: event {event_dim}, noise {noise_dim}, context {context_dim}")
    context = (TensorSpec(CONTEXT, (context_dim,)),) if context_dim else ()
    if direction == DENSITY:
        return DirectionSpec(
            DENSITY,
            inputs=(TensorSpec("x", (event_dim,)), *context),
            outputs=(TensorSpec("log_prob", ()),),
        )
    if direction == GENERATION:
        return DirectionSpec(
            GENERATION,
            inputs=(TensorSpec("z", (noise_dim or event_dim,)), *context),
            outputs=(TensorSpec("x", (event_dim,)), TensorSpec("log_prob", ())),
        )
    raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")


def validate_flow_name(name: str) -> str:
    """Return ``name`` if it is a safe flow name (lowercase, digits, '-' and '_')."""
    if not _FLOW_NAME.match(name):
        raise ValueError(
            f"invalid flow name {name!r}: use 1-63 characters from a-z, 0-9, '-' and '_', "
            "starting with a letter or digit"
        )
    return name


def triton_model_name(flow_name: str, direction: str) -> str:
    """Name of the Triton model that serves ``direction`` of flow ``flow_name``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    return f"{validate_flow_name(flow_name)}-{direction}"


def metadata_path(repository: Path, flow_name: str) -> Path:
    """Where the flow's metadata file lives: beside its Triton models, at the top level.

    Triton only treats directories of the repository as models, so a top-level file is
    invisible to it.
    """
    return Path(repository) / f"{validate_flow_name(flow_name)}{METADATA_SUFFIX}"


def read_all_metadata(repository: Path) -> dict[str, dict[str, Any]]:
    """Read every flow's metadata file in ``repository``, keyed by flow name.

    A file that cannot be read or does not follow the schema is skipped with a warning,
    so one bad file does not hide the other flows.
    """
    flows = {}
    for path in sorted(Path(repository).glob(f"*{METADATA_SUFFIX}")):
        try:
            meta = json.loads(path.read_text())
            if meta.get("schema") != METADATA_SCHEMA_VERSION:
                raise ValueError(f"unsupported metadata schema {meta.get('schema')!r}")
            missing = {"name", "family", "event_shape", "models"} - set(meta)
            if missing:
                raise ValueError(f"missing keys {sorted(missing)}")
        except (OSError, ValueError) as exc:
            log.warning("skipping flow metadata %s: %s", path, exc)
            continue
        flows[meta["name"]] = meta
    return flows

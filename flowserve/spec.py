"""The contract between exporter, Triton configs, the Python runner and the gateway.

Tensor names, dtypes and shapes of both directions of a flow live here and nowhere else:
the ONNX export call, ``config.pbtxt`` and the gateway's Triton client are all generated
from :func:`direction_spec`. This module imports nothing heavy (no torch) so the gateway
can use it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DENSITY = "density"
GENERATION = "generation"
DIRECTIONS = (DENSITY, GENERATION)

METADATA_SUFFIX = ".flowserve.json"
METADATA_SCHEMA_VERSION = 1

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


def direction_spec(direction: str, event_dim: int) -> DirectionSpec:
    """Tensor spec of ``direction`` for a flow over ``event_dim``-dimensional events.

    density:    x[B, D] -> log_prob[B]
    generation: z[B, D] -> x[B, D], log_prob[B]   (log-density of the generated x)
    """
    if direction == DENSITY:
        return DirectionSpec(
            DENSITY,
            inputs=(TensorSpec("x", (event_dim,)),),
            outputs=(TensorSpec("log_prob", ()),),
        )
    if direction == GENERATION:
        return DirectionSpec(
            GENERATION,
            inputs=(TensorSpec("z", (event_dim,)),),
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

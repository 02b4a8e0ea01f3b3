"""The flow metadata file, ``<flow>.flowserve.json``: its schema, defaults and validation.

:class:`FlowMetadata` is the only code that reads or writes the file. The exporter writes
one per flow, beside the flow's Triton models; the gateway reads them all to know what it
serves (names, shapes, likelihood kind) and lists the rest in ``ListModels``. Like
:mod:`flowserve.contract.spec`, this module imports nothing heavy, so the gateway can use it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from flowserve.contract.spec import (
    DIRECTIONS,
    EMBED,
    FLOW_MODELS,
    OPTIONAL_DIRECTIONS,
    DirectionSpec,
    direction_spec,
    validate_flow_name,
)

SCHEMA_VERSION = 1
SUFFIX = ".flowserve.json"
EXACT, LOWER_BOUND = "exact", "lower_bound"
LOG_LIKELIHOOD_KINDS = (EXACT, LOWER_BOUND)
"""``exact``: the log-density; ``lower_bound``: an importance-weighted bound (a VAE)."""
HELDOUT_LOG_LIKELIHOOD = "metrics.test_log_likelihood"
"""Key of the held-out log-likelihood in :meth:`FlowMetadata.listing` (ListModels' metadata)."""
_REQUIRED = ("name", "family", "event_shape", "models")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlowMetadata:
    """What the exporter records of a flow, and what the gateway needs to serve it.

    Serving fields (validated on construction):
      ``models`` maps each direction to its Triton model (density and generation always,
      encode where the model has an exact data -> noise map), and ``embed`` to the model of
      the context embedding where it is exported apart; ``noise_dim`` is the base noise
      per generated row (default ``prod(event_shape)``); ``context_shape`` is the shape of
      one row's context (empty: no context input); ``embedded_dim`` is the width of the
      embedded context that the directions take when there is an ``embed`` model (else
      None: they take the context itself); ``log_likelihood`` is one of
      :data:`LOG_LIKELIHOOD_KINDS`; ``support`` is ``(low, high)``, the range every data
      value must lie in (pixel models), or None for any value; ``support_box`` is
      ``{"low": [...], "high": [...]}``, one bound per data value (None for an open side):
      the box that support-truncated sampling keeps samples in (an sbi prior's support, or
      one given at export), or None when the flow has none.
    Provenance fields (free-form, shown by ``ListModels``): the model version, file format
    and Triton backend, the data set and its summary, training metrics, the architecture,
    parity report, graph statistics, checksums and export time; ``extra`` keeps the keys of
    a file that this version does not know. None means the file does not say.
    """

    name: str
    family: str
    event_shape: tuple[int, ...]
    models: dict[str, str]
    noise_dim: int | None = None
    context_shape: tuple[int, ...] = ()
    embedded_dim: int | None = None
    log_likelihood: str = EXACT
    support: tuple[float, float] | None = None
    support_box: dict[str, list[float | None]] | None = None
    version: int | None = None
    format: str | None = None
    backend: str | None = None
    dataset: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    architecture: dict[str, Any] = field(default_factory=dict)
    parity_max_diff: dict[str, float] = field(default_factory=dict)
    graphs: dict[str, Any] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)
    exported_at: str | None = None
    export_seconds: float | None = None
    flowserve_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        validate_flow_name(self.name)
        if not isinstance(self.family, str) or not self.family:
            raise ValueError(f"family must be a non-empty string, got {self.family!r}")
        self._set("event_shape", _shape(self.event_shape, "event_shape"))
        if not self.event_shape:
            raise ValueError("event_shape is empty")
        self._set("context_shape", _shape(self.context_shape, "context_shape"))
        if self.noise_dim is None:
            self._set("noise_dim", math.prod(self.event_shape))
        elif type(self.noise_dim) is not int or self.noise_dim < 1:
            raise ValueError(f"noise_dim must be a positive integer, got {self.noise_dim!r}")
        if self.log_likelihood not in LOG_LIKELIHOOD_KINDS:
            raise ValueError(f"log_likelihood must be one of {LOG_LIKELIHOOD_KINDS}, got {self.log_likelihood!r}")
        if (not isinstance(self.models, dict) or not all(isinstance(self.models.get(d), str) for d in DIRECTIONS)
                or not set(self.models) <= set(FLOW_MODELS)
                or not all(isinstance(model, str) for model in self.models.values())):
            raise ValueError(f"models must map {list(DIRECTIONS)} (and optionally {list(OPTIONAL_DIRECTIONS)} and "
                             f"{EMBED!r}) to Triton model names, got {self.models!r}")
        if self.embedded_dim is not None and (type(self.embedded_dim) is not int or self.embedded_dim < 1):
            raise ValueError(f"embedded_dim must be a positive integer, got {self.embedded_dim!r}")
        embed = EMBED in self.models
        if embed != (self.embedded_dim is not None) or (embed and not self.context_shape):
            raise ValueError(f"a flow with an {EMBED!r} model needs a context_shape and an embedded_dim, and "
                             "embedded_dim needs an embed model")
        if self.support is not None:
            support = self.support
            if not (isinstance(support, (list, tuple)) and len(support) == 2
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in support)
                    and support[0] < support[1]):
                raise ValueError(f"support must be [low, high] with low < high, got {support!r}")
            self._set("support", (float(support[0]), float(support[1])))
        if self.support_box is not None:
            self._set("support_box", _box(self.support_box, self.dim))
        if self.version is not None and (type(self.version) is not int or self.version < 1):
            raise ValueError(f"version must be an integer >= 1, got {self.version!r}")

    def _set(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)  # normalising a frozen instance

    @property
    def dim(self) -> int:
        """Values per event row as Triton sees it: ``prod(event_shape)``."""
        return math.prod(self.event_shape)

    @property
    def context_dim(self) -> int:
        """Values per context row as Triton sees it; 0 when the flow takes no context."""
        return math.prod(self.context_shape) if self.context_shape else 0

    def support_bounds(self) -> tuple[list[float], list[float]] | None:
        """``support_box`` as ``(low, high)`` bounds per data value, ``±inf`` for an open side;
        None for a flow without one."""
        if self.support_box is None:
            return None
        return ([-math.inf if v is None else v for v in self.support_box["low"]],
                [math.inf if v is None else v for v in self.support_box["high"]])

    def spec(self, direction: str) -> DirectionSpec:
        """Triton tensors of ``direction`` (or of the ``embed`` model) of this flow."""
        return direction_spec(direction, self.dim, noise_dim=self.noise_dim, context_dim=self.context_dim,
                              embedded_dim=self.embedded_dim or 0)

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON object; fields that are None are left out, ``extra`` keys come last."""
        document: dict[str, Any] = {"schema": SCHEMA_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name != "extra":
                document[f.name] = list(value) if isinstance(value, tuple) else value
        return {**document, **{k: v for k, v in self.extra.items() if k not in document}}

    @classmethod
    def from_dict(cls, document: Any) -> FlowMetadata:
        """The metadata a file's JSON object holds; raises ValueError if it breaks the schema.

        Keys this version does not know go to ``extra``, so they are listed and written back.
        """
        if not isinstance(document, dict):
            raise ValueError("the file does not hold a JSON object")
        if document.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"unsupported metadata schema {document.get('schema')!r}, expected {SCHEMA_VERSION}")
        missing = [key for key in _REQUIRED if key not in document]
        if missing:
            raise ValueError(f"missing keys {missing}")
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {key: value for key, value in document.items() if key not in known and key != "schema"}
        try:
            return cls(**{key: value for key, value in document.items() if key in known}, extra=extra)
        except TypeError as exc:  # e.g. a shape that is not a list
            raise ValueError(str(exc)) from None

    def listing(self) -> dict[str, str]:
        """Everything but the name and models, flattened to ``a.b`` keys with string values
        (JSON for non-strings): the ``metadata`` map of ``ListModels``."""
        document = self.to_dict()
        for key in ("name", "models"):
            document.pop(key)
        return _flatten(document)

    def path(self, repository: Path) -> Path:
        """Where this flow's file lives in ``repository``."""
        return metadata_path(repository, self.name)

    def write(self, repository: Path) -> Path:
        """Write the file atomically: a reader sees the old file or the new one, never half."""
        target = self.path(repository)
        staging = target.with_name(f".{target.name}.tmp")
        staging.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(staging, target)
        return target

    @classmethod
    def read(cls, path: Path) -> FlowMetadata:
        """Read one file; raises OSError or ValueError."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def metadata_path(repository: Path, flow_name: str) -> Path:
    """Where a flow's metadata file lives: beside its Triton models, at the top level.

    Triton only treats directories of the repository as models, so a top-level file is
    invisible to it.
    """
    return Path(repository) / f"{validate_flow_name(flow_name)}{SUFFIX}"


def read_all(repository: Path) -> dict[str, FlowMetadata]:
    """Every flow's metadata in ``repository``, keyed by flow name.

    A file that cannot be read or breaks the schema is skipped with a warning naming the
    flow, so one bad file does not hide the other flows.
    """
    flows = {}
    for path in sorted(Path(repository).glob(f"*{SUFFIX}")):
        try:
            meta = FlowMetadata.read(path)
        except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
            log.warning("not serving flow %r: bad metadata in %s: %s", path.name.removesuffix(SUFFIX), path, exc)
            continue
        flows[meta.name] = meta
    return flows


def box_document(low, high) -> dict[str, list[float | None]]:
    """Bounds per data value (``±inf`` for an open side) as ``support_box`` records them:
    lists, with None for an open side."""
    return {key: [None if math.isinf(v) else float(v) for v in side] for key, side in (("low", low), ("high", high))}


def _box(box: Any, dim: int) -> dict[str, list[float | None]]:
    """``box`` checked: ``low`` and ``high`` lists of ``dim`` numbers or None (an open side),
    with low < high where both are given."""
    problem = f"support_box must be {{'low': [...], 'high': [...]}} with {dim} numbers or nulls each and low < high"
    if not isinstance(box, dict) or set(box) != {"low", "high"}:
        raise ValueError(f"{problem}, got {box!r}"[:300])
    sides = []
    for key in ("low", "high"):
        side = box[key]
        if (not isinstance(side, (list, tuple)) or len(side) != dim
                or not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
                           for v in side)):
            raise ValueError(f"{problem}; {key} is {side!r}"[:300])
        sides.append([None if v is None else float(v) for v in side])
    if any(lo is not None and hi is not None and lo >= hi for lo, hi in zip(*sides)):
        raise ValueError(f"{problem}; low is not below high everywhere")
    if all(v is None for side in sides for v in side):
        raise ValueError(f"{problem}; every side is open")
    return {"low": sides[0], "high": sides[1]}


def _shape(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or any(type(d) is not int or d < 1 for d in value):
        raise ValueError(f"{key} must be a list of positive integers, got {value!r}")
    return tuple(value)


def _flatten(document: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in document.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat

"""The contract between exporter, Triton configs, the Python runner and the gateway.

Tensor names, dtypes and shapes of a flow's directions (and of its context embedding) live
here and nowhere else: the ONNX export call, ``config.pbtxt`` and the gateway's Triton
client are all generated from :func:`direction_spec`. This module imports nothing heavy (no torch) so the gateway
can use it.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

DENSITY = "density"
GENERATION = "generation"
DIRECTIONS = (DENSITY, GENERATION)
"""The directions every flow serves."""
ENCODE = "encode"
OPTIONAL_DIRECTIONS = (ENCODE,)
"""Directions a flow serves where it can: ``encode`` (x -> z), for a model with an exact
data -> noise map. A flow exported before encode existed has none."""
ALL_DIRECTIONS = DIRECTIONS + OPTIONAL_DIRECTIONS
EMBED = "embed"
"""The Triton model of a flow whose context embedding is exported apart: context[B, C] ->
embedded_context[B, E]; the flow's directions then take the embedded context, so a call
embeds each distinct context once rather than once per row."""
FLOW_MODELS = ALL_DIRECTIONS + (EMBED,)
"""Every Triton model a flow may have: its directions and its context embedding."""

RUNNER_BACKEND = "flowserve_runner"
"""Name of flowserve's Python-based Triton backend: the configs the exporter writes name it,
and the launcher (or the Triton image) installs the runner under it."""

MODEL_FILENAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}
"""The model file of each format, in ``<model>/<version>/``: the exporter writes it, a
config names it as ``default_model_filename``, the runner picks its session by it."""

RUNNER_PROBE_PARAMETER = "flowserve_probe"
"""A model config's parameter that makes the runner answer each request with its inputs, no
model file involved: ``flowserve doctor`` serves one to test Triton's Python stub. (The runner,
which imports nothing of flowserve, spells the name out itself.)"""

CUDA_GRAPH_PARAMETER = "flowserve_cuda_graph_buckets"
"""A model config's parameter listing the batch sizes (``1,4,16``) for which the runner
captures CUDA graphs of a TorchScript model on a GPU instance; the exporter writes it for
the directions that can be captured."""

QUEUE_SIZE_PARAMETER = "flowserve_max_queue_size"
QUEUE_TIMEOUT_PARAMETER = "flowserve_queue_timeout_ms"
"""Keys of a model config's ``parameters`` that carry its queue bounds to the gateway's
batcher: the requests that may wait, and how long one may wait in milliseconds (0: no limit)."""

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
        backend requires for TorchScript models; the gateway reads each model's config from
        Triton to know which names to send."""
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
EMBEDDED_CONTEXT = "embedded_context"
"""Name of the context input of a flow's directions when its embedding is a model apart."""


@functools.lru_cache(maxsize=1024)  # specs are frozen; the gateway asks on every request
def direction_spec(direction: str, event_dim: int, *, noise_dim: int | None = None,
                   context_dim: int = 0, embedded_dim: int = 0) -> DirectionSpec:
    """Tensor spec of ``direction`` (or of the :data:`EMBED` model) for a flow over
    ``event_dim``-dimensional events.

    density:    x[B, D] (, context[B, C]) -> log_prob[B]
    generation: z[B, N] (, context[B, C]) -> x[B, D], log_prob[B]   (log-density of the generated x)
    encode:     x[B, D] (, context[B, C]) -> z[B, N], log_det[B], log_prob[B]   (log|det dz/dx|)
    embed:      context[B, C] -> embedded_context[B, E]

    ``noise_dim`` N is the base noise per row, ``D`` unless the model draws more (a VAE
    draws its latent and its decoder noise). ``context`` exists only when ``context_dim > 0``;
    with ``embedded_dim`` E > 0 the directions take ``embedded_context[B, E]`` in its place.
    """
    if (event_dim < 1 or context_dim < 0 or embedded_dim < 0 or (noise_dim is not None and noise_dim < 1)
            or (embedded_dim and not context_dim)):
        raise ValueError(f"invalid dims: event {event_dim}, noise {noise_dim}, context {context_dim}, "
                         f"embedded context {embedded_dim}")
    if direction == EMBED:
        if not embedded_dim:
            raise ValueError("the embed model needs context_dim and embedded_dim")
        return DirectionSpec(EMBED, inputs=(TensorSpec(CONTEXT, (context_dim,)),),
                             outputs=(TensorSpec(EMBEDDED_CONTEXT, (embedded_dim,)),))
    if embedded_dim:
        context = (TensorSpec(EMBEDDED_CONTEXT, (embedded_dim,)),)
    else:
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
    if direction == ENCODE:
        return DirectionSpec(
            ENCODE,
            inputs=(TensorSpec("x", (event_dim,)), *context),
            outputs=(TensorSpec("z", (noise_dim or event_dim,)), TensorSpec("log_det", ()),
                     TensorSpec("log_prob", ())),
        )
    raise ValueError(f"unknown direction {direction!r}; expected one of {FLOW_MODELS}")


def validate_flow_name(name: str) -> str:
    """Return ``name`` if it is a safe flow name (lowercase, digits, '-' and '_')."""
    if not _FLOW_NAME.match(name):
        raise ValueError(
            f"invalid flow name {name!r}: use 1-63 characters from a-z, 0-9, '-' and '_', "
            "starting with a letter or digit"
        )
    return name


def triton_model_name(flow_name: str, direction: str) -> str:
    """Name of the Triton model that serves ``direction`` (or the :data:`EMBED` model) of
    flow ``flow_name``."""
    if direction not in FLOW_MODELS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {FLOW_MODELS}")
    return f"{validate_flow_name(flow_name)}-{direction}"

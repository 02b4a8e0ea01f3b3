"""Export both directions of a flow to ONNX or TorchScript, check the graphs against
PyTorch, and write them into a Triton model repository with their configs and the flow's
metadata file."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from tqdm import tqdm

from flowserve import __version__
from flowserve.spec import (
    DENSITY,
    DIRECTIONS,
    GENERATION,
    METADATA_SCHEMA_VERSION,
    DirectionSpec,
    direction_spec,
    metadata_path,
    triton_model_name,
    validate_flow_name,
)

from .flows import DensityModel, Flow
from .transforms import FixedPointInverse
from .repository import ServingConfig, write_model
from .train import load_checkpoint

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
_EXPORTER_LOGGER = "torch.onnx._internal.exporter._registration"


@contextlib.contextmanager
def _torchscript_allowed():
    """torch 2.13 deprecates torch.jit; Triton's PyTorch backend still loads TorchScript, which
    is what ``--format torchscript`` is for, so its warning is not repeated on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"`torch\.jit\.")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class ExportParityError(RuntimeError):
    """The exported graph's outputs differ from PyTorch's by more than the tolerance."""


FORMATS = ("onnx", "torchscript")


class DensityGraph(nn.Module):
    """x[B, D] (, context[B, C]) -> log_prob[B]; rows are flat, the model sees its event shape."""

    def __init__(self, model: DensityModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.log_prob(x.reshape(-1, *self.model.event_shape), context)


class GenerationGraph(nn.Module):
    """z[B, N] (, context[B, C]) -> x[B, D], log_prob[B] (log-density of x, same pass)."""

    def __init__(self, model: DensityModel):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_prob = self.model.sample_with_log_prob(z, context)
        return x.flatten(1), log_prob


GRAPHS = {DENSITY: DensityGraph, GENERATION: GenerationGraph}


def model_spec(model: DensityModel, direction: str) -> DirectionSpec:
    """The serving contract of one direction of ``model``."""
    return direction_spec(direction, model.dim, noise_dim=model.noise_dim, context_dim=model.context_dim)


def _example_inputs(model: DensityModel, direction: str, rows: int = 4) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(rows, *t.dims, generator=generator) for t in model_spec(model, direction).inputs)


def export_onnx(model: DensityModel, direction: str) -> bytes:
    """One direction as a single-file ONNX model with a dynamic batch dimension.

    Sequential inverses become ONNX ``Loop`` nodes (see ``FixedPointInverse``).
    """
    spec = model_spec(model, direction)
    graph = GRAPHS[direction](copy.deepcopy(model).prepare_for_export()).eval()
    batch = torch.export.Dim("batch")
    # The exporter prints progress lines, warns that torchvision is absent and raises a
    # FutureWarning of its own; none of it concerns flows.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet(_EXPORTER_LOGGER):
        warnings.simplefilter("ignore", FutureWarning)
        # Inputs that share the batch dimension make the exporter say it keeps one name for it.
        warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
        program = torch.onnx.export(
            graph,
            _example_inputs(model, direction),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=tuple({0: batch} for _ in spec.inputs),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return program.model_proto.SerializeToString()


def _script_sequential_loops(module: nn.Module) -> None:
    """Replace every ``FixedPointInverse`` below ``module`` by its scripted twin, in place,
    so tracing keeps its loop (a trace would unroll it ``D`` times)."""
    for name, child in module.named_children():
        if isinstance(child, FixedPointInverse):
            setattr(module, name, torch.jit.script(child))
        else:
            _script_sequential_loops(child)


def export_torchscript(model: DensityModel, direction: str) -> bytes:
    """One direction as a TorchScript module (``model.pt``); inputs and outputs in spec order."""
    graph = GRAPHS[direction](copy.deepcopy(model).prepare_for_export()).eval()
    buffer = io.BytesIO()
    with _torchscript_allowed():
        _script_sequential_loops(graph)
        traced = torch.jit.trace(graph, _example_inputs(model, direction), check_trace=False)
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}


def load_exported(fmt: str, data: bytes):
    """A callable running an exported graph: numpy inputs in spec order -> numpy outputs."""
    if fmt == "onnx":
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *arrays: session.run(None, dict(zip(names, arrays)))
    with _torchscript_allowed():
        module = torch.jit.load(io.BytesIO(data))

    def run(*arrays):
        with torch.no_grad():
            outputs = module(*(torch.from_numpy(a) for a in arrays))
        return [o.numpy() for o in (outputs if isinstance(outputs, tuple) else (outputs,))]

    return run


@dataclass(frozen=True)
class ParityInputs:
    """Where parity is checked: data rows, base noise, and their contexts (or None)."""

    x: np.ndarray
    z: np.ndarray
    x_context: np.ndarray | None = None
    z_context: np.ndarray | None = None


def check_parity(
    model: DensityModel, graphs: dict[str, bytes], fmt: str, inputs: ParityInputs,
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, float]:
    """Largest differences between the exported graphs and PyTorch.

    Checks log_prob of both graphs (absolute), the generated x, and (for flows) the
    generation graph on the latents of the data points, where PyTorch's round trip lands
    (absolute, or relative where |x| > 1).
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

    def gap(exported, reference):
        return float(np.max(np.abs(np.asarray(exported, np.float64) - np.asarray(reference, np.float64))))

    def data_gap(exported, reference):
        # Data can be large (a feature of 2500 has a float32 spacing of 2.4e-4): above 1 in
        # magnitude, values are compared relative to themselves.
        reference = np.asarray(reference, np.float64)
        return float(np.max(np.abs(np.asarray(exported, np.float64) - reference) / np.maximum(1.0, np.abs(reference))))

    report = {
        "density_log_prob": gap(exported_density, torch_density),
        "generation_x": data_gap(exported_x, torch_x.flatten(1).numpy()),
        "generation_log_prob": gap(exported_log_prob, torch_log_prob.numpy()),
    }
    if isinstance(model, Flow):
        with torch.no_grad():
            latent = model.to_latent(shaped, tensor(inputs.x_context))[0]
            reference = model.from_latent(latent, tensor(inputs.x_context))[0].flatten(1).numpy()
        report["round_trip_x"] = data_gap(runners[GENERATION](latent.numpy(), *x_ctx)[0], reference)
    if not max(report.values()) <= tolerance:  # also catches NaN
        raise ExportParityError(f"{fmt} differs from PyTorch by more than {tolerance:g}: {report}")
    return report


def parity_inputs(
    model: DensityModel, heldout: torch.Tensor, heldout_context: torch.Tensor | None = None,
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


def graph_stats(fmt: str, data: bytes) -> dict[str, int]:
    """Size, node count and ``Loop`` count of an exported graph, nested graphs included
    (TorchScript's counted on its inlined graph)."""
    if fmt == "onnx":
        import onnx

        def onnx_nodes(graph):
            for node in graph.node:
                yield node
                for attribute in node.attribute:
                    yield from onnx_nodes(attribute.g)

        kinds = [node.op_type for node in onnx_nodes(onnx.load_from_string(data).graph)]
    else:
        def script_nodes(nodes):
            for node in nodes:
                yield node
                for block in node.blocks():
                    yield from script_nodes(block.nodes())

        with _torchscript_allowed():
            module = torch.jit.load(io.BytesIO(data))
        kinds = [node.kind() for node in script_nodes(module.inlined_graph.nodes())]
    loop_kind = "Loop" if fmt == "onnx" else "prim::Loop"
    return {"bytes": len(data), "nodes": len(kinds), "loops": kinds.count(loop_kind)}


def export_flow(
    checkpoint: Path,
    repository: Path,
    name: str | None = None,
    version: int = 1,
    serving: ServingConfig = ServingConfig(),
    progress: bool = True,
) -> dict:
    """Export a trained model's two directions into ``repository``; returns its metadata.

    Writes ``<flow>-density`` and ``<flow>-generation`` (config.pbtxt and the version's
    model file in ``serving.format``) and ``<flow>.flowserve.json``. Nothing is written
    if the parity check fails.
    """
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    model, ckpt = load_checkpoint(checkpoint)
    name = validate_flow_name(name or f"{model.family}-{ckpt['dataset']}".lower())
    started = time.perf_counter()
    steps = tqdm(total=len(DIRECTIONS) + 2, desc=f"export {name}", disable=not progress, unit="step")
    graphs, stats = {}, {}
    for direction in DIRECTIONS:
        steps.set_postfix_str(direction)
        direction_started = time.perf_counter()
        graphs[direction] = EXPORTERS[serving.format](model, direction)
        stats[direction] = {**graph_stats(serving.format, graphs[direction]),
                            "seconds": round(time.perf_counter() - direction_started, 2)}
        steps.update()
    steps.set_postfix_str("parity")
    report = check_parity(model, graphs, serving.format,
                          parity_inputs(model, ckpt["heldout_sample"], ckpt["heldout_context"]))
    steps.update()

    steps.set_postfix_str("write")
    repository = Path(repository)
    models, checksums = {}, {}
    for direction, graph in graphs.items():
        models[direction] = triton_model_name(name, direction)
        write_model(repository, models[direction], version, model_spec(model, direction), serving, graph)
        checksums[direction] = "sha256:" + hashlib.sha256(graph).hexdigest()
    metadata = {
        "schema": METADATA_SCHEMA_VERSION,
        "name": name,
        "family": model.family,
        "event_shape": list(model.event_shape),
        "noise_dim": model.noise_dim,
        "context_shape": [model.context_dim] if model.context_dim else [],
        "log_likelihood": model.log_likelihood,
        **({"support": list(model.support)} if model.support else {}),
        "models": models,
        "version": version,
        "format": serving.format,
        "backend": serving.backend,
        "dataset": ckpt["dataset"],
        "data": ckpt["data"],
        "metrics": ckpt["metrics"],
        "architecture": model.config(),
        "parity_max_diff": report,
        "graphs": stats,
        "checksums": checksums,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "export_seconds": round(time.perf_counter() - started, 2),
        "flowserve_version": __version__,
    }
    # Written last and atomically: a gateway reading the repository sees the old file or the new one.
    target = metadata_path(repository, name)
    staging = target.with_name(f".{target.name}.tmp")
    staging.write_text(json.dumps(metadata, indent=2) + "\n")
    os.replace(staging, target)
    steps.update()
    steps.close()
    log.info("exported %s to %s (parity worst %.2e)", name, repository, max(report.values()))
    return metadata

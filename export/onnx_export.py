"""Export both directions of a flow to ONNX, check them against PyTorch, and write them
into a Triton model repository with their configs and the flow's metadata file."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
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
    direction_spec,
    metadata_path,
    triton_model_name,
    validate_flow_name,
)

from .flows import Flow
from .repository import ServingConfig, write_model
from .train import load_checkpoint

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
_EXPORTER_LOGGER = "torch.onnx._internal.exporter._registration"


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


class DensityGraph(nn.Module):
    """x[B, D] -> log_prob[B]."""

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(x)


class GenerationGraph(nn.Module):
    """z[B, D] -> x[B, D], log_prob[B] (log-density of x, computed in the same pass)."""

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flow.sample_with_log_prob(z)


GRAPHS = {DENSITY: DensityGraph, GENERATION: GenerationGraph}


def export_onnx(flow: Flow, direction: str) -> bytes:
    """One direction of ``flow`` as a single-file ONNX model with a dynamic batch dimension."""
    spec = direction_spec(direction, flow.dim)
    graph = GRAPHS[direction](flow).eval()
    example = torch.randn(4, flow.dim)
    # The exporter prints progress lines, warns that torchvision is absent and raises a
    # FutureWarning of its own; none of it concerns flows.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet(_EXPORTER_LOGGER):
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return program.model_proto.SerializeToString()


@dataclass(frozen=True)
class ParityReport:
    """Largest absolute differences between ONNX Runtime and PyTorch."""

    density_log_prob: float
    generation_x: float
    generation_log_prob: float
    round_trip_x: float

    def worst(self) -> float:
        return max(asdict(self).values())


def check_parity(
    flow: Flow, onnx_models: dict[str, bytes], x: np.ndarray, z: np.ndarray,
    tolerance: float = PARITY_TOLERANCE,
) -> ParityReport:
    """Compare ONNX Runtime with PyTorch on data points ``x`` and base noise ``z``.

    Checks log_prob of both graphs, the generated x, and x -> z (PyTorch) -> x (ONNX).
    Raises ExportParityError if any absolute difference exceeds ``tolerance``.
    """
    sessions = {
        d: ort.InferenceSession(model, providers=["CPUExecutionProvider"]) for d, model in onnx_models.items()
    }
    with torch.no_grad():
        x_t, z_t = torch.from_numpy(x), torch.from_numpy(z)
        torch_density = flow.log_prob(x_t).numpy()
        torch_x, torch_log_prob = (t.numpy() for t in flow.sample_with_log_prob(z_t))
        latent_of_x = flow.to_latent(x_t)[0].numpy()
    (onnx_density,) = sessions[DENSITY].run(None, {"x": x})
    onnx_x, onnx_log_prob = sessions[GENERATION].run(None, {"z": z})
    round_trip_x, _ = sessions[GENERATION].run(None, {"z": latent_of_x})

    def gap(onnx_value, torch_value):
        return float(np.max(np.abs(np.asarray(onnx_value, np.float64) - np.asarray(torch_value, np.float64))))

    report = ParityReport(
        density_log_prob=gap(onnx_density, torch_density),
        generation_x=gap(onnx_x, torch_x),
        generation_log_prob=gap(onnx_log_prob, torch_log_prob),
        round_trip_x=gap(round_trip_x, x),
    )
    if not report.worst() <= tolerance:  # also catches NaN
        raise ExportParityError(
            f"ONNX Runtime differs from PyTorch by more than {tolerance:g}: {asdict(report)}"
        )
    return report


def parity_inputs(flow: Flow, heldout: torch.Tensor, rows: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points to check parity on: held-out data and the flow's own samples; and base noise.

    These are where the model is used. Far in the tails log p reaches -1e4 and beyond,
    where float32 itself cannot resolve 1e-4.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        samples = flow.sample_with_log_prob(torch.randn(rows, flow.dim, generator=generator))[0]
    x = torch.cat([heldout.reshape(-1, flow.dim), samples]).numpy()
    return x, torch.randn(rows, flow.dim, generator=generator).numpy()


def export_flow(
    checkpoint: Path,
    repository: Path,
    name: str | None = None,
    version: int = 1,
    serving: ServingConfig = ServingConfig(),
    progress: bool = True,
) -> dict:
    """Export a trained flow's two directions into ``repository``; returns its metadata.

    Writes ``<flow>-density`` and ``<flow>-generation`` (config.pbtxt and
    ``<version>/model.onnx``) and ``<flow>.flowserve.json``. Nothing is written if
    the parity check fails.
    """
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    flow, ckpt = load_checkpoint(checkpoint)
    name = validate_flow_name(name or f"{flow.family}-{ckpt['dataset']}".lower())
    started = time.perf_counter()
    steps = tqdm(total=len(DIRECTIONS) + 2, desc=f"export {name}", disable=not progress, unit="step")
    onnx_models = {}
    for direction in DIRECTIONS:
        steps.set_postfix_str(direction)
        onnx_models[direction] = export_onnx(flow, direction)
        steps.update()
    steps.set_postfix_str("parity")
    report = check_parity(flow, onnx_models, *parity_inputs(flow, ckpt["heldout_sample"]))
    steps.update()

    steps.set_postfix_str("write")
    repository = Path(repository)
    models, checksums = {}, {}
    for direction, model in onnx_models.items():
        models[direction] = triton_model_name(name, direction)
        write_model(repository, models[direction], version, direction_spec(direction, flow.dim), serving, model)
        checksums[direction] = "sha256:" + hashlib.sha256(model).hexdigest()
    metadata = {
        "schema": METADATA_SCHEMA_VERSION,
        "name": name,
        "family": flow.family,
        "event_shape": [flow.dim],
        "log_likelihood": "exact",
        "models": models,
        "version": version,
        "format": "onnx",
        "backend": serving.backend,
        "dataset": ckpt["dataset"],
        "data": ckpt["data"],
        "metrics": ckpt["metrics"],
        "architecture": flow.config(),
        "parity_max_diff": asdict(report),
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
    log.info("exported %s to %s (parity worst %.2e)", name, repository, report.worst())
    return metadata

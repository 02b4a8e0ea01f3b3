"""Export both directions of a flow to ONNX or TorchScript, check the graphs against
PyTorch, and write them into a Triton model repository with their configs and the flow's
metadata file."""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from flowserve import __version__
from flowserve.metadata import FlowMetadata
from flowserve.spec import DIRECTIONS, triton_model_name, validate_flow_name

from ..training import load_checkpoint
from .formats import EXPORTERS, graph_stats
from .graphs import model_spec
from .parity import check_parity, parity_inputs
from .triton_config import ServingConfig, write_model

log = logging.getLogger(__name__)


def export_flow(
    checkpoint_path: Path,
    repository: Path,
    name: str | None = None,
    version: int = 1,
    serving: ServingConfig = ServingConfig(),
    progress: bool = True,
) -> FlowMetadata:
    """Export a trained model's two directions into ``repository``; returns its metadata.

    Writes ``<flow>-density`` and ``<flow>-generation`` (config.pbtxt and the version's
    model file in ``serving.format``) and ``<flow>.flowserve.json``. Nothing is written
    if the parity check fails.
    """
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    model, checkpoint = load_checkpoint(checkpoint_path)
    name = validate_flow_name(name or f"{model.family}-{checkpoint.dataset}".lower())
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
                          parity_inputs(model, checkpoint.heldout_sample, checkpoint.heldout_context))
    steps.update()

    steps.set_postfix_str("write")
    models = {direction: triton_model_name(name, direction) for direction in graphs}
    checksums = {direction: "sha256:" + hashlib.sha256(graph).hexdigest() for direction, graph in graphs.items()}
    metadata = FlowMetadata(
        name=name,
        family=model.family,
        event_shape=model.event_shape,
        models=models,
        noise_dim=model.noise_dim,
        context_shape=(model.context_dim,) if model.context_dim else (),
        log_likelihood=model.log_likelihood,
        support=model.support,
        version=version,
        format=serving.format,
        backend=serving.backend,
        dataset=checkpoint.dataset,
        data=checkpoint.data,
        metrics=checkpoint.metrics,
        architecture=model.config(),
        parity_max_diff=report,
        graphs=stats,
        checksums=checksums,
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        export_seconds=round(time.perf_counter() - started, 2),
        flowserve_version=__version__,
    )
    # Validated above, before anything is written; the metadata file goes last, so a gateway
    # sees the flow once its models are in place.
    for direction, graph in graphs.items():
        write_model(repository, models[direction], version, model_spec(model, direction), serving, graph)
    metadata.write(repository)
    steps.update()
    steps.close()
    log.info("exported %s to %s (parity worst %.2e)", name, repository, max(report.values()))
    return metadata

"""Export the directions of a flow to ONNX or TorchScript, check the graphs against
PyTorch, and write them into a Triton model repository with their configs and the flow's
metadata file."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flowserve import __version__
from flowserve.contract.metadata import EXACT, FlowMetadata, box_document
from flowserve.contract.spec import EMBED, triton_model_name, validate_flow_name

from ..data import summarize
from ..flows.autoregressive import use_cached_inverse
from ..flows.base import ServableModel, servable_problem
from ..training import HELDOUT_SAMPLE_ROWS, load_checkpoint
from .formats import EXPORTERS, cuda_graph_blockers, graph_stats
from .graphs import EmbeddingApart, context_embedding, model_spec, served_directions
from .parity import PARITY_ROWS, check_parity, parity_inputs
from .triton_config import ServingConfig, write_model

log = logging.getLogger(__name__)


def export_model(
    model: ServableModel,
    repository: Path,
    *,
    name: str,
    example_data,
    example_context=None,
    version: int = 1,
    serving: ServingConfig = ServingConfig(),
    progress: bool = False,
    dataset: str | None = None,
    data_summary: dict | None = None,
    metrics: dict | None = None,
    support_box=None,
) -> FlowMetadata:
    """Export the directions of ``model`` (any :class:`ServableModel`) into ``repository``;
    returns the flow's metadata.

    ``example_data`` (rows ``[N, *event_shape]``, e.g. held out from training) and, for a
    model with a context, ``example_context`` ``[N, context_dim]``: the parity check runs
    on the first 512 rows and on the model's own samples; the metadata's data summary is
    theirs unless ``data_summary`` is given. Writes ``<name>-density``, ``<name>-generation``
    and, for a model with ``encode`` (unless ``serving.encode`` is off), ``<name>-encode``,
    and, for a model with a ``context_embedding`` (unless ``serving.separate_embedding`` is
    off), ``<name>-embed``, whose output the directions take in place of the context
    (config.pbtxt and the version's model file in ``serving.format``), and
    ``<name>.flowserve.json``. Nothing is written if a check fails.

    ``support_box`` (``(low, high)``, a bound per data value, ``±inf`` for an open side) is
    the box support-truncated sampling keeps samples in; by default the model's own
    ``support_box`` (an sbi posterior's prior), if it has one.
    """
    problem = servable_problem(model)
    if problem:
        raise TypeError(problem)
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    formats = getattr(model, "export_formats", tuple(EXPORTERS))
    if serving.format not in formats:
        raise ValueError(f"{type(model).__name__} exports to {', '.join(formats)} only, not {serving.format}")
    name = validate_flow_name(name)
    heldout, heldout_context = _example_rows(model, example_data, example_context)
    if serving.cached_inverse_min_batch is not None:
        model = _with_cached_inverse(model, serving.cached_inverse_min_batch)
    started = time.perf_counter()
    directions = served_directions(model, serving.encode)
    served = model
    if serving.separate_embedding and context_embedding(model) is not None:
        served = EmbeddingApart(model)
        directions += (EMBED,)
    steps = tqdm(total=len(directions) + 2, desc=f"export {name}", disable=not progress, unit="step")
    graphs, stats = {}, {}
    for direction in directions:
        steps.set_postfix_str(direction)
        direction_started = time.perf_counter()
        graphs[direction] = EXPORTERS[serving.format](served, direction)
        stats[direction] = {**graph_stats(serving.format, graphs[direction]),
                            "seconds": round(time.perf_counter() - direction_started, 2)}
        if serving.format == "torchscript":
            stats[direction]["cuda_graph_blockers"] = cuda_graph_blockers(graphs[direction])
        steps.update()
    steps.set_postfix_str("parity")
    report = check_parity(model, graphs, serving.format, parity_inputs(model, heldout, heldout_context))
    steps.update()

    steps.set_postfix_str("write")
    models = {direction: triton_model_name(name, direction) for direction in graphs}
    checksums = {direction: "sha256:" + hashlib.sha256(graph).hexdigest() for direction, graph in graphs.items()}
    box = support_box if support_box is not None else getattr(model, "support_box", None)
    metadata = FlowMetadata(
        name=name,
        family=getattr(model, "family", "") or "custom",
        event_shape=tuple(model.event_shape),
        models=models,
        noise_dim=int(model.noise_dim),
        context_shape=(int(model.context_dim),) if model.context_dim else (),
        embedded_dim=served.embedded_dim if EMBED in graphs else None,
        log_likelihood=getattr(model, "log_likelihood", EXACT),
        support=getattr(model, "support", None),
        support_box=None if box is None else box_document(*(np.asarray(side, np.float64).reshape(-1) for side in box)),
        version=version,
        format=serving.format,
        backend=serving.backend,
        dataset=dataset,
        data=data_summary if data_summary is not None else summarize(heldout.numpy()),
        metrics=metrics or {},
        architecture=model.config() if hasattr(model, "config") else {"class": type(model).__qualname__},
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
        write_model(repository, models[direction], version, model_spec(served, direction), serving, graph,
                    capturable=not stats[direction].get("cuda_graph_blockers", ["not TorchScript"]))
    metadata.write(repository)
    steps.update()
    steps.close()
    log.info("exported %s to %s (parity worst %.2e)", name, repository, max(report.values()))
    return metadata


def _with_cached_inverse(model: ServableModel, min_batch: int) -> ServableModel:
    """A copy of ``model`` whose MADE inverses export with their cached twins."""
    if min_batch > PARITY_ROWS:
        raise ValueError(f"the cached inverse's minimum batch must be at most {PARITY_ROWS}: the export checks "
                         f"batches of {PARITY_ROWS} rows, and checks what it exports")
    model = copy.deepcopy(model)
    if not use_cached_inverse(model, min_batch):
        raise ValueError(f"{type(model).__name__} has no MADE inverse for the cached inverse to replace "
                         "(flowserve's MAF and IAF have them)")
    return model


def _example_rows(model: ServableModel, data, context) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first rows of ``data`` (and ``context``) as float32 tensors, checked against the model."""
    event_shape = tuple(model.event_shape)
    rows = torch.as_tensor(np.asarray(data, dtype=np.float32)[:HELDOUT_SAMPLE_ROWS])
    if rows.ndim < 1 or len(rows) == 0 or tuple(rows.shape[1:]) not in (event_shape, (math.prod(event_shape),)):
        raise ValueError(f"example_data has shape {list(np.shape(data))}; the model's event shape is "
                         f"{list(event_shape)}: pass rows [N, {', '.join(map(str, event_shape))}]")
    rows = rows.reshape(len(rows), *event_shape)
    if not model.context_dim:
        if context is not None:
            raise ValueError("example_context is given but the model takes no context")
        return rows, None
    if context is None:
        raise ValueError(f"the model takes a context of {model.context_dim} values per row: pass example_context")
    if np.shape(context) != (len(data), model.context_dim):
        raise ValueError(f"example_context has shape {list(np.shape(context))}; expected "
                         f"[{len(data)}, {model.context_dim}], one context per example row")
    return rows, torch.as_tensor(np.asarray(context, dtype=np.float32)[:HELDOUT_SAMPLE_ROWS])


def export_flow(
    checkpoint_path: Path,
    repository: Path,
    name: str | None = None,
    version: int = 1,
    serving: ServingConfig = ServingConfig(),
    progress: bool = True,
    support_box=None,
) -> FlowMetadata:
    """Export a checkpoint of ``flowserve train`` with :func:`export_model`: named
    ``<family>-<dataset>`` by default, checked on its held-out rows, with its training
    metrics and data summary in the metadata (and ``support_box``, if given)."""
    model, checkpoint = load_checkpoint(checkpoint_path)
    return export_model(
        model, repository, name=name or f"{model.family}-{checkpoint.dataset}".lower(),
        example_data=checkpoint.heldout_sample, example_context=checkpoint.heldout_context, version=version,
        serving=serving, progress=progress, dataset=checkpoint.dataset, data_summary=checkpoint.data,
        metrics=checkpoint.metrics, support_box=support_box,
    )

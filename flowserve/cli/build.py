"""Commands that build models: train, export, quality and plot (the ``export`` extra).

Each ``*_command`` turns parsed options into a call of a plain function, which the demo
calls directly.
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from flowserve.contract.metadata import FlowMetadata

EXPORT_EXTRA_MODULES = ("torch", "onnx", "onnxscript", "sklearn", "matplotlib", "tqdm")


class MissingExtra(RuntimeError):
    """A command needs packages of an optional extra that is not installed."""


def require_export_extra(command: str) -> None:
    """Raise MissingExtra, saying how to install it, unless the ``export`` extra is installed."""
    missing = [name for name in EXPORT_EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtra(
            f"'flowserve {command}' needs the export extra (missing: {', '.join(missing)}); install it with "
            "pip install 'flowserve[export]' (install torch's CPU or CUDA wheel first)"
        )


def show_progress(args) -> bool:
    """Progress bars on a terminal, or with --verbose."""
    return sys.stderr.isatty() or args.verbose


def train(family: str, data: str | Path, *, num_points: int | None = None, seed: int = 0,
          output: Path | None = None, progress: bool = False, context_embedding: dict | None = None,
          **settings) -> Path:
    """Train ``family`` on a built-in data set or a user file; returns the checkpoint path
    (default ``checkpoints/<family>-<dataset>.pt``). ``settings`` are ``TrainConfig``'s
    (steps, batch_size, lr, the validation split, early stopping, schedule, clipping);
    ``seed`` drives the data, the initial weights and training. ``context_embedding``
    (``{"features": E, "hidden_features": [...]}``) puts an embedding MLP in front of a
    conditional model's networks."""
    require_export_extra("train")
    import torch

    from flowserve.export.data import load_dataset, summarize
    from flowserve.export.flows.registry import build_flow, default_flow_config
    from flowserve.export.training import TrainConfig, save_checkpoint, train_flow, training_record

    dataset = load_dataset(data, num_points=num_points, seed=seed)
    torch.manual_seed(seed)  # the initial weights; train_flow seeds its own batches
    config = default_flow_config(family, dataset)
    if context_embedding is not None:
        config["context_embedding"] = context_embedding
    flow = build_flow(config)
    settings = TrainConfig(seed=seed, **settings)
    metrics = train_flow(flow, dataset, settings, progress=progress)
    output = output or Path("checkpoints") / f"{family}-{dataset.name}.pt"
    save_checkpoint(output, flow, data_summary=summarize(dataset.train), metrics=metrics, dataset=dataset.name,
                    heldout=dataset.test, heldout_context=dataset.test_context,
                    training=training_record(settings, metrics))
    validation = ("" if "validation_log_likelihood" not in metrics else
                  f"validation log-lik {metrics['validation_log_likelihood']:.4f} (weights of step "
                  f"{metrics['best_step']} of {metrics['steps_run']}), ")
    print(f"trained {family} on {dataset.name}: train log-lik {metrics['train_log_likelihood']:.4f}, {validation}"
          f"held-out log-lik {metrics['test_log_likelihood']:.4f} -> {output}")
    return output


def train_command(args) -> None:
    train(args.family, args.data if args.data is not None else args.dataset or "moons",
          num_points=args.num_points, seed=args.seed, output=args.output, progress=show_progress(args),
          context_embedding=args.context_embedding, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
          weight_decay=args.weight_decay, cosine_lr=args.lr_schedule == "cosine",
          validation_fraction=args.validation_fraction, eval_every=args.eval_every, patience=args.patience or None,
          clip_grad_norm=args.clip_grad_norm or None)


def export(checkpoint: Path, repository: Path, *, name: str | None = None, version: int = 1, serving=None,
           progress: bool = False, support_box=None) -> FlowMetadata:
    """Export a checkpoint into ``repository`` (``serving``: a ServingConfig, default python
    runner on CPU; ``support_box``: ``(low, high)`` for truncated sampling); prints a summary
    and returns the flow's metadata."""
    require_export_extra("export")
    from flowserve.export.exporter.pipeline import export_flow
    from flowserve.export.exporter.triton_config import ServingConfig

    meta = export_flow(checkpoint, repository, name=name, version=version, serving=serving or ServingConfig(),
                       progress=progress, support_box=support_box)
    _print_export(meta, repository)
    return meta


def _print_export(meta: FlowMetadata, repository: Path) -> None:
    print(f"exported {meta.name} v{meta.version} ({meta.format}, {meta.backend} backend) to "
          f"{repository}: models {', '.join(meta.models.values())}; "
          f"{meta.format} vs PyTorch max scaled |diff| {max(meta.parity_max_diff.values()):.2e}")


def export_command(args) -> None:
    require_export_extra("export")
    from flowserve.export.exporter.triton_config import ServingConfig

    serving = ServingConfig(
        backend=args.backend, format=args.format, max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.queue_delay_us, dynamic_batching=args.dynamic_batching, instance_count=args.instances,
        max_queue_size=args.max_queue_size, queue_timeout_ms=args.queue_timeout_ms,
        triton_queue_policy=args.triton_queue_policy, instance_kind=args.instance_kind,
        gpus=tuple(int(g) for g in args.gpus.split(",") if g.strip()), intra_op_threads=args.intra_op_threads,
        cached_inverse_min_batch=args.cached_inverse, cuda_graphs=args.cuda_graphs, encode=args.encode,
        separate_embedding=args.separate_embedding,
    )
    if (args.checkpoint is None) == (args.module is None):
        raise ValueError("give a checkpoint of flowserve train, or --module FILE.py:FUNCTION with --data")
    support_box = _support_box(args.support_low, args.support_high)
    if args.module is None:
        if args.weights or args.data or args.context:
            raise ValueError("--weights, --data and --context go with --module; a checkpoint carries its own")
        export(args.checkpoint, args.model_repository, name=args.name, version=args.version, serving=serving,
               progress=show_progress(args), support_box=support_box)
    else:
        export_user_flow(args.module, args.model_repository, weights=args.weights, data=args.data,
                         context=args.context, name=args.name, version=args.version, serving=serving,
                         progress=show_progress(args), support_box=support_box)


def _support_box(low, high):
    """``(low, high)`` of --support-low and --support-high, an open side where one is not
    given; None when neither is."""
    import numpy as np

    if low is None and high is None:
        return None
    if low is not None and high is not None and len(low) != len(high):
        raise ValueError(f"--support-low has {len(low)} values and --support-high {len(high)}; give one per data value")
    given = low if low is not None else high
    return (low if low is not None else np.full_like(given, -np.inf),
            high if high is not None else np.full_like(given, np.inf))


def export_user_flow(module: str, repository: Path, *, weights: Path | None, data: Path | None,
                     context: Path | None = None, name: str | None = None, version: int = 1, serving=None,
                     progress: bool = False, support_box=None) -> FlowMetadata:
    """Export the flow that ``module`` (``file.py:function``) builds, with ``weights`` loaded,
    checked on the rows of ``data`` (and their ``context``), with ``support_box`` (or its
    own, see ``export_model``); prints a summary."""
    require_export_extra("export")
    from flowserve.export.adapters.builder import build_user_flow
    from flowserve.export.data import read_user_array
    from flowserve.export.exporter.pipeline import export_model
    from flowserve.export.exporter.triton_config import ServingConfig

    if data is None:
        raise ValueError("--module needs --data: held-out rows to check the exported graphs on")
    rows = read_user_array(data)
    contexts = None if context is None else read_user_array(context)
    flow = build_user_flow(module, weights, rows.shape[1], 0 if contexts is None else contexts.shape[1])
    meta = export_model(flow, repository, name=name or Path(module.rsplit(":", 1)[0]).stem.lower().replace("_", "-"),
                        example_data=rows, example_context=contexts, version=version,
                        serving=serving or ServingConfig(), progress=progress, dataset=Path(data).stem,
                        support_box=support_box)
    _print_export(meta, repository)
    return meta


def _comma_list(text: str | None, known, what: str, default) -> list[str]:
    if text is None:
        return list(default)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown) or repr(text)}; choose from {', '.join(known)}")
    return names


def quality_command(args) -> dict:
    require_export_extra("quality")
    if importlib.util.find_spec("zuko") is None:
        raise MissingExtra("'flowserve quality' compares every family with zuko's NSF: install the zuko extra too, "
                           "pip install 'flowserve[export,zuko]'")
    from flowserve.export.data import DATASETS
    from flowserve.export.flows.registry import FAMILY_NAMES
    from flowserve.export.quality import QUALITY_DATASETS, run_quality, write_report

    families = _comma_list(args.families, FAMILY_NAMES, "flow family", FAMILY_NAMES)
    datasets = _comma_list(args.datasets, list(DATASETS), "data set", QUALITY_DATASETS)
    steps_scale = 1.0 if args.steps_scale is None else args.steps_scale
    seed = 0 if args.seed is None else args.seed
    output = args.output or Path("docs") / "quality.md"
    command = ["flowserve", "quality"]  # the options given, so the report names its own command
    for flag, value in (("--families", args.families), ("--datasets", args.datasets),
                        ("--steps-scale", args.steps_scale), ("--seed", args.seed), ("--output", args.output)):
        if value is not None:
            command += [flag, str(value)]
    report = run_quality(families, datasets, steps_scale=steps_scale, seed=seed, progress=True,
                         train_progress=sys.stderr.isatty())
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    markdown, json_path = write_report(report, output, shlex.join(command), date)
    print(f"wrote {markdown} and {json_path} ({len(report['results'])} runs, "
          f"{report['total_seconds'] / 60:.1f} min)")
    failed = [f"{row['family']} on {row['dataset']}" for row in report["results"] if row.get("error")]
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {'; '.join(failed)} (see {markdown})")
    return report


def plot_command(args) -> Path:
    require_export_extra("plot")
    from flowserve.export.plots import plot_checkpoint

    output = args.output or args.checkpoint.with_suffix(".png")
    path = plot_checkpoint(args.checkpoint, output, num_samples=args.num_samples, seed=args.seed)
    print(f"wrote {path}")
    return path

"""Maximum-likelihood training of flows, and checkpoints that load with ``weights_only``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import trange

from .data import validation_split
from .flows.base import DensityModel
from .flows.registry import build_flow

CHECKPOINT_FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (2, 3)
"""Version 2 lacks ``training`` (written before training chose by validation)."""
HELDOUT_SAMPLE_ROWS = 512
_LOSS_DISPLAY_INTERVAL = 50


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train_flow`.

    ``validation_fraction`` of the training rows (never the test rows) are held back, and
    the model is scored on them every ``eval_every`` steps: the best weights are kept, and
    training stops after ``patience`` scores without improvement (None: it runs all
    ``steps``). 0 holds nothing back: all steps run and the last weights are kept.
    ``cosine_lr`` anneals the rate to zero over ``steps`` (else it stays constant);
    ``clip_grad_norm`` bounds the gradient's norm (None: no clipping).
    """

    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    weight_decay: float = 0.0
    cosine_lr: bool = True
    validation_fraction: float = 0.1
    eval_every: int = 50
    patience: int | None = 10
    clip_grad_norm: float | None = 10.0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1 or not self.lr > 0:
            raise ValueError("steps, batch_size and eval_every must be >= 1 and lr > 0")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 (or None: no early stopping), got {self.patience}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 (or None), got {self.clip_grad_norm}")


def _as_tensor(data, like: torch.Tensor) -> torch.Tensor | None:
    return None if data is None else torch.as_tensor(data, dtype=like.dtype, device=like.device)


def dequantize(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Discrete levels plus uniform noise in [0, 1): a continuous point inside each bin."""
    noise = torch.rand(rows.shape, generator=generator, device=rows.device, dtype=rows.dtype)
    return rows + noise


@torch.no_grad()
def mean_log_prob(
    flow: DensityModel, rows, context=None, levels: int | None = None, seed: int = 0, batch_size: int = 4096,
) -> float:
    """Mean log-density of ``rows`` under ``flow`` (nats per example).

    Discrete data (``levels`` set) is dequantized with uniform noise seeded by ``seed``,
    which gives the usual lower bound on the discrete log-likelihood.
    """
    reference = next(flow.parameters())
    rows, context = _as_tensor(rows, reference), _as_tensor(context, reference)
    if levels is not None:
        rows = dequantize(rows, torch.Generator(device=rows.device).manual_seed(seed))
    total = 0.0
    for start in range(0, len(rows), batch_size):
        chunk_context = None if context is None else context[start:start + batch_size]
        total += flow.log_prob(rows[start:start + batch_size], chunk_context).sum().item()
    return total / len(rows)


def train_flow(flow: DensityModel, dataset, config: TrainConfig, progress: bool = True) -> dict[str, float]:
    """Fit ``flow`` to the training rows of ``dataset`` by maximum likelihood with Adam,
    choosing its weights by validation (see :class:`TrainConfig`).

    ``dataset`` is a :class:`flowserve.export.data.Dataset`: its contexts condition the
    flow, and pixel data (``levels`` set) is dequantized afresh every batch. The validation
    rows and the batches are drawn with ``config.seed``, so the run is deterministic given
    the flow's initial weights. Returns the mean log-likelihoods of the rows it trained on,
    the validation rows and the test rows (which take no part in training or selection),
    the row counts, the step whose weights were kept and the steps run. Leaves the flow in
    eval mode. Raises ``FloatingPointError`` if the loss becomes non-finite.
    """
    split = validation_split(dataset, config.validation_fraction, config.seed)
    reference = next(flow.parameters())
    train_rows = _as_tensor(split.train, reference)
    train_context = _as_tensor(split.train_context, reference)
    generator = torch.Generator(device=train_rows.device).manual_seed(config.seed)
    optimizer = torch.optim.Adam(flow.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps) if config.cosine_lr else None
    selection = _Selection(flow, config.patience)

    flow.train()
    running_loss = torch.zeros((), dtype=train_rows.dtype, device=train_rows.device)
    with trange(config.steps, desc=f"train {flow.family}", disable=not progress) as bar:
        for step in bar:
            index = torch.randint(
                len(train_rows), (config.batch_size,), generator=generator, device=train_rows.device
            )
            batch = train_rows[index]
            if dataset.levels is not None:
                batch = dequantize(batch, generator)
            loss = flow.training_loss(batch, None if train_context is None else train_context[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(flow.parameters(), config.clip_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()

            running_loss += loss.detach()
            steps_in_window = step % _LOSS_DISPLAY_INTERVAL + 1
            if steps_in_window == _LOSS_DISPLAY_INTERVAL or step == config.steps - 1:
                window_loss = running_loss.item() / steps_in_window
                if not np.isfinite(window_loss):
                    raise FloatingPointError(f"training loss became non-finite by step {step + 1}")
                bar.set_postfix(loss=f"{window_loss:.4f}", **selection.postfix())
                running_loss.zero_()
            if split.validation is not None and ((step + 1) % config.eval_every == 0 or step == config.steps - 1):
                flow.eval()
                score = mean_log_prob(flow, split.validation, split.validation_context, dataset.levels, config.seed)
                flow.train()
                if selection.stop_after(step + 1, score):
                    break
    flow.eval()
    selection.restore_best()
    return {
        "train_log_likelihood": mean_log_prob(flow, split.train, split.train_context, dataset.levels),
        **({} if split.validation is None else {"validation_log_likelihood": selection.best_score}),
        "test_log_likelihood": mean_log_prob(flow, dataset.test, dataset.test_context, dataset.levels),
        "train_rows": len(split.train),
        "validation_rows": 0 if split.validation is None else len(split.validation),
        "best_step": selection.best_step or step + 1,
        "steps_run": step + 1,
    }


class _Selection:
    """The best validation score so far and its weights; says when patience runs out."""

    def __init__(self, flow: DensityModel, patience: int | None):
        self.flow, self.patience = flow, patience
        self.best_score, self.best_step, self.best_state = -math.inf, None, None
        self.scores_since_best = 0

    def stop_after(self, step: int, score: float) -> bool:
        """Note the score at ``step``; True once ``patience`` scores in a row did not improve."""
        if score > self.best_score:  # NaN never improves
            self.best_score, self.best_step, self.scores_since_best = score, step, 0
            self.best_state = {name: tensor.detach().clone() for name, tensor in self.flow.state_dict().items()}
            return False
        self.scores_since_best += 1
        return self.patience is not None and self.scores_since_best >= self.patience

    def postfix(self) -> dict[str, str]:
        return {} if self.best_step is None else {"validation": f"{self.best_score:.4f}@{self.best_step}"}

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.flow.load_state_dict(self.best_state)


def training_record(config: TrainConfig, metrics: dict[str, float]) -> dict[str, Any]:
    """What a checkpoint keeps of its training: the settings (the split's fraction and seed,
    the schedule), the row counts, the step whose weights it holds and the steps run."""
    return {"config": asdict(config),
            **{key: metrics[key] for key in ("train_rows", "validation_rows", "best_step", "steps_run")}}


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare by
class Checkpoint:
    """A trained model's config and weights, and what export needs of its training: the
    data set's name and summary, the metrics, and the first held-out rows (and contexts),
    on which export checks the exported graphs against PyTorch; and ``training``, the
    record of :func:`training_record` (empty in checkpoints written before it existed).

    The file is a plain dict of tensors and JSON-like values, so it loads with
    ``torch.load(weights_only=True)``.
    """

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    data: dict[str, Any]
    metrics: dict[str, Any]
    dataset: str
    heldout_sample: torch.Tensor
    heldout_context: torch.Tensor | None = None
    training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls, flow: DensityModel, *, data_summary: dict[str, Any], metrics: dict[str, Any], dataset: str,
        heldout: np.ndarray, heldout_context: np.ndarray | None = None, training: dict[str, Any] | None = None,
    ) -> Checkpoint:
        """The checkpoint of ``flow``, keeping the first ``HELDOUT_SAMPLE_ROWS`` held-out rows."""
        return cls(
            config=flow.config(),
            state_dict={name: tensor.detach().cpu() for name, tensor in flow.state_dict().items()},
            data=data_summary,
            metrics=metrics,
            dataset=dataset,
            heldout_sample=_first_rows(heldout),
            heldout_context=None if heldout_context is None else _first_rows(heldout_context),
            training=training or {},
        )

    def save(self, path: str | Path) -> None:
        """Write the checkpoint to ``path``; parents are created."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        content = {f.name: getattr(self, f.name) for f in fields(self)}
        torch.save({"format_version": CHECKPOINT_FORMAT_VERSION, **content}, path)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """Read ``path`` with ``weights_only``; raises FileNotFoundError or ValueError."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file at {path}")
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: not a flowserve checkpoint (top level is not a dict)")
        version = raw.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"{path}: unsupported checkpoint format_version {version!r}, expected one of "
                             f"{list(READABLE_FORMAT_VERSIONS)}")
        if version == 2:
            raw = {**raw, "training": {}}
        keys = [f.name for f in fields(cls)]
        missing = [key for key in keys if key not in raw]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {missing}")
        return cls(**{key: raw[key] for key in keys})

    def build_model(self) -> DensityModel:
        """The trained model, on CPU, in eval mode."""
        flow = build_flow(self.config)
        flow.load_state_dict(self.state_dict, strict=True)
        return flow.eval()


def save_checkpoint(
    path: str | Path,
    flow: DensityModel,
    *,
    data_summary: dict[str, Any],
    metrics: dict[str, Any],
    dataset: str,
    heldout: np.ndarray,
    heldout_context: np.ndarray | None = None,
    training: dict[str, Any] | None = None,
) -> None:
    """Save ``flow`` and its training metadata as a :class:`Checkpoint`; parents are created."""
    Checkpoint.of(flow, data_summary=data_summary, metrics=metrics, dataset=dataset, heldout=heldout,
                  heldout_context=heldout_context, training=training).save(path)


def _first_rows(rows: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(rows[:HELDOUT_SAMPLE_ROWS], dtype=np.float32))


def load_checkpoint(path: str | Path) -> tuple[DensityModel, Checkpoint]:
    """Rebuild the flow saved at ``path`` (on CPU, eval mode); returns it and the checkpoint."""
    checkpoint = Checkpoint.load(path)
    return checkpoint.build_model(), checkpoint

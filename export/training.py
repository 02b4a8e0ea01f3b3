"""Maximum-likelihood training of flows, and checkpoints that load with ``weights_only``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import trange

from .flows.base import DensityModel
from .flows.registry import build_flow

CHECKPOINT_FORMAT_VERSION = 2
HELDOUT_SAMPLE_ROWS = 512
_LOSS_DISPLAY_INTERVAL = 50


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train_flow`; ``cosine_lr`` anneals the rate to zero."""

    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    weight_decay: float = 0.0
    cosine_lr: bool = True


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
    """Fit ``flow`` to ``dataset.train`` by maximum likelihood with Adam; returns mean
    log-likelihoods of the training and held-out splits.

    ``dataset`` is a :class:`flowserve.export.data.Dataset`: its contexts condition the
    flow, and pixel data (``levels`` set) is dequantized afresh every batch. Batches are
    drawn with a generator seeded by ``config.seed``, so the run is deterministic given
    the flow's initial weights. Leaves the flow in eval mode. Raises ``FloatingPointError``
    if the loss becomes non-finite.
    """
    reference = next(flow.parameters())
    train_rows = _as_tensor(dataset.train, reference)
    train_context = _as_tensor(dataset.train_context, reference)
    generator = torch.Generator(device=train_rows.device).manual_seed(config.seed)
    optimizer = torch.optim.Adam(flow.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
        if config.cosine_lr
        else None
    )

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
            optimizer.step()
            if scheduler is not None:
                scheduler.step()

            running_loss += loss.detach()
            steps_in_window = step % _LOSS_DISPLAY_INTERVAL + 1
            if steps_in_window == _LOSS_DISPLAY_INTERVAL or step == config.steps - 1:
                window_loss = running_loss.item() / steps_in_window
                if not np.isfinite(window_loss):
                    raise FloatingPointError(f"training loss became non-finite by step {step + 1}")
                bar.set_postfix(loss=f"{window_loss:.4f}")
                running_loss.zero_()
    flow.eval()

    return {
        "train_log_likelihood": mean_log_prob(flow, dataset.train, dataset.train_context, dataset.levels),
        "test_log_likelihood": mean_log_prob(flow, dataset.test, dataset.test_context, dataset.levels),
    }


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare by
class Checkpoint:
    """A trained model's config and weights, and what export needs of its training: the
    data set's name and summary, the metrics, and the first held-out rows (and contexts),
    on which export checks the exported graphs against PyTorch.

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

    @classmethod
    def of(
        cls, flow: DensityModel, *, data_summary: dict[str, Any], metrics: dict[str, Any], dataset: str,
        heldout: np.ndarray, heldout_context: np.ndarray | None = None,
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
        if version != CHECKPOINT_FORMAT_VERSION:
            raise ValueError(
                f"{path}: unsupported checkpoint format_version {version!r}, expected {CHECKPOINT_FORMAT_VERSION}"
            )
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
) -> None:
    """Save ``flow`` and its training metadata as a :class:`Checkpoint`; parents are created."""
    Checkpoint.of(flow, data_summary=data_summary, metrics=metrics, dataset=dataset, heldout=heldout,
                  heldout_context=heldout_context).save(path)


def _first_rows(rows: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(rows[:HELDOUT_SAMPLE_ROWS], dtype=np.float32))


def load_checkpoint(path: str | Path) -> tuple[DensityModel, Checkpoint]:
    """Rebuild the flow saved at ``path`` (on CPU, eval mode); returns it and the checkpoint."""
    checkpoint = Checkpoint.load(path)
    return checkpoint.build_model(), checkpoint

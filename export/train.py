"""Maximum-likelihood training of flows, and checkpoints that load with ``weights_only``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import trange

from .flows import Flow, build_flow

CHECKPOINT_FORMAT_VERSION = 1
_CHECKPOINT_KEYS = ("config", "state_dict", "data", "metrics", "dataset", "heldout_sample")
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


def _as_tensor(data: np.ndarray | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(data, dtype=like.dtype, device=like.device)


@torch.no_grad()
def mean_log_prob(flow: Flow, data: np.ndarray | torch.Tensor, batch_size: int = 8192) -> float:
    """Mean log-density of the rows of ``data`` under ``flow`` (nats per example)."""
    rows = _as_tensor(data, next(flow.parameters()))
    total = sum(flow.log_prob(chunk).sum().item() for chunk in rows.split(batch_size))
    return total / len(rows)


def train_flow(
    flow: Flow,
    train: np.ndarray | torch.Tensor,
    test: np.ndarray | torch.Tensor,
    config: TrainConfig,
    progress: bool = True,
) -> dict[str, float]:
    """Fit ``flow`` to ``train`` by maximum likelihood with Adam; returns mean log-likelihoods.

    Batches are drawn with a generator seeded by ``config.seed``, so the run is
    deterministic given the flow's initial weights. Leaves the flow in eval mode.
    Raises ``FloatingPointError`` if the loss becomes non-finite.
    """
    train_rows = _as_tensor(train, next(flow.parameters()))
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
            loss = -flow.log_prob(train_rows[index]).mean()
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
        "train_log_likelihood": mean_log_prob(flow, train),
        "test_log_likelihood": mean_log_prob(flow, test),
    }


def save_checkpoint(
    path: str | Path,
    flow: Flow,
    *,
    data_summary: dict[str, Any],
    metrics: dict[str, Any],
    dataset: str,
    heldout: np.ndarray,
) -> None:
    """Save the flow's config and weights with training metadata; parents are created.

    The first ``HELDOUT_SAMPLE_ROWS`` rows of ``heldout`` are kept: export checks ONNX
    against PyTorch on them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "config": flow.config(),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in flow.state_dict().items()},
        "data": data_summary,
        "metrics": metrics,
        "dataset": dataset,
        "heldout_sample": torch.as_tensor(np.asarray(heldout[:HELDOUT_SAMPLE_ROWS], dtype=np.float32)),
    }
    torch.save(checkpoint, path)


def load_checkpoint(path: str | Path) -> tuple[Flow, dict[str, Any]]:
    """Rebuild the flow saved at ``path`` (on CPU, eval mode); returns it and the checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a flowserve checkpoint (top level is not a dict)")
    version = checkpoint.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported checkpoint format_version {version!r}, "
            f"expected {CHECKPOINT_FORMAT_VERSION}"
        )
    missing = [key for key in _CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}")
    flow = build_flow(checkpoint["config"])
    flow.load_state_dict(checkpoint["state_dict"], strict=True)
    return flow.eval(), checkpoint

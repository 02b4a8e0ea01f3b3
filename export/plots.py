"""Pictures of trained flows, for ``flowserve plot``.

2-D flows: samples as a scatter beside the density ``exp(log p(x))`` on a grid. Image
flows: a grid of samples. Conditional flows (one-hot context, e.g. digit labels): one row
per class. matplotlib runs with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

MAX_CLASS_ROWS = 10
GRID_POINTS = 160


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _class_contexts(context_dim: int, rows_per_class: int):
    """One-hot contexts for the first ``MAX_CLASS_ROWS`` classes, ``rows_per_class`` each."""
    import torch

    classes = min(context_dim, MAX_CLASS_ROWS)
    return [torch.eye(context_dim)[k].expand(rows_per_class, context_dim).contiguous() for k in range(classes)]


def _bounds(points: np.ndarray, margin: float = 0.15) -> tuple[tuple[float, float], tuple[float, float]]:
    """Axis ranges covering the central 99% of ``points`` [N, 2], with a margin."""
    low = np.percentile(points, 0.5, axis=0)
    high = np.percentile(points, 99.5, axis=0)
    pad = np.maximum(high - low, 1e-3) * margin
    low, high = low - pad, high + pad
    return (float(low[0]), float(high[0])), (float(low[1]), float(high[1]))


def _density_grid(flow, xlim, ylim, context=None, points: int = GRID_POINTS):
    import torch

    xs = np.linspace(*xlim, points, dtype=np.float32)
    ys = np.linspace(*ylim, points, dtype=np.float32)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    rows = torch.from_numpy(grid)
    ctx = None if context is None else context[:1].expand(len(rows), -1)
    with torch.no_grad():
        log_prob = flow.log_prob(rows, context=ctx) if ctx is not None else flow.log_prob(rows)
    density = np.exp(log_prob.numpy().astype(np.float64)).reshape(points, points)
    return np.where(np.isfinite(density), density, 0.0)


def _sample(flow, n: int, generator, context=None) -> np.ndarray:
    import torch

    with torch.no_grad():
        if context is None:
            samples = flow.sample(n, generator=generator)
        else:
            samples = flow.sample(n, context=context, generator=generator)
    return samples.detach().cpu().numpy()


def plot_2d(flow, output: Path, *, context_dim: int = 0, heldout: np.ndarray | None = None,
            num_samples: int = 2000, seed: int = 0, title: str = "") -> Path:
    """Scatter of ``num_samples`` samples beside the density heat map; one row per class
    for a conditional flow. The ranges cover the held-out points if given, else the samples."""
    import torch

    plt = _pyplot()
    generator = torch.Generator().manual_seed(seed)
    contexts = _class_contexts(context_dim, num_samples) if context_dim else [None]
    samples = [_sample(flow, num_samples, generator, context) for context in contexts]
    reference = heldout if heldout is not None and len(heldout) >= 10 else np.concatenate(samples)
    xlim, ylim = _bounds(reference)

    fig, axes = plt.subplots(len(contexts), 2, figsize=(9, 4.2 * len(contexts)), squeeze=False)
    for row, (context, points) in enumerate(zip(contexts, samples)):
        label = f" (class {row})" if context is not None else ""
        scatter, heat = axes[row]
        scatter.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
        scatter.set(xlim=xlim, ylim=ylim, title=f"{num_samples} samples{label}", aspect="equal")
        density = _density_grid(flow, xlim, ylim, context)
        heat.imshow(density, origin="lower", extent=(*xlim, *ylim), cmap="viridis", aspect="equal")
        heat.set(title=f"density exp(log p(x)){label}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return output


def plot_images(flow, output: Path, *, context_dim: int = 0, levels: int | None = None,
                num_samples: int = 64, seed: int = 0, title: str = "") -> Path:
    """A grid of samples ``[C, H, W]`` (C = 1 grey, 3 colour); one row of
    ``min(num_samples, 10)`` per class for a conditional flow. Pixel data are clipped to
    ``[0, levels]`` and shown on that fixed scale."""
    import torch

    plt = _pyplot()
    generator = torch.Generator().manual_seed(seed)
    if context_dim:
        columns = min(num_samples, 10)
        rows = [_sample(flow, columns, generator, context) for context in _class_contexts(context_dim, columns)]
    else:
        columns = math.ceil(math.sqrt(num_samples))
        flat = _sample(flow, num_samples, generator)
        rows = [flat[start:start + columns] for start in range(0, num_samples, columns)]

    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.9, len(rows) * 0.9 + 0.4), squeeze=False)
    for r, images in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            image = images[c]
            if image.ndim == 3:  # [C, H, W] -> [H, W, C]
                image = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
            if levels is not None:
                image = np.clip(image, 0.0, float(levels))
                scale = {"vmin": 0.0, "vmax": float(levels)}
                if image.ndim == 3:
                    image = image / levels
                    scale = {}
            else:
                scale = {}
                if image.ndim == 3:
                    image = (image - image.min()) / max(float(np.ptp(image)), 1e-8)
            ax.imshow(image, cmap="gray_r" if image.ndim == 2 else None, interpolation="nearest", **scale)
            if context_dim and c == 0:
                ax.set_ylabel(str(r), rotation=0, labelpad=10)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return output


def plot_checkpoint(checkpoint: str | Path, output: str | Path, num_samples: int | None = None,
                    seed: int = 0) -> Path:
    """Plot the flow saved at ``checkpoint`` into ``output`` (PNG, parents created).

    2-D flows (event shape ``(2,)``) get :func:`plot_2d`, image flows (event shape with
    2 or 3 axes) :func:`plot_images`; other shapes raise ``ValueError``.
    """
    from .training import load_checkpoint

    flow, ckpt = load_checkpoint(checkpoint)
    event_shape = flow.event_shape
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    title = f"{flow.family} on {ckpt.dataset}"
    if event_shape == (2,):
        heldout = np.asarray(ckpt.heldout_sample, dtype=np.float32).reshape(-1, 2)
        return plot_2d(flow, output, context_dim=flow.context_dim, heldout=heldout,
                       num_samples=num_samples or 2000, seed=seed, title=title)
    if len(event_shape) in (2, 3):
        return plot_images(flow, output, context_dim=flow.context_dim, levels=None if flow.support is None else int(flow.support[1]),
                           num_samples=num_samples or 64, seed=seed, title=title)
    raise ValueError(
        f"{checkpoint}: cannot plot a flow with event shape {list(event_shape)}; "
        f"plot supports 2-D points [2] and images [C, H, W]"
    )

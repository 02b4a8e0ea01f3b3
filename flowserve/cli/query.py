"""Commands that call a running gateway: sample, score and models."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from flowserve.metadata import HELDOUT_LOG_LIKELIHOOD


def _load_npy(path: Path) -> np.ndarray:
    if path.suffix != ".npy":
        raise ValueError(f"{path} is not a .npy file")
    return np.load(path, allow_pickle=False).astype(np.float32)


def sample_command(args) -> None:
    from flowserve.server.client import FlowClient

    with FlowClient(args.target, timeout=args.timeout) as client:
        if args.stream:
            _sample_stream(client, args)
            return
        result = client.sample(args.model, args.num_samples, seed=args.seed, temperature=args.temperature,
                               context=args.context)
    print(f"{len(result.x)} samples from {args.model} (seed {result.seed}); "
          f"mean log p(x) {result.log_prob.mean():.4f}")
    print(np.array2string(result.x[:5], precision=4))
    if args.output:
        np.save(args.output, result.x)
        print(f"wrote {args.output}")


def _sample_stream(client, args) -> None:
    """SampleStream: chunks go straight into the .npy file (memory-mapped), so any number of
    samples fits in a few chunks of memory here too; progress on a terminal."""
    output, seed, total, log_prob_sum = None, None, 0, 0.0
    show_progress = sys.stderr.isatty()
    try:
        for chunk in client.sample_stream(args.model, args.num_samples, seed=args.seed,
                                          temperature=args.temperature, context=args.context):
            if args.output and output is None:
                output = np.lib.format.open_memmap(args.output, mode="w+", dtype=np.float32,
                                                   shape=(args.num_samples, *chunk.x.shape[1:]))
            if output is not None:
                output[total:total + len(chunk.x)] = chunk.x
            if total == 0:
                print(np.array2string(chunk.x[:5], precision=4))
            seed, total, log_prob_sum = chunk.seed, total + len(chunk.x), log_prob_sum + float(chunk.log_prob.sum())
            if show_progress:
                print(f"\rSampleStream: {total:,} of {args.num_samples:,} rows", end="", file=sys.stderr, flush=True)
    finally:
        if show_progress:
            print(file=sys.stderr)
        if output is not None:
            output.flush()
    print(f"{total} samples from {args.model} (seed {seed}), streamed; mean log p(x) {log_prob_sum / total:.4f}")
    if output is not None:
        print(f"wrote {args.output}")


def score_command(args) -> None:
    from flowserve.server.client import FlowClient

    x = _load_npy(args.data)
    context = None if args.context is None else _load_npy(args.context)
    with FlowClient(args.target, timeout=args.timeout) as client:
        scores = client.score(args.model, x, context, return_bits_per_dim=args.bits_per_dim)
    log_prob = scores.log_prob
    print(f"scored {len(log_prob)} rows with {args.model}: mean log p(x) {log_prob.mean():.4f}, "
          f"min {log_prob.min():.4f}, max {log_prob.max():.4f}")
    if scores.bits_per_dim is not None:
        print(f"mean bits/dim {scores.bits_per_dim.mean():.4f}")
    if args.output:
        np.save(args.output, log_prob)
        print(f"wrote {args.output}")


def models_command(args) -> None:
    from flowserve.server.client import FlowClient
    from flowserve.server.proto import flowserve_pb2 as pb

    with FlowClient(args.target, timeout=args.timeout) as client:
        for m in client.list_models():
            directions = ", ".join(pb.Direction.Name(d).removeprefix("DIRECTION_").lower() for d in m.directions)
            context = f", context shape {list(m.context_shape)}" if m.context_shape else ""
            kind = "lower bound" if m.log_likelihood_kind == pb.LOG_LIKELIHOOD_KIND_LOWER_BOUND else "exact"
            print(f"{m.name}: {m.family}, event shape {list(m.event_shape)}{context}, directions [{directions}], "
                  f"log-likelihood {kind}, versions {list(m.versions)}, ready {m.ready}, "
                  f"held-out log-lik {m.metadata.get(HELDOUT_LOG_LIKELIHOOD, '?')}")

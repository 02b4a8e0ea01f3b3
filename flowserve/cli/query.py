"""Commands that call a running gateway: sample, score, models and health."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from flowserve.contract.metadata import HELDOUT_LOG_LIKELIHOOD

from .parser import TOKEN_ENV


def _load_npy(path: Path) -> np.ndarray:
    if path.suffix != ".npy":
        raise ValueError(f"{path} is not a .npy file")
    return np.load(path, allow_pickle=False).astype(np.float32)


def connect(args):
    """A :class:`~flowserve.server.client.FlowClient` of ``args.target`` with the command's TLS and token options."""
    from flowserve.server.client import FlowClient
    from flowserve.server.protocol.tls import ClientTLS

    tls_options = (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    tls = ClientTLS.from_files(*tls_options) if args.tls or any(o is not None for o in tls_options) else None
    return FlowClient(args.target, timeout=args.timeout, tls=tls, token=_token(args))


def _token(args) -> str | None:
    """The token of ``--token-file``, else of the environment; None without either."""
    from flowserve.server.protocol.auth import read_tokens

    if args.token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    tokens = read_tokens(args.token_file)
    if len(tokens) != 1:
        raise ValueError(f"token file {args.token_file} must hold one token; it holds {len(tokens)}")
    return tokens[0]


def sample_command(args) -> None:
    context = args.context if args.context_file is None else _load_npy(args.context_file)
    if args.per_context is not None and context is None:
        raise ValueError("--per-context draws samples for each context: give --context-file (or --context)")
    num_samples = 0 if args.per_context is not None else args.num_samples
    with connect(args) as client:
        if args.stream:
            _sample_stream(client, args, num_samples, context)
            return
        result = client.sample(args.model, num_samples, seed=args.seed, temperature=args.temperature,
                               context=context, samples_per_context=args.per_context,
                               truncate_to_support=args.truncate, max_draws=args.max_draws)
    grouped = "" if args.per_context is None else f" ({result.x.shape[0]} contexts x {args.per_context})"
    rows = result.x if args.per_context is None else result.x.reshape(-1, *result.x.shape[2:])
    print(f"{len(rows)} samples{grouped} from {args.model} (seed {result.seed}); "
          f"mean log p(x) {result.log_prob.mean():.4f}{_acceptance(result)}")
    print(np.array2string(rows[:5], precision=4))
    if args.output:
        np.save(args.output, result.x)
        print(f"wrote {args.output}")


def _sample_stream(client, args, num_samples: int, context: np.ndarray | None) -> None:
    """SampleStream: chunks go straight into the .npy file (memory-mapped), so any number of
    samples fits in a few chunks of memory here too; progress on a terminal."""
    per = args.per_context
    rows = num_samples if per is None else per * (1 if context.ndim == 1 else len(context))
    output, seed, total, log_prob_sum, last = None, None, 0, 0.0, None
    show_progress = sys.stderr.isatty()
    try:
        for chunk in client.sample_stream(args.model, num_samples, seed=args.seed, temperature=args.temperature,
                                          context=context, samples_per_context=per,
                                          truncate_to_support=args.truncate, max_draws=args.max_draws):
            if args.output and output is None:
                groups = (rows,) if per is None else (rows // per, per)
                output = np.lib.format.open_memmap(args.output, mode="w+", dtype=np.float32,
                                                   shape=(*groups, *chunk.x.shape[1:]))
            if output is not None:
                output.reshape(rows, *chunk.x.shape[1:])[total:total + len(chunk.x)] = chunk.x
            if total == 0:
                print(np.array2string(chunk.x[:5], precision=4))
            seed, total, log_prob_sum = chunk.seed, total + len(chunk.x), log_prob_sum + float(chunk.log_prob.sum())
            last = chunk
            if show_progress:
                print(f"\rSampleStream: {total:,} of {rows:,} rows", end="", file=sys.stderr, flush=True)
    finally:
        if show_progress:
            print(file=sys.stderr)
        if output is not None:
            output.flush()
    print(f"{total} samples from {args.model} (seed {seed}), streamed; mean log p(x) {log_prob_sum / total:.4f}"
          f"{_acceptance(last)}")
    if output is not None:
        print(f"wrote {args.output}")


def _acceptance(samples) -> str:
    """What a truncated call reports: its acceptance rate and draws."""
    if not samples.draws:
        return ""
    return f"; inside the support box: {samples.acceptance_rate:.2%} of {samples.draws:,} draws"


def score_command(args) -> None:
    x = _load_npy(args.data)
    context = None if args.context is None else _load_npy(args.context)
    with connect(args) as client:
        scores = client.score(args.model, x, context, return_bits_per_dim=args.bits_per_dim,
                              truncate_to_support=args.truncate)
    log_prob = scores.log_prob
    print(f"scored {len(log_prob)} rows with {args.model}: mean log p(x) {log_prob.mean():.4f}, "
          f"min {log_prob.min():.4f}, max {log_prob.max():.4f}")
    if scores.bits_per_dim is not None:
        print(f"mean bits/dim {scores.bits_per_dim.mean():.4f}")
    if args.output:
        np.save(args.output, log_prob)
        print(f"wrote {args.output}")


def encode_command(args) -> None:
    x = _load_npy(args.data)
    context = None if args.context is None else _load_npy(args.context)
    with connect(args) as client:
        encoded = client.encode(args.model, x, context)
    print(f"encoded {len(encoded.z)} rows with {args.model}: z {list(encoded.z.shape)}, mean log|det dz/dx| "
          f"{encoded.log_det.mean():.4f}, mean log p(x) {encoded.log_prob.mean():.4f}")
    if args.output:
        np.savez(args.output, z=encoded.z, log_det=encoded.log_det, log_prob=encoded.log_prob)
        print(f"wrote {args.output}")


def models_command(args) -> None:
    from flowserve.server.protocol.proto import flowserve_pb2 as pb

    with connect(args) as client:
        for m in client.list_models():
            directions = ", ".join(pb.Direction.Name(d).removeprefix("DIRECTION_").lower() for d in m.directions)
            context = f", context shape {list(m.context_shape)}" if m.context_shape else ""
            kind = "lower bound" if m.log_likelihood_kind == pb.LOG_LIKELIHOOD_KIND_LOWER_BOUND else "exact"
            print(f"{m.name}: {m.family}, event shape {list(m.event_shape)}{context}, directions [{directions}], "
                  f"log-likelihood {kind}, versions {list(m.versions)}, ready {m.ready}, "
                  f"held-out log-lik {m.metadata.get(HELDOUT_LOG_LIKELIHOOD, '?')}")


def health_command(args) -> None:
    """Print the health status of the gateway, or of one flow (``--model``); RuntimeError
    (exit code 1) unless it is SERVING."""
    with connect(args) as client:
        status = client.health(args.model)
    print(status)
    if status != "SERVING":
        what = "the gateway" if args.model is None else f"flow {args.model!r} on the gateway"
        raise RuntimeError(f"{what} at {args.target} is {status}")

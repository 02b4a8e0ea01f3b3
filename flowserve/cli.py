"""The ``flowserve`` command: train, export, serve, sample, score, models, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np

# The registries' names, spelled out so that building the parser imports neither torch nor
# scikit-learn (client commands start in a fraction of a second); a test keeps them equal to
# flowserve.export.flows.FLOW_FAMILIES and flowserve.export.data.DATASETS.
FAMILIES = ("nice", "realnvp", "glow", "maf", "iaf", "vae")
DATASET_NAMES = ("moons", "circles", "8gaussians", "checkerboard", "breast-cancer", "digits", "digits-conditional")
DEFAULT_REPOSITORY = Path("model_repository")
DEFAULT_TARGET = "127.0.0.1:8500"
TRITON_URL_ENV = "FLOWSERVE_TRITON_URL"


def _float_list(text: str) -> np.ndarray:
    try:
        return np.array([float(value) for value in text.split(",")], dtype=np.float32)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _load_npy(path: Path) -> np.ndarray:
    if path.suffix != ".npy":
        raise ValueError(f"{path} is not a .npy file")
    return np.load(path, allow_pickle=False).astype(np.float32)


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=os.environ.get("FLOWSERVE_TARGET", DEFAULT_TARGET),
                        help="gateway host:port (env FLOWSERVE_TARGET)")
    parser.add_argument("--timeout", type=float, default=60.0, help="RPC deadline in seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a flow on a built-in data set or a .npy/.csv file")
    train.add_argument("--family", default="realnvp", choices=FAMILIES)
    source = train.add_mutually_exclusive_group()
    source.add_argument("--dataset", default=None, choices=DATASET_NAMES, help="built-in data set (default moons)")
    source.add_argument("--data", type=Path, metavar="FILE",
                        help="user data: a .npy file or a comma-separated .csv (optional header row) of [N, D]")
    train.add_argument("--num-points", type=int, default=None,
                       help="data set size before the held-out split (default: 4000 for 2-D toys, all rows "
                            "otherwise)")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("-o", "--output", type=Path, default=None,
                       help="checkpoint path (default checkpoints/<family>-<dataset>.pt)")

    export = commands.add_parser("export", help="export a checkpoint into a Triton model repository")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    export.add_argument("--name", help="flow name (default <family>-<dataset>)")
    export.add_argument("--version", type=int, default=1)
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx",
                        help="model file: model.onnx or model.pt (TorchScript)")
    export.add_argument("--backend", choices=["python", "onnxruntime", "pytorch"], default="python",
                        help="python: flowserve's runner for either format (works with the pytriton wheel); "
                             "onnxruntime / pytorch: Triton's native backends for onnx / torchscript "
                             "(NGC images, GPU clusters)")
    export.add_argument("--max-batch-size", type=int, default=1024)
    export.add_argument("--queue-delay-us", type=int, default=500, help="dynamic batcher max queue delay")
    export.add_argument("--instances", type=int, default=1, help="instances per instance group")
    export.add_argument("--instance-kind", choices=["cpu", "gpu"], default="cpu")
    export.add_argument("--gpus", default="", help="comma-separated GPU ids for --instance-kind gpu")
    export.add_argument("--intra-op-threads", type=int, default=1)

    serve = commands.add_parser("serve", help="start Triton (unless --triton-url) and the gateway")
    serve.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8500)
    serve.add_argument("--metrics-port", type=int, default=8502)
    serve.add_argument("--triton-url", default=os.environ.get(TRITON_URL_ENV),
                       help=f"use this external Triton (host:port of its gRPC API) instead of starting one "
                            f"(env {TRITON_URL_ENV})")
    serve.add_argument("--triton-grpc-port", type=int, default=0, help="embedded Triton's gRPC port (0: free)")
    serve.add_argument("--triton-metrics-port", type=int, default=0, help="embedded Triton's metrics port")
    serve.add_argument("--workdir", type=Path, default=None,
                       help="embedded Triton's backend directory and log (default: a temporary directory)")
    serve.add_argument("--max-rows-per-request", type=int, default=100_000)
    serve.add_argument("--max-rows-in-flight", type=int, default=1_000_000)
    serve.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for Triton")

    sample = commands.add_parser("sample", help="draw samples from a served flow")
    _add_target(sample)
    sample.add_argument("--model", required=True)
    sample.add_argument("-n", "--num-samples", type=int, default=1000)
    sample.add_argument("--seed", type=int, default=None)
    sample.add_argument("--temperature", type=float, default=None)
    sample.add_argument("--context", type=_float_list, default=None, metavar="V1,V2,...",
                        help="one context for every sample, e.g. a one-hot label: 0,0,1,0,0,0,0,0,0,0")
    sample.add_argument("-o", "--output", type=Path, help="write samples to this .npy file")

    score = commands.add_parser("score", help="log-likelihood of each row of a .npy file")
    _add_target(score)
    score.add_argument("--model", required=True)
    score.add_argument("data", type=Path, help=".npy file of shape [N, *event_shape]")
    score.add_argument("--context", type=Path, default=None, metavar="FILE.npy",
                       help="contexts, [N, *context_shape] or one row for all")
    score.add_argument("--bits-per-dim", action="store_true", help="also report bits/dim")
    score.add_argument("-o", "--output", type=Path, help="write log-likelihoods to this .npy file")

    models = commands.add_parser("models", help="list the gateway's models")
    _add_target(models)

    demo = commands.add_parser("demo", help="train and export RealNVP on two moons, serve it, sample and score")
    demo.add_argument("--steps", type=int, default=1500)
    demo.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)

    quality = commands.add_parser(
        "quality", help="train every flow family on moons, breast-cancer and digits; write a table of "
                        "held-out log-likelihoods beside a diagonal-Gaussian baseline (long: about 10 minutes on 2 cores)")
    quality.add_argument("--output", type=Path, default=None,
                         help="Markdown report (default docs/quality.md); the JSON goes beside it")
    quality.add_argument("--families", default=None, help="comma-separated families (default: all)")
    quality.add_argument("--datasets", default=None,
                         help="comma-separated built-in data sets (default: moons,breast-cancer,digits)")
    quality.add_argument("--steps-scale", type=float, default=None,
                         help="multiply every recipe's training steps (default 1; e.g. 0.01 for a smoke test)")
    quality.add_argument("--seed", type=int, default=None, help="data, initialisation and batches (default 0)")

    plot = commands.add_parser("plot", help="plot a checkpoint: samples and density (2-D) or sample grid (images)")
    plot.add_argument("checkpoint", type=Path)
    plot.add_argument("-o", "--output", type=Path, default=None,
                      help="PNG file (default: the checkpoint path with .png)")
    plot.add_argument("-n", "--num-samples", type=int, default=None,
                      help="samples to draw (default 2000 for 2-D flows, 64 per image grid, 10 per class)")
    plot.add_argument("--seed", type=int, default=0)
    return parser


def cmd_train(args) -> Path:
    import torch

    from flowserve.export.data import load_dataset, summarize
    from flowserve.export.flows import build_flow, default_flow_config
    from flowserve.export.train import TrainConfig, save_checkpoint, train_flow

    dataset = load_dataset(args.data if args.data is not None else args.dataset or "moons",
                           num_points=args.num_points, seed=args.seed)
    torch.manual_seed(args.seed)  # the initial weights; train_flow seeds its own batches
    flow = build_flow(default_flow_config(args.family, dataset))
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    metrics = train_flow(flow, dataset, config, progress=sys.stderr.isatty() or args.verbose)
    output = args.output or Path("checkpoints") / f"{args.family}-{dataset.name}.pt"
    save_checkpoint(output, flow, data_summary=summarize(dataset.train), metrics=metrics, dataset=dataset.name,
                    heldout=dataset.test, heldout_context=dataset.test_context)
    print(f"trained {args.family} on {dataset.name}: train log-lik {metrics['train_log_likelihood']:.4f}, "
          f"held-out log-lik {metrics['test_log_likelihood']:.4f} -> {output}")
    return output


def _comma_list(text: str | None, known, what: str, default) -> list[str]:
    if text is None:
        return list(default)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown) or repr(text)}; choose from {', '.join(known)}")
    return names


def cmd_quality(args) -> dict:
    import shlex
    from datetime import datetime, timezone

    from flowserve.export.data import DATASETS
    from flowserve.export.flows import FLOW_FAMILIES
    from flowserve.export.quality import QUALITY_DATASETS, run_quality, write_report

    families = _comma_list(args.families, list(FLOW_FAMILIES), "flow family", FLOW_FAMILIES)
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


def cmd_plot(args) -> Path:
    from flowserve.export.plots import plot_checkpoint

    output = args.output or args.checkpoint.with_suffix(".png")
    path = plot_checkpoint(args.checkpoint, output, num_samples=args.num_samples, seed=args.seed)
    print(f"wrote {path}")
    return path


def cmd_export(args) -> dict:
    from flowserve.export.exporter import export_flow
    from flowserve.export.repository import ServingConfig

    gpus = tuple(int(g) for g in args.gpus.split(",") if g.strip())
    serving = ServingConfig(
        backend=args.backend, format=args.format, max_batch_size=args.max_batch_size, max_queue_delay_us=args.queue_delay_us,
        instance_count=args.instances, instance_kind=args.instance_kind, gpus=gpus,
        intra_op_threads=args.intra_op_threads,
    )
    meta = export_flow(args.checkpoint, args.model_repository, name=args.name, version=args.version,
                       serving=serving, progress=sys.stderr.isatty() or args.verbose)
    worst = max(meta["parity_max_diff"].values())
    print(f"exported {meta['name']} v{meta['version']} ({meta['format']}, {meta['backend']} backend) to "
          f"{args.model_repository}: models {', '.join(meta['models'].values())}; "
          f"{meta['format']} vs PyTorch max |diff| {worst:.2e}")
    return meta


def cmd_serve(args) -> None:
    from flowserve.server.app import GatewayConfig, run_gateway
    from flowserve.server.launcher import TritonServer
    from flowserve.server.service import GatewayLimits

    if not args.model_repository.is_dir():
        raise FileNotFoundError(f"model repository {args.model_repository} does not exist; run flowserve export first")
    limits = GatewayLimits(args.max_rows_per_request, args.max_rows_in_flight)
    triton = None
    triton_url = args.triton_url
    if not triton_url:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="flowserve-triton-"))
        triton = TritonServer(args.model_repository, workdir, args.triton_grpc_port, args.triton_metrics_port)
        triton.start(ready_timeout=args.ready_timeout)
        triton_url = triton.grpc_url
        print(f"Triton ready: gRPC {triton.grpc_url}, metrics {triton.metrics_url}, log {triton.log_path}",
              flush=True)
    config = GatewayConfig(
        model_repository=args.model_repository, triton_url=triton_url, host=args.host, port=args.port,
        metrics_port=args.metrics_port, limits=limits,
    )
    try:
        exit_code = asyncio.run(run_gateway(config, triton.is_running if triton else None))
    finally:
        if triton is not None:
            triton.stop()
    if exit_code:
        raise SystemExit(f"flowserve serve: Triton exited; see {triton.log_path}")


def cmd_sample(args) -> None:
    from flowserve.server.client import FlowClient

    with FlowClient(args.target, timeout=args.timeout) as client:
        result = client.sample(args.model, args.num_samples, seed=args.seed, temperature=args.temperature,
                               context=args.context)
    print(f"{len(result.x)} samples from {args.model} (seed {result.seed}); "
          f"mean log p(x) {result.log_prob.mean():.4f}")
    print(np.array2string(result.x[:5], precision=4))
    if args.output:
        np.save(args.output, result.x)
        print(f"wrote {args.output}")


def cmd_score(args) -> None:
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


def cmd_models(args) -> None:
    from flowserve.server.client import FlowClient
    from flowserve.server.proto import flowserve_pb2 as pb

    with FlowClient(args.target, timeout=args.timeout) as client:
        for m in client.list_models():
            directions = ", ".join(pb.Direction.Name(d).removeprefix("DIRECTION_").lower() for d in m.directions)
            context = f", context shape {list(m.context_shape)}" if m.context_shape else ""
            kind = "lower bound" if m.log_likelihood_kind == pb.LOG_LIKELIHOOD_KIND_LOWER_BOUND else "exact"
            print(f"{m.name}: {m.family}, event shape {list(m.event_shape)}{context}, directions [{directions}], "
                  f"log-likelihood {kind}, versions {list(m.versions)}, ready {m.ready}, "
                  f"held-out log-lik {m.metadata.get('metrics.test_log_likelihood', '?')}")


def cmd_demo(args) -> None:
    """Train, export, serve on free ports, sample and score through the gateway, then stop."""
    from flowserve.export.data import two_moons
    from flowserve.server.app import Gateway, GatewayConfig
    from flowserve.server.launcher import TritonServer, free_port

    checkpoint = Path("checkpoints") / "realnvp-moons.pt"
    print("== 1/4 train RealNVP on two moons")
    cmd_train(build_parser().parse_args(["train", "--steps", str(args.steps), "-o", str(checkpoint)]))
    print("== 2/4 export both directions to ONNX + Triton configs")
    meta = cmd_export(build_parser().parse_args(
        ["export", str(checkpoint), "--model-repository", str(args.model_repository)]))
    print("== 3/4 start Triton and the gateway")
    with tempfile.TemporaryDirectory(prefix="flowserve-demo-") as workdir, \
            TritonServer(args.model_repository, Path(workdir)) as triton:
        print(f"Triton ready on {triton.grpc_url}")
        config = GatewayConfig(args.model_repository, triton.grpc_url, host="127.0.0.1", port=0,
                               metrics_port=free_port())

        async def run() -> None:
            async with Gateway(config) as gateway:
                await asyncio.to_thread(_demo_calls, f"127.0.0.1:{gateway.port}", meta["name"],
                                        two_moons(5, noise=0.05, seed=123))

        asyncio.run(run())
    print("== done: gateway and Triton stopped")


def _demo_calls(target: str, model: str, points: np.ndarray) -> None:
    from flowserve.server.client import FlowClient

    print(f"== 4/4 call the gateway at {target}")
    with FlowClient(target) as client:
        for m in client.list_models():
            print(f"model {m.name}: family {m.family}, event shape {list(m.event_shape)}, ready {m.ready}")
        result = client.sample(model, 1000, seed=0)
        print(f"Sample: 1000 draws (seed {result.seed}), mean {np.round(result.x.mean(0), 3)}, "
              f"mean log p(x) {result.log_prob.mean():.3f}; first rows:")
        print(np.array2string(result.x[:3], precision=4))
        scores = client.log_likelihood(model, points)
        print("LogLikelihood of two-moons points and of far-away points:")
        for row, lp in zip(points, scores):
            print(f"  x = {np.array2string(row, precision=3)}  log p(x) = {lp:.4f}")
        far = np.array([[4.0, 4.0], [-4.0, -3.0]], dtype=np.float32)
        for row, lp in zip(far, client.log_likelihood(model, far)):
            print(f"  x = {np.array2string(row, precision=3)}  log p(x) = {lp:.4f}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = globals()[f"cmd_{args.command}"]
    try:
        handler(args)
    except KeyboardInterrupt:
        return 130
    except grpc.RpcError as exc:
        print(f"flowserve {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as exc:  # files, ports, parity, launch and input errors
        print(f"flowserve {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``flowserve`` command line: every command's options, in one parser.

Building it imports neither torch nor scikit-learn, so client commands start in a fraction
of a second: the families and data sets come from registries that are plain names.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

DEFAULT_REPOSITORY = Path("model_repository")
DEFAULT_PORT = 8500
DEFAULT_METRICS_PORT = 8502
DEFAULT_HTTP_PORT = 8501
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
TRITON_URL_ENV = "FLOWSERVE_TRITON_URL"
TOKENS_FILE_ENV = "FLOWSERVE_TOKENS_FILE"
TOKENS_ENV = "FLOWSERVE_TOKENS"
TOKEN_FILE_ENV = "FLOWSERVE_TOKEN_FILE"
TOKEN_ENV = "FLOWSERVE_TOKEN"


def _path_from_env(name: str) -> Path | None:
    return Path(os.environ[name]) if os.environ.get(name) else None


def _float_list(text: str) -> np.ndarray:
    try:
        return np.array([float(value) for value in text.split(",")], dtype=np.float32)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _embedding(text: str) -> dict:
    """``E`` or ``E:H1,H2,...`` as a context_embedding config."""
    features, _, hidden = text.partition(":")
    try:
        config = {"features": int(features)}
        if hidden:
            config["hidden_features"] = [int(width) for width in hidden.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected E or E:H1,H2,... (integers), got {text!r}") from None
    return config


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=os.environ.get("FLOWSERVE_TARGET", DEFAULT_TARGET),
                        help="gateway host:port (env FLOWSERVE_TARGET)")
    parser.add_argument("--timeout", type=float, default=60.0, help="RPC deadline in seconds")
    security = parser.add_argument_group("TLS and token")
    security.add_argument("--tls", action="store_true",
                          help="connect over TLS, trusting gRPC's default roots: the public CAs that grpcio bundles, "
                               "or those of the file in env GRPC_DEFAULT_SSL_ROOTS_FILE_PATH (any other --tls-* "
                               "option implies TLS)")
    security.add_argument("--tls-ca", type=Path, metavar="PEM", help="connect over TLS, trusting the CAs in this file")
    security.add_argument("--tls-cert", type=Path, metavar="PEM",
                          help="mutual TLS: present this client certificate (with --tls-key)")
    security.add_argument("--tls-key", type=Path, metavar="PEM", help="the unencrypted private key of --tls-cert")
    security.add_argument("--tls-server-name", metavar="NAME",
                          help="the name the gateway's certificate must carry (default: the host of --target)")
    security.add_argument("--token-file", type=Path, default=_path_from_env(TOKEN_FILE_ENV), metavar="FILE",
                          help=f"send the bearer token in FILE (one line; env {TOKEN_FILE_ENV}); without it, the "
                               f"token of env {TOKEN_ENV}, if set")


def _add_listen(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)


def _add_ready_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for Triton")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``flowserve`` command."""
    from flowserve.export.data import DATASETS
    from flowserve.export.flows.registry import FAMILY_NAMES

    parser = argparse.ArgumentParser(
        prog="flowserve", description="Train, export and serve normalizing flows: train, export, quality, plot "
                                      "(need the 'export' extra); doctor, serve; sample, score, encode, models; demo.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a flow on a built-in data set or a .npy/.csv file")
    train.add_argument("--family", default="realnvp", choices=FAMILY_NAMES)
    source = train.add_mutually_exclusive_group()
    source.add_argument("--dataset", default=None, choices=list(DATASETS), help="built-in data set (default moons)")
    source.add_argument("--data", type=Path, metavar="FILE",
                        help="user data: a .npy file or a comma-separated .csv (optional header row) of [N, D]")
    train.add_argument("--num-points", type=int, default=None,
                       help="data set size before the held-out split (default: 4000 for 2-D toys, all rows "
                            "otherwise)")
    train.add_argument("--steps", type=int, default=2000,
                       help="the most training steps (early stopping may end sooner)")
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                       help="cosine: anneal the rate to zero over --steps")
    train.add_argument("--weight-decay", type=float, default=0.0, help="Adam's weight decay")
    train.add_argument("--clip-grad-norm", type=float, default=10.0, help="bound on the gradient's norm (0: none)")
    train.add_argument("--validation-fraction", type=float, default=0.1,
                       help="training rows held back to choose the weights by (never the held-out rows; 0: none, "
                            "all steps run and the last weights are kept)")
    train.add_argument("--eval-every", type=int, default=50, help="steps between validation scores")
    train.add_argument("--patience", type=int, default=10,
                       help="stop after this many validation scores without improvement (0: never early)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--context-embedding", type=_embedding, default=None, metavar="E[:H1,H2,...]",
                       help="conditional data: an MLP (hidden widths H, default 256,256) maps the context to E "
                            "values that the flow's networks take; exported apart, it runs once per context")
    train.add_argument("-o", "--output", type=Path, default=None,
                       help="checkpoint path (default checkpoints/<family>-<dataset>.pt)")

    export = commands.add_parser(
        "export", help="export a checkpoint of flowserve train, or a flow you built (--module), into a Triton "
                       "model repository")
    export.add_argument("checkpoint", type=Path, nargs="?", help="a checkpoint of flowserve train")
    export.add_argument("--module", metavar="FILE.py:FUNCTION",
                        help="instead of a checkpoint: a function that returns your flow (a zuko flow, or a module "
                             "following flowserve's protocol; see docs/byo.md)")
    export.add_argument("--weights", type=Path, help="with --module: the flow's state dict (torch.save)")
    export.add_argument("--data", type=Path, metavar="FILE",
                        help="with --module: held-out rows [N, D] (.npy or .csv) for the parity check")
    export.add_argument("--context", type=Path, metavar="FILE",
                        help="with --module: one context row per --data row, for a conditional flow")
    export.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    export.add_argument("--name", help="flow name (default <family>-<dataset>, or the --module file's name)")
    export.add_argument("--version", type=int, default=1)
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx",
                        help="model file: model.onnx or model.pt (TorchScript)")
    export.add_argument("--backend", choices=["python", "onnxruntime", "pytorch"], default="python",
                        help="python: flowserve's runner for either format (works with the pytriton wheel); "
                             "onnxruntime / pytorch: Triton's native backends for onnx / torchscript "
                             "(NGC images, GPU clusters)")
    export.add_argument("--max-batch-size", type=int, default=4096, help="largest batch Triton runs in one call")
    export.add_argument("--queue-delay-us", type=int, default=0,
                        help="dynamic batcher max queue delay (default 0: the gateway merges concurrent requests "
                             "itself, and Triton batches what queues while an instance is busy)")
    export.add_argument("--dynamic-batching", action=argparse.BooleanOptionalAction, default=True,
                        help="let Triton and the gateway merge concurrent requests into one batch; "
                             "--no-dynamic-batching runs each request on its own")
    export.add_argument("--max-queue-size", type=int, default=0,
                        help="requests that may wait for the model's instances: the gateway lets as many full "
                             "batches' rows wait and answers RESOURCE_EXHAUSTED beyond (default 0: 32 per instance)")
    export.add_argument("--queue-timeout-ms", type=int, default=2000,
                        help="the gateway refuses a call that would wait longer than this for its batch, or that "
                             "did (0: no limit)")
    export.add_argument("--triton-queue-policy", action="store_true",
                        help="also set both bounds as the queue policy of Triton's dynamic batcher (off by default: "
                             "on Triton 2.51 it holds lone requests for up to 500 ms; see docs/performance.md)")
    export.add_argument("--instances", type=int, default=1, help="instances per instance group")
    export.add_argument("--instance-kind", choices=["cpu", "gpu"], default="cpu")
    export.add_argument("--gpus", default="", help="comma-separated GPU ids for --instance-kind gpu")
    export.add_argument("--intra-op-threads", type=int, default=0,
                        help="threads per instance (default 0: the cores Triton's process may use, divided by "
                             "--instances, when the model loads)")
    export.add_argument("--cached-inverse", type=int, nargs="?", const=256, default=None, metavar="MIN_BATCH",
                        help="MAF/IAF in ONNX: compute batches of MIN_BATCH (default 256) rows or more of the "
                             "slow direction with the cached inverse (see docs/flows.md); exports take longer")
    export.add_argument("--encode", action=argparse.BooleanOptionalAction, default=True,
                        help="also export x -> z (the Encode RPC) for flows: one more Triton model per flow, with its "
                             "own stub process (and CUDA context on a GPU)")
    export.add_argument("--support-low", type=_float_list, default=None, metavar="V1,V2,...",
                        help="the support box's lower bound per data value (-inf: open), for sampling truncated to "
                             "it (default: an sbi posterior's box prior, else no box); write --support-low=-1,... "
                             "when the first value is negative")
    export.add_argument("--support-high", type=_float_list, default=None, metavar="V1,V2,...",
                        help="the support box's upper bound per data value (inf: open)")
    export.add_argument("--separate-embedding", action=argparse.BooleanOptionalAction, default=True,
                        help="export a flow's context embedding as a model apart (<flow>-embed), which the gateway "
                             "runs once for each distinct context of a call instead of once per row")
    export.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="TorchScript on GPU instances (python backend): capture CUDA graphs for batches of 1, 4, "
                             "16, ... up to --max-batch-size rows, for each direction that can be captured")

    serve = commands.add_parser("serve", help="start Triton (unless --triton-url) and the gateway")
    serve.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    _add_listen(serve)
    serve.add_argument("--triton-url", default=os.environ.get(TRITON_URL_ENV),
                       help=f"use this external Triton (host:port of its gRPC API) instead of starting one "
                            f"(env {TRITON_URL_ENV})")
    serve.add_argument("--triton-grpc-port", type=int, default=0, help="embedded Triton's gRPC port (0: free)")
    serve.add_argument("--triton-metrics-port", type=int, default=0, help="embedded Triton's metrics port")
    serve.add_argument("--workdir", type=Path, default=None,
                       help="embedded Triton's backend directory and log (default: a temporary directory)")
    serve.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                       help="the HTTP/JSON API's port (and its OpenAPI description at /openapi.json, a page at /), "
                            "beside gRPC on the same event loop")
    serve.add_argument("--no-http", action="store_true", help="serve gRPC only, without the HTTP API")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="let browser pages of ORIGIN (e.g. https://app.example.com, or *) call the HTTP API; "
                            "repeatable; none by default")
    serve.add_argument("--workers", type=int, default=1,
                       help="gateway processes sharing the gRPC port (SO_REUSEPORT), each with its own event loop; "
                            "the kernel spreads client connections over them, and the limits below hold per worker. "
                            "The metrics port reports their sums")
    serve.add_argument("--max-rows-per-request", type=int, default=100_000)
    serve.add_argument("--max-rows-in-flight", type=int, default=1_000_000)
    serve.add_argument("--max-rows-per-stream", type=int, default=10**9,
                       help="SampleStream's limit; a stream holds only a few chunks in the gateway at a time")
    serve.add_argument("--max-concurrent-rpcs", type=int, default=0,
                       help="Sample, SampleStream, LogLikelihood and ListModels calls the gateway runs at once; "
                            "more are refused with RESOURCE_EXHAUSTED and counted (0: no limit)")
    _add_ready_timeout(serve)
    serve.add_argument("--triton-max-restarts", type=int, default=5,
                       help="restarts of a dying embedded Triton (backoff 0.5 s doubling to 8 s) before serve "
                            "exits with code 1; the count starts again after 60 s up")
    security = serve.add_argument_group("TLS and tokens of the gRPC and HTTP ports (the metrics port stays plaintext)")
    security.add_argument("--tls-cert", type=Path, metavar="PEM",
                          help="serve gRPC and HTTP over TLS with this certificate chain (with --tls-key)")
    security.add_argument("--tls-key", type=Path, metavar="PEM", help="the unencrypted private key of --tls-cert")
    security.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                          help="mutual TLS: accept only clients with a certificate that these CAs signed")
    security.add_argument("--tokens-file", type=Path, default=_path_from_env(TOKENS_FILE_ENV), metavar="FILE",
                          help=f"require a bearer token on every call but health: the accepted tokens, one a line, "
                               f"'#' comments (env {TOKENS_FILE_ENV}); env {TOKENS_ENV} adds tokens separated by "
                               f"commas or spaces")

    sample = commands.add_parser("sample", help="draw samples from a served flow")
    _add_target(sample)
    sample.add_argument("--model", required=True)
    sample.add_argument("-n", "--num-samples", type=int, default=1000)
    sample.add_argument("--seed", type=int, default=None)
    sample.add_argument("--temperature", type=float, default=None)
    contexts = sample.add_mutually_exclusive_group()
    contexts.add_argument("--context", type=_float_list, default=None, metavar="V1,V2,...",
                          help="one context for every sample, e.g. a one-hot label: 0,0,1,0,0,0,0,0,0,0")
    contexts.add_argument("--context-file", type=Path, default=None, metavar="C.npy",
                          help="contexts from a .npy file: one per sample, or B of them with --per-context")
    sample.add_argument("--per-context", type=int, default=None, metavar="N",
                        help="N samples for each context (B x N in all; -n is then ignored): "
                             "the output is [B, N, *event_shape]")
    sample.add_argument("--stream", action="store_true",
                        help="SampleStream: any number of samples, in chunks, written to --output as they come "
                             "(raise --timeout for very many)")
    sample.add_argument("--truncate", action="store_true",
                        help="only samples inside the flow's support box (e.g. an sbi prior's), drawn again until "
                             "inside; prints the acceptance rate")
    sample.add_argument("--max-draws", type=int, default=None, metavar="N",
                        help="with --truncate: the most draws in all (default: the gateway's bound, 100 per sample)")
    sample.add_argument("-o", "--output", type=Path, help="write samples to this .npy file")

    score = commands.add_parser("score", help="log-likelihood of each row of a .npy file")
    _add_target(score)
    score.add_argument("--model", required=True)
    score.add_argument("data", type=Path, help=".npy file of shape [N, *event_shape]")
    score.add_argument("--context", type=Path, default=None, metavar="FILE.npy",
                       help="contexts, [N, *context_shape] or one row for all")
    score.add_argument("--bits-per-dim", action="store_true", help="also report bits/dim")
    score.add_argument("--truncate", action="store_true", help="-inf for rows outside the flow's support box")
    score.add_argument("-o", "--output", type=Path, help="write log-likelihoods to this .npy file")

    encode = commands.add_parser("encode", help="the base noise z of each row of a .npy file (x -> z), with "
                                                "log|det dz/dx| and log p(x)")
    _add_target(encode)
    encode.add_argument("--model", required=True)
    encode.add_argument("data", type=Path, help=".npy file of shape [N, *event_shape]")
    encode.add_argument("--context", type=Path, default=None, metavar="FILE.npy",
                        help="contexts, [N, *context_shape] or one row for all")
    encode.add_argument("-o", "--output", type=Path,
                        help="write z, log_det and log_prob to this .npz file")

    models = commands.add_parser("models", help="list the gateway's models")
    _add_target(models)

    health = commands.add_parser("health", help="print the gateway's health; exit code 0 when SERVING (for probes)")
    _add_target(health)
    health.add_argument("--model", help="one flow's health (its Triton models answer) instead of the whole server's")

    doctor = commands.add_parser(
        "doctor", help="check that this machine can serve a model repository: Python, numpy, torch, ONNX Runtime, "
                       "GPUs, Triton and its Python stub, ports, and each flow; exit code 1 on any blocking problem")
    doctor.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    _add_listen(doctor)
    _add_ready_timeout(doctor)
    doctor.add_argument("--skip-triton", action="store_true",
                        help="do not start Triton to test its Python stub (a few seconds)")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")

    demo = commands.add_parser("demo", help="train and export RealNVP on two moons, serve it, sample and score")
    demo.add_argument("--steps", type=int, default=1500)
    demo.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)

    quality = commands.add_parser(
        "quality", help="train every flow family with one recipe on moons, 8gaussians, checkerboard, breast-cancer "
                        "and digits, beside anchors chosen on validation rows (GaussianMixture, KDE, zuko's NSF); "
                        "write test log-likelihoods with standard errors (long: about 12 minutes on 2 cores)")
    quality.add_argument("--output", type=Path, default=None,
                         help="Markdown report (default docs/quality.md); the JSON goes beside it")
    quality.add_argument("--families", default=None, help="comma-separated families (default: all)")
    quality.add_argument("--datasets", default=None,
                         help="comma-separated built-in data sets (default: moons,8gaussians,checkerboard,"
                              "breast-cancer,digits)")
    quality.add_argument("--steps-scale", type=float, default=None,
                         help="multiply the recipe's most training steps (default 1; e.g. 0.01 for a smoke test)")
    quality.add_argument("--seed", type=int, default=None, help="data, initialisation and batches (default 0)")

    plot = commands.add_parser("plot", help="plot a checkpoint: samples and density (2-D) or sample grid (images)")
    plot.add_argument("checkpoint", type=Path)
    plot.add_argument("-o", "--output", type=Path, default=None,
                      help="PNG file (default: the checkpoint path with .png)")
    plot.add_argument("-n", "--num-samples", type=int, default=None,
                      help="samples to draw (default 2000 for 2-D flows, 64 per image grid, 10 per class)")
    plot.add_argument("--seed", type=int, default=0)
    return parser

"""The ``flowserve`` command: build (train, export, quality, plot), doctor, serve, query
(sample, score, encode, models, health) and demo. The commands import what they need (torch, the gateway) when
they run; the parser reads only the torch-free name registries of ``flowserve.export``,
so ``flowserve --help`` and the client commands start fast and work without the extra."""

from __future__ import annotations

import logging
import sys

import grpc

from . import build, demo, doctor, query, serve
from .parser import build_parser

COMMANDS = {
    "train": build.train_command,
    "export": build.export_command,
    "quality": build.quality_command,
    "plot": build.plot_command,
    "doctor": doctor.doctor_command,
    "serve": serve.serve_command,
    "sample": query.sample_command,
    "score": query.score_command,
    "encode": query.encode_command,
    "models": query.models_command,
    "health": query.health_command,
    "demo": demo.demo_command,
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (1 with a message on errors)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except grpc.RpcError as exc:
        print(f"flowserve {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as exc:  # files, ports, parity, launch, input, missing extra
        print(f"flowserve {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0

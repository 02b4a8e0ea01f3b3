"""``flowserve serve``: the gateway, in front of an embedded Triton or an external one."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from .parser import TOKENS_ENV


def serve_command(args) -> None:
    from flowserve.server.gateway.app import GatewayConfig, run_event_loop, run_gateway
    from flowserve.server.gateway.auth import accepted_tokens
    from flowserve.server.gateway.metrics import GatewayMetrics
    from flowserve.server.gateway.service import GatewayLimits
    from flowserve.server.gateway.tls import ServerTLS
    from flowserve.server.gateway.workers import check_ports_free, run_pool
    from flowserve.server.triton.launcher import TritonServer, TritonSupervisor

    if not args.model_repository.is_dir():
        raise FileNotFoundError(f"model repository {args.model_repository} does not exist; run flowserve export first")
    tls = ServerTLS.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
    tokens = accepted_tokens(args.tokens_file, os.environ.get(TOKENS_ENV), f"env {TOKENS_ENV}")
    limits = GatewayLimits(args.max_rows_per_request, args.max_rows_in_flight,
                           max_rows_per_stream=args.max_rows_per_stream)
    if args.workers < 1:
        raise ValueError(f"--workers must be 1 or more, not {args.workers}")
    config = GatewayConfig(
        model_repository=args.model_repository, triton_url="", host=args.host, port=args.port,
        metrics_port=args.metrics_port, limits=limits, max_concurrent_rpcs=args.max_concurrent_rpcs or None, tls=tls,
        tokens=tokens, http_port=None if args.no_http else args.http_port, cors_origins=frozenset(args.cors_origin),
    )
    if args.workers > 1:  # before Triton starts: a taken port is the commonest mistake
        check_ports_free(config)
    triton = None
    triton_url = args.triton_url
    if not triton_url:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="flowserve-triton-"))
        triton = TritonServer(args.model_repository, workdir, args.triton_grpc_port, args.triton_metrics_port)
        triton.start(ready_timeout=args.ready_timeout)
        triton_url = triton.grpc_url
        print(f"Triton ready: gRPC {triton.grpc_url}, metrics {triton.metrics_url}, log {triton.log_path}",
              flush=True)
        for model, reason in sorted(triton.failed_models.items()):
            print(f"flowserve serve: model {model!r} failed to load and is not served: {reason}",
                  file=sys.stderr, flush=True)
    config = replace(config, triton_url=triton_url, load_changes=triton is not None)
    try:
        supervisor = None if triton is None else TritonSupervisor(
            triton, max_restarts=args.triton_max_restarts, ready_timeout=args.ready_timeout)
        if args.workers > 1:
            exit_code = run_event_loop(run_pool(config, args.workers, supervisor.watch if supervisor else None))
        else:
            metrics = GatewayMetrics()
            watch = (lambda: supervisor.watch(metrics.triton_restarts.inc)) if supervisor else None
            exit_code = run_event_loop(run_gateway(config, metrics, watch))
    finally:
        if triton is not None:
            triton.stop()
    if exit_code:
        raise SystemExit(f"flowserve serve: Triton exited and was not restarted (--triton-max-restarts "
                         f"{args.triton_max_restarts}); see {triton.log_path}")

"""``flowserve demo``: train and export RealNVP on two moons, serve it, sample and score."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import numpy as np

from .build import export, require_export_extra, show_progress, train


def demo_command(args) -> None:
    """Train, export, serve on free ports, sample and score through the gateway, then stop."""
    require_export_extra("demo")
    from flowserve.export.data import two_moons
    from flowserve.server.gateway.app import Gateway, GatewayConfig
    from flowserve.server.gateway.triton_backend import TritonBackend
    from flowserve.server.triton.launcher import TritonServer, free_port

    print("== 1/4 train RealNVP on two moons")
    progress = show_progress(args)
    checkpoint = train("realnvp", "moons", steps=args.steps, output=Path("checkpoints") / "realnvp-moons.pt",
                       progress=progress)
    print("== 2/4 export both directions to ONNX + Triton configs")
    meta = export(checkpoint, args.model_repository, progress=progress)
    print("== 3/4 start Triton and the gateway")
    with tempfile.TemporaryDirectory(prefix="flowserve-demo-") as workdir, \
            TritonServer(args.model_repository, Path(workdir)) as triton:
        print(f"Triton ready on {triton.grpc_url}")
        config = GatewayConfig(args.model_repository, triton.grpc_url, host="127.0.0.1", port=0,
                               metrics_port=free_port())

        async def run() -> None:
            async with Gateway(config, TritonBackend(config.triton_url)) as gateway:
                await asyncio.to_thread(_calls, f"127.0.0.1:{gateway.port}", meta.name,
                                        two_moons(5, noise=0.05, seed=123))

        asyncio.run(run())
    print("== done: gateway and Triton stopped")


def _calls(target: str, model: str, points: np.ndarray) -> None:
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

"""normflows flows trained, exported with ``flowserve export --module`` and served on a real
Triton with normflows' own numbers (float64 reference); their sequential directions are ONNX
loops, counted."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from helpers import normflows_flows
from helpers.processes import start_serve, stop_serve, wait_for_health

from flowserve.contract.metadata import FlowMetadata, metadata_path
from flowserve.export.adapters.builder import wrap
from flowserve.export.data import digits, two_moons
from flowserve.server.client import FlowClient

pytestmark = pytest.mark.filterwarnings("ignore:torch.lu is deprecated:UserWarning")  # normflows' Invertible1x1Conv

# name: (function in normflows_flows.py, context values, loops in the density and generation graphs)
LIVE_FLOWS = {
    "realnvp": ("realnvp", 0, (0, 0)),
    "glow": ("glow", 0, (0, 0)),
    "maf": ("maf", 0, (3, 0)),  # normflows' MAF samples in one pass and inverts for densities
    "coupled-spline": ("coupled_spline", 0, (0, 0)),
    "autoregressive-spline": ("autoregressive_spline_conditional", 1, (0, 2)),
}
ROWS = 300


def training_data() -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Rows (and contexts) for each live flow: two moons, which moon as the context, and
    dequantized 8x8 digits (flattened, as a user's .npy holds them) for Glow."""
    moons = two_moons(2000, seed=0)
    sides = (moons[:, :1] > 0.5).astype(np.float32)
    images = digits()[0].reshape(-1, 64)
    noise = np.random.Generator(np.random.PCG64(1)).uniform(size=images.shape).astype(np.float32)
    dequantized = (images + noise) / 17 - 0.5
    return {name: (dequantized if name == "glow" else moons, sides if context else None)
            for name, (_, context, _) in LIVE_FLOWS.items()}


def train(model, rows: np.ndarray, context: np.ndarray | None, steps: int = 150) -> None:
    """Maximum likelihood with Adam through the adapter, which runs normflows' own code."""
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = torch.from_numpy(rows).reshape(len(rows), *model.event_shape)
    for _ in range(steps):
        index = torch.randint(len(x), (128,))
        loss = -model.log_prob(x[index], None if context is None else torch.from_numpy(context[index])).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_trained_normflows_flows_are_served_with_normflows_numbers(tmp_path):
    """A RealNVP, a Glow on digits, a MAF, a coupled and a conditional autoregressive spline
    flow: trained, exported through the CLI from normflows_flows.py and their weights,
    served together; log p and samples from the served noise against normflows in float64."""
    from flowserve import cli

    data = training_data()
    models = {}
    for name, (function, context, loops) in LIVE_FLOWS.items():
        rows, contexts = data[name]
        torch.manual_seed(0)
        model = wrap(getattr(normflows_flows, function)(), rows.shape[1], context)
        train(model, rows, contexts)
        torch.save(model.flow.state_dict(), tmp_path / f"{name}.pt")
        np.save(tmp_path / f"{name}-heldout.npy", rows[-200:])
        extra = []
        if contexts is not None:
            np.save(tmp_path / f"{name}-context.npy", contexts[-200:])
            extra = ["--context", str(tmp_path / f"{name}-context.npy")]
        code = cli.main(["export", "--module", f"{normflows_flows.__file__}:{function}", "--weights",
                         str(tmp_path / f"{name}.pt"), "--data", str(tmp_path / f"{name}-heldout.npy"), *extra,
                         "--name", name, "--model-repository", str(tmp_path / "repository")])
        assert code == 0, name
        meta = FlowMetadata.read(metadata_path(tmp_path / "repository", name))
        assert (meta.graphs["density"]["loops"], meta.graphs["generation"]["loops"]) == loops, name
        assert meta.family == "normflows" and max(meta.parity_max_diff.values()) <= 1e-4, name
        models[name] = model

    served = {}
    process, port, _ = start_serve(tmp_path / "repository", tmp_path / "serve")
    try:
        wait_for_health(f"127.0.0.1:{port}", process, health_pb2.HealthCheckResponse.SERVING)
        with FlowClient(f"127.0.0.1:{port}") as client:
            assert {m.name: m.family for m in client.list_models()} == dict.fromkeys(LIVE_FLOWS, "normflows")
            for name, (rows, contexts) in data.items():
                one_side = None if contexts is None else np.ones(1, np.float32)
                x = rows[:ROWS].reshape(ROWS, *models[name].event_shape)
                served[name] = (client.log_likelihood(name, x, None if contexts is None else contexts[:ROWS]),
                                client.sample(name, ROWS, seed=5, context=one_side))
    finally:
        assert stop_serve(process) == 0

    for name, (rows, contexts) in data.items():
        log_prob, samples = served[name]
        flow = copy.deepcopy(models[name].flow).double()
        x = torch.from_numpy(rows[:ROWS]).double().reshape(ROWS, *models[name].event_shape)
        context = None if contexts is None else torch.ones(ROWS, 1, dtype=torch.float64)
        noise = np.random.Generator(np.random.PCG64(5)).standard_normal((ROWS, rows.shape[1]), dtype=np.float32)
        with torch.no_grad():
            expected = normflows_flows.library_log_prob(flow, x, None if contexts is None else
                                                        torch.from_numpy(contexts[:ROWS]).double())
            expected_x, expected_sample_log_prob = normflows_flows.library_generation(
                flow, torch.from_numpy(noise).double(), context)
        np.testing.assert_allclose(log_prob, expected.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(samples.x, expected_x.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(samples.log_prob, expected_sample_log_prob.numpy(), rtol=1e-4, atol=1e-4,
                                   err_msg=name)

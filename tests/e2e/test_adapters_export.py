"""zuko and nflows flows exported and served: autoregressive inverses export as loops (not
one copy per dimension), and trained flows are served with their library's own numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zuko
from grpc_health.v1 import health_pb2
from helpers import library_adapters, library_flows
from helpers.processes import start_serve, stop_serve, wait_for_health

from flowserve.contract.metadata import FlowMetadata, metadata_path
from flowserve.contract.spec import triton_model_name
from flowserve.export.adapters.builder import wrap
from flowserve.export.adapters.nflows import NflowsFlow
from flowserve.export.adapters.zuko import ZukoFlow
from flowserve.export.data import two_moons
from flowserve.export.exporter.formats import export_onnx, graph_stats, load_exported
from flowserve.export.exporter.pipeline import export_model
from flowserve.server.client import FlowClient


# name: (builder, features, context, autoregressive transforms)
@pytest.mark.parametrize("name", ["realnvp"])  # the autoregressive ones are exported in the live test below
def test_zuko_flows_export_with_their_inverse_as_a_loop(name, tmp_path):
    model = library_adapters.perturbed(name)
    rows, context = library_adapters.inputs(model, 64, seed=3)
    meta = export_model(model, tmp_path, name=name, example_data=rows.numpy(),
                        example_context=None if context is None else context.numpy())
    assert max(meta.parity_max_diff.values()) <= 1e-4 and meta.family == "zuko"
    autoregressive = library_adapters.ZUKO_FLOWS[name][3]
    assert meta.graphs["generation"]["loops"] == autoregressive and meta.graphs["density"]["loops"] == 0


@pytest.mark.parametrize(("build", "budget"), [(zuko.flows.MAF, 200), (zuko.flows.NSF, 900)], ids=["maf", "nsf"])
def test_a_64_dimensional_zuko_flow_generates_through_three_loops_not_64_copies(build, budget):
    torch.manual_seed(0)
    model = ZukoFlow(build(64, transforms=3), 64).eval()
    stats = graph_stats("onnx", export_onnx(model, "generation"))
    assert stats["loops"] == 3 and stats["nodes"] < budget  # 140 and 712 here; unrolled, 3 x 64 passes


# name: (builder, context, autoregressive layers)
@pytest.mark.parametrize("name", ["spline-coupling"])  # the MAF is exported in the live test
def test_nflows_flows_export_with_their_inverse_as_a_loop(name, tmp_path):
    model = library_adapters.perturbed_nflows(name)
    rows, context = library_adapters.inputs(model, 64, seed=3)
    meta = export_model(model, tmp_path, name=name, example_data=3 * rows.numpy(),
                        example_context=None if context is None else context.numpy())
    assert max(meta.parity_max_diff.values()) <= 1e-4 and meta.family == "nflows"
    assert meta.graphs["generation"]["loops"] == library_adapters.NFLOWS_FLOWS[name][2]
    assert meta.graphs["density"]["loops"] == 0


def test_a_64_dimensional_nflows_maf_generates_through_three_loops_not_64_copies():
    torch.manual_seed(0)
    model = NflowsFlow(library_flows.nflows_maf(64).eval())
    stats = graph_stats("onnx", export_onnx(model, "generation"))
    assert stats["loops"] == 3 and stats["nodes"] < 250


def train(model, rows: np.ndarray, context: np.ndarray | None, steps: int = 300) -> None:
    """Maximum likelihood with Adam; the adapter's log_prob is the library's (tested above)."""
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(rows)
    c = None if context is None else torch.from_numpy(context)
    for _ in range(steps):
        index = torch.randint(len(x), (128,))
        loss = -model.log_prob(x[index], None if c is None else c[index]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


# name: (function in library_flows.py, takes a context, autoregressive layers)
LIVE_FLOWS = {
    "zuko-maf": ("zuko_maf", False, 3),
    "zuko-nsf-coupling": ("zuko_nsf_coupling", False, 2),
    "zuko-nsf-conditional": ("zuko_nsf_conditional", True, 2),
    "nflows-maf": ("nflows_maf", False, 3),
    "nflows-spline-coupling": ("nflows_spline_coupling", False, 0),
    "nflows-maf-embedded": ("nflows_maf_embedded", True, 3),
}
EMBEDDED = {"nflows-maf-embedded"}  # with an embedding net, served apart as <flow>-embed
# A flow also exported through export_model, whose graphs must equal the CLI's (the path
# after the builder is the same for every library; an export takes 7 to 14 s here).
SAME_GRAPHS_FROM_THE_API = ("zuko-maf",)


def exported_outputs(repository, name: str, x: np.ndarray, z: np.ndarray):
    """What the two ONNX graphs of the unconditional flow ``name`` in ``repository`` compute
    at ``x`` and ``z``."""
    runs = []
    for direction, points in (("density", x), ("generation", z)):
        graph = (repository / triton_model_name(name, direction) / "1" / "model.onnx").read_bytes()
        runs += load_exported("onnx", graph)(points)
    return runs


def test_trained_zuko_and_nflows_flows_are_served_with_their_librarys_numbers(tmp_path):
    """Six flows trained on moons for 200 steps, each exported through the CLI (from
    library_flows.py and its saved weights); for one of them, the Python API gives the same
    graphs. Triton and the gateway serve the CLI's. Two flows take a context
    (which moon), one of them through an embedding net."""
    from flowserve import cli

    rows = two_moons(2000, seed=0)
    sides = (rows[:, :1] > 0.5).astype(np.float32)
    np.save(tmp_path / "heldout.npy", rows[-200:])
    np.save(tmp_path / "sides.npy", sides[-200:])
    noise = np.random.Generator(np.random.PCG64(5)).standard_normal((300, 2), dtype=np.float32)
    models = {}
    for name, (function, conditional, autoregressive) in LIVE_FLOWS.items():
        torch.manual_seed(0)
        context = sides if conditional else None
        model = wrap(getattr(library_flows, function)(), 2, int(conditional))
        train(model, rows, context, steps=200)
        torch.save(model.flow.state_dict(), tmp_path / f"{name}.pt")
        code = cli.main(["export", "--module", f"{library_flows.__file__}:{function}",
                         "--weights", str(tmp_path / f"{name}.pt"), "--data", str(tmp_path / "heldout.npy"),
                         *(["--context", str(tmp_path / "sides.npy")] if conditional else []),
                         "--name", name, "--model-repository", str(tmp_path / "cli")])
        assert code == 0, name
        meta = FlowMetadata.read(metadata_path(tmp_path / "cli", name))
        assert meta.graphs["generation"]["loops"] == autoregressive and meta.graphs["density"]["loops"] == 0
        assert ("embed" in meta.models) == (name in EMBEDDED) and meta.embedded_dim == (4 if name in EMBEDDED else None)
        if name in SAME_GRAPHS_FROM_THE_API:
            export_model(model, tmp_path / "api", name=name, example_data=rows[-200:])
            for cli_run, api_run in zip(exported_outputs(tmp_path / "cli", name, rows[:300], noise),
                                        exported_outputs(tmp_path / "api", name, rows[:300], noise), strict=True):
                np.testing.assert_array_equal(cli_run, api_run, err_msg=name)
        models[name] = (model, context)

    served = {}
    process, port, _ = start_serve(tmp_path / "cli", tmp_path / "serve")
    target = f"127.0.0.1:{port}"
    try:
        wait_for_health(target, process, health_pb2.HealthCheckResponse.SERVING)
        with FlowClient(target) as client:
            families = {m.name: m.family for m in client.list_models()}
            for name, (_, context) in models.items():
                one_side = None if context is None else np.ones(1, np.float32)
                served[name] = (client.log_likelihood(name, rows[:300], None if context is None else context[:300]),
                                client.sample(name, 300, seed=5, context=one_side),
                                client.encode(name, rows[:300], None if context is None else context[:300]))
            both_sides = np.array([[0.0], [1.0]], np.float32)  # 150 samples of each moon in one call
            per_context = {name: (client.sample(name, seed=6, context=both_sides, samples_per_context=150),
                                  client.sample(name, 300, seed=6, context=np.repeat(both_sides, 150, axis=0)),
                                  list(client.sample_stream(name, seed=6, context=both_sides, samples_per_context=150)))
                           for name in ("zuko-nsf-conditional", "nflows-maf-embedded")}
    finally:
        assert stop_serve(process) == 0
    assert families == {name: name.split("-")[0] for name in LIVE_FLOWS}
    for name, (grouped, repeated, streamed) in per_context.items():
        assert grouped.x.shape == (2, 150, 2) and grouped.log_prob.shape == (2, 150)
        np.testing.assert_array_equal(grouped.x.reshape(300, 2), repeated.x, err_msg=name)  # B x N: bit for bit
        np.testing.assert_array_equal(grouped.log_prob.reshape(300), repeated.log_prob, err_msg=name)
        np.testing.assert_array_equal(np.concatenate([chunk.x for chunk in streamed]), repeated.x, err_msg=name)
        assert np.concatenate([chunk.context_index for chunk in streamed]).tolist() == [0] * 150 + [1] * 150
    with torch.no_grad():
        for name, (model, context) in models.items():
            log_prob, samples, encoded = served[name]
            x_context = None if context is None else torch.from_numpy(context[:300])
            expected = library_adapters.library_log_prob(model, torch.from_numpy(rows[:300]), x_context)
            np.testing.assert_allclose(log_prob, expected.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
            z, log_det = library_adapters.library_encode(model, torch.from_numpy(rows[:300]), x_context)
            np.testing.assert_allclose(encoded.z, z.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(encoded.log_det, log_det.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(encoded.log_prob, log_prob, rtol=0, atol=1e-5, err_msg=name)
            x, expected_log_prob = library_adapters.library_generation(model, torch.from_numpy(noise),
                                                                       None if context is None else torch.ones(300, 1))
            np.testing.assert_allclose(samples.x, x.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(samples.log_prob, expected_log_prob.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)

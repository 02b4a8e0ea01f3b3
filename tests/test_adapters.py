"""Flows trained with zuko and nflows, exported and served: each adapter computes what its
library computes, autoregressive inverses export as loops, and the served numbers equal the
library's own."""

from __future__ import annotations

import library_flows
import numpy as np
import pytest
import torch
import zuko
from conftest import add_weight_noise, start_serve, stop_serve, wait_for_health
from grpc_health.v1 import health_pb2
from library_flows import nflows_maf, nflows_spline_coupling
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow as NflowsBase
from nflows.nn.nets import ResidualNet
from nflows.transforms.base import CompositeTransform
from nflows.transforms.coupling import AffineCouplingTransform

from flowserve.contract.metadata import FlowMetadata, metadata_path
from flowserve.contract.spec import triton_model_name
from flowserve.export.adapters.builder import wrap
from flowserve.export.adapters.nflows import NflowsFlow
from flowserve.export.adapters.zuko import ZukoFlow
from flowserve.export.data import two_moons
from flowserve.export.exporter.formats import export_onnx, graph_stats, load_exported
from flowserve.export.exporter.pipeline import export_model
from flowserve.export.exporter.triton_config import ServingConfig
from flowserve.server.client import FlowClient

# name: (builder, features, context, autoregressive transforms)
ZUKO_FLOWS = {
    "maf": (lambda: zuko.flows.MAF(4, transforms=3), 4, 0, 3),
    "nsf": (lambda: zuko.flows.NSF(4, transforms=2), 4, 0, 2),
    "nsf-coupling": (lambda: zuko.flows.NSF(4, transforms=2, passes=2), 4, 0, 2),
    "nsf-conditional": (lambda: zuko.flows.NSF(4, 3, transforms=2), 4, 3, 2),
    "realnvp": (lambda: zuko.flows.RealNVP(4, transforms=2), 4, 0, 0),
}


def perturbed(name: str) -> ZukoFlow:
    """The zuko flow ``name`` with seeded noise on every weight (zuko starts near the identity)."""
    make, features, context, _ = ZUKO_FLOWS[name]
    torch.manual_seed(0)
    flow = make()
    add_weight_noise(flow)
    return ZukoFlow(flow, features, context).eval()


def inputs(model: ZukoFlow, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(rows, model.context_dim, generator=generator) if model.context_dim else None
    return torch.randn(rows, model.noise_dim, generator=generator), context


def library_log_prob(model, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """log p(x | context) as the model's own library computes it."""
    if isinstance(model, ZukoFlow):
        return model.flow(context).log_prob(x)
    return model.flow.log_prob(x, context)


def library_generation(model, z: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x from base noise z, and log p(x), as the model's own library computes them."""
    if isinstance(model, ZukoFlow):
        distribution = model.flow(context)
        x, ladj = distribution.transform.inv.call_and_ladj(z)
        return x, distribution.base.log_prob(z) - ladj
    embedded = model.flow._embedding_net(context)
    x, logabsdet = model.flow._transform.inverse(z, context=embedded)
    return x, model.flow._distribution.log_prob(z, embedded) - logabsdet


@pytest.mark.parametrize("name", ZUKO_FLOWS)
def test_the_adapter_computes_what_zuko_computes(name):
    model = perturbed(name)
    x, context = inputs(model, 16, seed=1)
    z, _ = inputs(model, 16, seed=2)
    with torch.no_grad():
        assert torch.equal(model.log_prob(x, context), library_log_prob(model, x, context))
        for got, expected in zip(model.sample_with_log_prob(z, context), library_generation(model, z, context)):
            assert torch.equal(got, expected)


def test_the_adapter_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(TypeError, match="expected a zuko.flows.Flow, got Linear"):
        ZukoFlow(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="ZukoFlow exports to onnx only, not torchscript"):
        export_model(perturbed("maf"), tmp_path, name="ts", example_data=np.zeros((4, 4), np.float32),
                     serving=ServingConfig(format="torchscript"))


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["realnvp"])  # the autoregressive ones are exported in the live test below
def test_zuko_flows_export_with_their_inverse_as_a_loop(name, tmp_path):
    model = perturbed(name)
    rows, context = inputs(model, 64, seed=3)
    meta = export_model(model, tmp_path, name=name, example_data=rows.numpy(),
                        example_context=None if context is None else context.numpy())
    assert max(meta.parity_max_diff.values()) <= 1e-4 and meta.family == "zuko"
    autoregressive = ZUKO_FLOWS[name][3]
    assert meta.graphs["generation"]["loops"] == autoregressive and meta.graphs["density"]["loops"] == 0


@pytest.mark.e2e
@pytest.mark.parametrize(("build", "budget"), [(zuko.flows.MAF, 200), (zuko.flows.NSF, 900)], ids=["maf", "nsf"])
def test_a_64_dimensional_zuko_flow_generates_through_three_loops_not_64_copies(build, budget):
    torch.manual_seed(0)
    model = ZukoFlow(build(64, transforms=3), 64).eval()
    stats = graph_stats("onnx", export_onnx(model, "generation"))
    assert stats["loops"] == 3 and stats["nodes"] < budget  # 140 and 712 here; unrolled, 3 x 64 passes


# name: (builder, context, autoregressive layers)
NFLOWS_FLOWS = {
    "maf": (lambda: nflows_maf(4), 0, 3),
    "maf-conditional": (lambda: nflows_maf(4, context=2), 2, 3),
    "spline-coupling": (lambda: nflows_spline_coupling(4), 0, 0),
}


def perturbed_nflows(name: str) -> NflowsFlow:
    make, context, _ = NFLOWS_FLOWS[name]
    torch.manual_seed(0)
    flow = make()
    add_weight_noise(flow)
    return NflowsFlow(flow.eval(), context).eval()


@pytest.mark.parametrize("name", NFLOWS_FLOWS)
def test_the_nflows_adapter_computes_what_nflows_computes(name):
    model = perturbed_nflows(name)
    x, context = inputs(model, 16, seed=1)
    z, _ = inputs(model, 16, seed=2)
    x = 3 * x  # some values beyond the splines' tail bound of 4
    with torch.no_grad():
        assert torch.equal(model.log_prob(x, context), library_log_prob(model, x, context))
        for got, expected in zip(model.sample_with_log_prob(z, context), library_generation(model, z, context)):
            assert torch.equal(got, expected)


def test_the_nflows_adapter_names_a_layer_it_cannot_export():
    mask = (torch.arange(4) % 2).long()
    coupling = AffineCouplingTransform(mask, lambda inputs, outputs: ResidualNet(inputs, outputs, 8))
    with pytest.raises(ValueError, match="nflows transform AffineCouplingTransform cannot be exported"):
        NflowsFlow(NflowsBase(CompositeTransform([coupling]), StandardNormal([4])))
    with pytest.raises(TypeError, match="expected an nflows.flows.Flow"):
        NflowsFlow(torch.nn.Linear(2, 2))


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["spline-coupling"])  # the MAF is exported in the live test
def test_nflows_flows_export_with_their_inverse_as_a_loop(name, tmp_path):
    model = perturbed_nflows(name)
    rows, context = inputs(model, 64, seed=3)
    meta = export_model(model, tmp_path, name=name, example_data=3 * rows.numpy(),
                        example_context=None if context is None else context.numpy())
    assert max(meta.parity_max_diff.values()) <= 1e-4 and meta.family == "nflows"
    assert meta.graphs["generation"]["loops"] == NFLOWS_FLOWS[name][2] and meta.graphs["density"]["loops"] == 0


@pytest.mark.e2e
def test_a_64_dimensional_nflows_maf_generates_through_three_loops_not_64_copies():
    torch.manual_seed(0)
    model = NflowsFlow(nflows_maf(64).eval())
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
}
# Flows also exported through export_model, whose graphs must equal the CLI's: one of each
# library (each export takes 7 to 14 s here).
SAME_GRAPHS_FROM_THE_API = ("zuko-maf", "nflows-maf")


def exported_outputs(repository, name: str, x: np.ndarray, z: np.ndarray):
    """What the two ONNX graphs of the unconditional flow ``name`` in ``repository`` compute
    at ``x`` and ``z``."""
    runs = []
    for direction, points in (("density", x), ("generation", z)):
        graph = (repository / triton_model_name(name, direction) / "1" / "model.onnx").read_bytes()
        runs += load_exported("onnx", graph)(points)
    return runs


@pytest.mark.e2e
def test_trained_zuko_and_nflows_flows_are_served_with_their_librarys_numbers(tmp_path):
    """Five flows trained on moons for 200 steps, each exported through the CLI (from
    library_flows.py and its saved weights); for one flow of each library, the Python API
    gives the same graphs. Triton and the gateway serve the CLI's. One flow takes a context
    (which moon)."""
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
                                client.sample(name, 300, seed=5, context=one_side))
    finally:
        assert stop_serve(process) == 0
    assert families == {name: name.split("-")[0] for name in LIVE_FLOWS}
    with torch.no_grad():
        for name, (model, context) in models.items():
            log_prob, samples = served[name]
            expected = library_log_prob(model, torch.from_numpy(rows[:300]),
                                        None if context is None else torch.from_numpy(context[:300]))
            np.testing.assert_allclose(log_prob, expected.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
            x, expected_log_prob = library_generation(model, torch.from_numpy(noise),
                                                      None if context is None else torch.ones(300, 1))
            np.testing.assert_allclose(samples.x, x.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(samples.log_prob, expected_log_prob.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


BUILDER = '''
import zuko


def build():
    return zuko.flows.MAF(2, transforms=3)


def build_conditional():
    return zuko.flows.NSF(2, 1, transforms=2)


def not_a_flow():
    return "a string"
'''


@pytest.fixture
def user_files(tmp_path):
    """A builder file, the trained MAF's state dict, and held-out rows, as a user has them."""
    builder = tmp_path / "my_flows.py"
    builder.write_text(BUILDER)
    torch.manual_seed(0)
    model = ZukoFlow(zuko.flows.MAF(2, transforms=3), 2)
    rows = two_moons(1000, seed=1)
    train(model, rows, None, steps=100)
    torch.save(model.flow.state_dict(), tmp_path / "maf.pt")
    np.save(tmp_path / "heldout.npy", rows[-100:])
    return tmp_path, model


@pytest.mark.parametrize(("function", "extra", "message"), [
    ("missing", [], "has no function 'missing'"),
    ("not_a_flow", [], "the builder returned a str, which is neither a zuko or nflows flow nor a torch.nn.Module"),
    ("build_conditional", ["--weights", "maf.pt"], "maf.pt does not fit the flow the builder returns"),
    ("build", ["--data", "wide.npy"], "the zuko flow is over 2 features, not 3"),
    ("build", ["--data", "nowhere.npy"], "nowhere.npy"),
])
def test_cli_export_of_a_users_flow_says_what_is_wrong(user_files, capsys, monkeypatch, function, extra, message):
    from flowserve import cli

    folder, _ = user_files
    np.save(folder / "wide.npy", np.zeros((20, 3), np.float32))
    monkeypatch.chdir(folder)
    arguments = ["--data", "heldout.npy", *extra] if "--data" not in extra else extra
    code = cli.main(["export", "--module", f"my_flows.py:{function}", *arguments, "--model-repository", "repo"])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (folder / "repo").exists()


def test_cli_export_wants_a_checkpoint_or_a_module(capsys):
    from flowserve import cli

    assert cli.main(["export"]) == 1
    assert "give a checkpoint of flowserve train, or --module FILE.py:FUNCTION with --data" in capsys.readouterr().err


def test_builders_flows_get_their_librarys_adapter():
    assert isinstance(wrap(zuko.flows.MAF(2, transforms=1), 2), ZukoFlow)
    adapted = wrap(nflows_maf(2, context=1, layers=1), 2, 1)
    assert isinstance(adapted, NflowsFlow) and adapted.context_dim == 1
    with pytest.raises(ValueError, match="the nflows flow is over 2 features, not 3"):
        wrap(nflows_maf(2, layers=1), 3)
    own = perturbed("maf")  # already follows the protocol
    assert wrap(own, 4) is own

"""Flows trained with zuko, exported and served: the adapter computes what the library
computes, the autoregressive inverse exports as a loop, and the served numbers equal the
library's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zuko
from grpc_health.v1 import health_pb2

from flowserve.export.adapters.zuko import ZukoFlow
from flowserve.export.data import two_moons
from flowserve.export.exporter.formats import export_onnx, graph_stats
from flowserve.export.exporter.pipeline import export_model
from flowserve.export.exporter.triton_config import ServingConfig
from flowserve.server.client import FlowClient

from conftest import start_serve, stop_serve, wait_for_health

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
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return ZukoFlow(flow, features, context).eval()


def inputs(model: ZukoFlow, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(rows, model.context_dim, generator=generator) if model.context_dim else None
    return torch.randn(rows, model.noise_dim, generator=generator), context


@pytest.mark.parametrize("name", ZUKO_FLOWS)
def test_the_adapter_computes_what_zuko_computes(name):
    model = perturbed(name)
    x, context = inputs(model, 16, seed=1)
    z, _ = inputs(model, 16, seed=2)
    with torch.no_grad():
        distribution = model.flow(context)
        expected_x, ladj = distribution.transform.inv.call_and_ladj(z)
        expected_log_prob = distribution.base.log_prob(z) - ladj
        got_x, got_log_prob = model.sample_with_log_prob(z, context)
        assert torch.equal(model.log_prob(x, context), distribution.log_prob(x))
    assert torch.equal(got_x, expected_x) and torch.equal(got_log_prob, expected_log_prob)


def test_the_adapter_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(TypeError, match="expected a zuko.flows.Flow, got Linear"):
        ZukoFlow(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="ZukoFlow exports to onnx only, not torchscript"):
        export_model(perturbed("maf"), tmp_path, name="ts", example_data=np.zeros((4, 4), np.float32),
                     serving=ServingConfig(format="torchscript"))


@pytest.mark.e2e
@pytest.mark.parametrize("name", ZUKO_FLOWS)
def test_zuko_flows_export_with_their_inverse_as_a_loop(name, tmp_path):
    model = perturbed(name)
    rows, context = inputs(model, 64, seed=3)
    meta = export_model(model, tmp_path, name=name, example_data=rows.numpy(),
                        example_context=None if context is None else context.numpy())
    assert max(meta.parity_max_diff.values()) <= 1e-4 and meta.family == "zuko"
    autoregressive = ZUKO_FLOWS[name][3]
    assert meta.graphs["generation"]["loops"] == autoregressive and meta.graphs["density"]["loops"] == 0


@pytest.mark.e2e
def test_a_64_dimensional_zuko_maf_generates_through_three_loops_not_64_copies():
    torch.manual_seed(0)
    model = ZukoFlow(zuko.flows.MAF(64, transforms=3), 64).eval()
    stats = graph_stats("onnx", export_onnx(model, "generation"))
    assert stats["loops"] == 3 and stats["nodes"] < 200  # 119 here; unrolled it grows with 3 x 64 passes


def train(model: ZukoFlow, rows: np.ndarray, context: np.ndarray | None, steps: int = 300) -> None:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(rows)
    c = None if context is None else torch.from_numpy(context)
    for _ in range(steps):
        index = torch.randint(len(x), (128,))
        loss = -model.flow(None if c is None else c[index]).log_prob(x[index]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.e2e
def test_trained_zuko_flows_are_served_with_the_librarys_numbers(tmp_path):
    """A MAF and a conditional NSF, trained on moons for 300 steps, served by Triton and the gateway."""
    rows = two_moons(2000, seed=0)
    labels = (rows[:, :1] > 0.5).astype(np.float32)  # a context: which side of the moons
    maf = ZukoFlow(zuko.flows.MAF(2, transforms=3), 2)
    nsf = ZukoFlow(zuko.flows.NSF(2, 1, transforms=2), 2, 1)
    train(maf, rows, None)
    train(nsf, rows, labels)
    repository = tmp_path / "repo"
    export_model(maf, repository, name="zuko-maf", example_data=rows[-200:])
    export_model(nsf, repository, name="zuko-nsf", example_data=rows[-200:], example_context=labels[-200:])

    process, port, _ = start_serve(repository, tmp_path / "serve")
    target = f"127.0.0.1:{port}"
    try:
        wait_for_health(target, process, health_pb2.HealthCheckResponse.SERVING)
        with FlowClient(target) as client:
            assert {m.name: m.family for m in client.list_models()} == {"zuko-maf": "zuko", "zuko-nsf": "zuko"}
            served_maf = client.log_likelihood("zuko-maf", rows[:300])
            served_nsf = client.log_likelihood("zuko-nsf", rows[:300], labels[:300])
            maf_samples = client.sample("zuko-maf", 300, seed=5)
            nsf_samples = client.sample("zuko-nsf", 300, seed=6, context=np.ones(1, np.float32))
    finally:
        assert stop_serve(process) == 0
    with torch.no_grad():
        np.testing.assert_allclose(served_maf, maf.flow().log_prob(torch.from_numpy(rows[:300])).numpy(),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            served_nsf, nsf.flow(torch.from_numpy(labels[:300])).log_prob(torch.from_numpy(rows[:300])).numpy(),
            rtol=1e-4, atol=1e-4)
        for samples, model, seed, context in ((maf_samples, maf, 5, None), (nsf_samples, nsf, 6, torch.ones(300, 1))):
            noise = np.random.Generator(np.random.PCG64(seed)).standard_normal((300, 2), dtype=np.float32)
            distribution = model.flow(context)
            x, ladj = distribution.transform.inv.call_and_ladj(torch.from_numpy(noise))
            np.testing.assert_allclose(samples.x, x.numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(samples.log_prob, (distribution.base.log_prob(torch.from_numpy(noise)) - ladj)
                                       .numpy(), rtol=1e-4, atol=1e-4)


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


@pytest.mark.e2e
def test_cli_exports_a_zuko_flow_from_the_users_builder(user_files, capsys):
    from flowserve import cli
    from flowserve.metadata import FlowMetadata

    folder, model = user_files
    code = cli.main(["export", "--module", f"{folder / 'my_flows.py'}:build", "--weights", str(folder / "maf.pt"),
                     "--data", str(folder / "heldout.npy"), "--model-repository", str(folder / "repo")])
    assert code == 0, capsys.readouterr().err
    meta = FlowMetadata.read(folder / "repo" / "my-flows.flowserve.json")  # named after the file
    assert meta.family == "zuko" and meta.dataset == "heldout" and meta.graphs["generation"]["loops"] == 3
    assert max(meta.parity_max_diff.values()) <= 1e-4


@pytest.mark.parametrize(("function", "extra", "message"), [
    ("missing", [], "has no function 'missing'"),
    ("not_a_flow", [], "the builder returned a str, which is neither a zuko flow nor a torch.nn.Module"),
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

"""ONNX and TorchScript export of both directions: parity with PyTorch, repository layout,
configs, and the CLI's failure paths."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers.fakes import load_runner
from helpers.flows import LARGE_CHUNKS, SMALL_BATCH, SMALL_CHUNKS
from torch import nn

from flowserve import cli
from flowserve.contract.metadata import FlowMetadata, read_all
from flowserve.contract.spec import (
    DENSITY,
    DIRECTIONS,
    ENCODE,
    GENERATION,
    QUEUE_SIZE_PARAMETER,
    QUEUE_TIMEOUT_PARAMETER,
    direction_spec,
)
from flowserve.export.data import breast_cancer
from flowserve.export.exporter import formats
from flowserve.export.exporter.formats import export_onnx
from flowserve.export.exporter.parity import ExportParityError, check_parity, parity_inputs
from flowserve.export.exporter.pipeline import export_model
from flowserve.export.exporter.triton_config import parse_config_text


@pytest.fixture(scope="module")
def onnx_models(trained_flow) -> dict[str, bytes]:
    return {d: export_onnx(trained_flow, d) for d in DIRECTIONS}


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_graph_io_follows_the_spec_and_has_a_dynamic_batch(onnx_models, direction):
    model = onnx.load_from_string(onnx_models[direction])
    spec = direction_spec(direction, 2)
    assert [i.name for i in model.graph.input] == spec.input_names
    assert [o.name for o in model.graph.output] == spec.output_names
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    session = ort.InferenceSession(onnx_models[direction], providers=["CPUExecutionProvider"])
    for batch in (1, 37, 2048):
        outputs = session.run(None, {spec.input_names[0]: np.zeros((batch, 2), np.float32)})
        assert [o.shape for o in outputs] == [(batch, *t.dims) for t in spec.outputs]


def test_onnx_matches_pytorch_within_1e_4(trained_flow, onnx_models, moons):
    report = check_parity(trained_flow, onnx_models, "onnx", parity_inputs(trained_flow, torch.from_numpy(moons["test"])))
    assert set(report) == {"density_log_prob", "generation_x", "generation_log_prob", "round_trip_x"}
    assert max(report.values()) <= 1e-4


def test_parity_check_catches_a_graph_that_is_not_the_flow(trained_flow, onnx_models, moons):
    other = copy.deepcopy(trained_flow)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1e-3)
    inputs = parity_inputs(trained_flow, torch.from_numpy(moons["test"]))
    with pytest.raises(ExportParityError, match="onnx differs from PyTorch"):
        check_parity(other, onnx_models, "onnx", inputs)


class Float32Only(torch.nn.Module):
    """A servable model whose outputs are float32 whatever its parameters: no float64 reference."""

    def __init__(self, flow):
        super().__init__()
        self.flow, self.event_shape, self.noise_dim, self.context_dim = flow, flow.event_shape, flow.noise_dim, 0

    def log_prob(self, x, context=None):
        return self.flow.log_prob(x).float()

    def sample_with_log_prob(self, z, context=None):
        x, log_prob = self.flow.sample_with_log_prob(z)
        return x.float(), log_prob.float()


def test_parity_falls_back_to_float32_pytorch_for_a_model_without_float64(trained_flow, onnx_models, moons, caplog):
    inputs = parity_inputs(trained_flow, torch.from_numpy(moons["test"]))
    report = check_parity(Float32Only(trained_flow), onnx_models, "onnx", inputs)
    assert caplog.text.count("Float32Only does not run in float64") == 1
    assert set(report) == {"density_log_prob", "generation_x", "generation_log_prob"}
    assert max(report.values()) <= 1e-4


@pytest.mark.parametrize("family", ["realnvp", "maf"])
def test_raw_tabular_data_exports_cleanly(family, tmp_path, capsys):
    """A user's first export of raw features (breast-cancer: 0.001 to 2500) must not fail on
    float32 rounding: with log p around 30 to 60, Real NVP's ONNX graph differed from
    PyTorch by 1.7e-4 absolute (5e-6 relative), which the old absolute 1e-4 rule refused."""
    data = tmp_path / "cancer.npy"
    np.save(data, breast_cancer())
    checkpoint, repo = tmp_path / "ckpt.pt", tmp_path / "repo"
    assert cli.main(["train", "--family", family, "--data", str(data), "--steps", "300", "-o", str(checkpoint)]) == 0
    assert cli.main(["export", str(checkpoint), "--model-repository", str(repo), "--name", family]) == 0, \
        capsys.readouterr().err
    meta = FlowMetadata.read(repo / f"{family}.flowserve.json")
    assert meta.metrics["test_log_likelihood"] > 10  # where float32 rounding is no longer below 1e-4
    assert max(meta.parity_max_diff.values()) <= 1e-4


def test_repository_layout_and_metadata(repository):
    flows = read_all(repository)
    assert set(flows) == {SMALL_CHUNKS, LARGE_CHUNKS}
    meta = flows[SMALL_CHUNKS]
    assert meta.family == "realnvp" and meta.event_shape == (2,)
    assert meta.models == {DENSITY: f"{SMALL_CHUNKS}-density", GENERATION: f"{SMALL_CHUNKS}-generation",
                           ENCODE: f"{SMALL_CHUNKS}-encode"}
    assert {"encode_z", "encode_log_det", "encode_log_prob"} <= set(meta.parity_max_diff)
    assert meta.data["n"] == 1600 and len(meta.data["mean"]) == 2
    assert np.isfinite(meta.metrics["test_log_likelihood"])
    assert meta.exported_at.endswith("+00:00")
    for direction, model in meta.models.items():
        onnx_file = repository / model / "1" / "model.onnx"
        assert meta.checksums[direction] == "sha256:" + hashlib.sha256(onnx_file.read_bytes()).hexdigest()
        config = parse_config_text((repository / model / "config.pbtxt").read_text())
        assert config.name == model and config.max_batch_size == SMALL_BATCH


def test_configs_match_the_exported_graphs(repository):
    """The config's tensor names and per-row dims are the ONNX graph's, batch dim dropped."""
    for meta in read_all(repository).values():
        for model in meta.models.values():
            config = parse_config_text((repository / model / "config.pbtxt").read_text())
            graph = onnx.load(repository / model / "1" / "model.onnx").graph

            def per_row_dims(value_info):
                return [d.dim_value for d in value_info.type.tensor_type.shape.dim[1:]]

            for declared, actual in [*zip(config.input, graph.input), *zip(config.output, graph.output)]:
                assert declared.name == actual.name
                assert not actual.type.tensor_type.shape.dim[0].dim_value  # dynamic batch
                model_dims = list(declared.reshape.shape) if declared.HasField("reshape") else list(declared.dims)
                assert model_dims == per_row_dims(actual), declared.name


def test_cli_export_fails_with_a_clear_message_and_writes_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    def export_a_different_flow(flow, direction):
        other = copy.deepcopy(flow)
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(1.01)
        return export_onnx(other, direction)

    monkeypatch.setitem(formats.EXPORTERS, "onnx", export_a_different_flow)
    repo = tmp_path / "repo"
    code = cli.main(["export", str(checkpoint), "--model-repository", str(repo)])
    assert code == 1
    assert "onnx differs from PyTorch by more than 0.0001" in capsys.readouterr().err
    assert not repo.exists() or not any(repo.iterdir())


def test_cli_export_writes_gpu_configs_for_the_native_backend(checkpoint, tmp_path):
    repo = tmp_path / "repo"
    code = cli.main(["export", str(checkpoint), "--model-repository", str(repo), "--name", "prod",
                     "--backend", "onnxruntime", "--instance-kind", "gpu", "--gpus", "0,1", "--instances", "2",
                     "--max-queue-size", "5", "--queue-timeout-ms", "300", "--triton-queue-policy"])
    assert code == 0
    config = parse_config_text((repo / "prod-generation" / "config.pbtxt").read_text())
    assert config.backend == "onnxruntime"
    assert list(config.instance_group[0].gpus) == [0, 1] and config.instance_group[0].count == 2
    assert config.parameters[QUEUE_SIZE_PARAMETER].string_value == "5"
    assert config.parameters[QUEUE_TIMEOUT_PARAMETER].string_value == "300"
    policy = config.dynamic_batching.default_queue_policy
    assert (policy.max_queue_size, policy.default_timeout_microseconds) == (5, 300_000)
    assert config.parameters["intra_op_thread_count"].string_value == "0"  # the ORT backend's own key: its default
    assert "intra_op_num_threads" not in config.parameters
    assert FlowMetadata.read(repo / "prod.flowserve.json").backend == "onnxruntime"


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_cli_export_torchscript_for_tritons_pytorch_backend(checkpoint, tmp_path, capsys, monkeypatch):
    repo = tmp_path / "repo"
    code = cli.main(["export", str(checkpoint), "--model-repository", str(repo), "--name", "ts",
                     "--format", "torchscript", "--backend", "pytorch", "--no-encode"])
    assert code == 0, capsys.readouterr().err
    config = parse_config_text((repo / "ts-generation" / "config.pbtxt").read_text())
    assert config.backend == "pytorch" and config.default_model_filename == "model.pt"
    assert [t.name for t in config.input] == ["INPUT__0"]
    assert [t.name for t in config.output] == ["OUTPUT__0", "OUTPUT__1"]
    # Called as the runner calls it: positional inputs in config order, as Triton's PyTorch backend does.
    threads = torch.get_num_threads()
    try:
        session = load_runner(monkeypatch).TorchScriptSession(str(repo / "ts-generation" / "1" / "model.pt"), 1, None)
        x, log_prob = session.run(["OUTPUT__0", "OUTPUT__1"], ["INPUT__0"], [torch.zeros(3, 2)])
    finally:
        torch.set_num_threads(threads)  # the session sets the process's threads, as it may inside Triton
    assert x.shape == (3, 2) and log_prob.shape == (3,)
    meta = FlowMetadata.read(repo / "ts.flowserve.json")
    assert meta.format == "torchscript" and meta.backend == "pytorch"
    assert set(meta.models) == set(DIRECTIONS) and not (repo / "ts-encode").exists()  # --no-encode
    assert max(meta.parity_max_diff.values()) <= 1e-4


def test_cli_export_rejects_a_format_the_backend_cannot_serve(checkpoint, tmp_path, capsys):
    code = cli.main(["export", str(checkpoint), "--model-repository", str(tmp_path / "repo"),
                     "--format", "onnx", "--backend", "pytorch"])
    assert code == 1
    assert "pytorch backend serves torchscript models, not onnx" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--format", "torchscript"], "the cached inverse is exported to ONNX only"),
    (["--cached-inverse", "0"], "minimum batch must be >= 1, got 0"),
    ([], "RealNVP has no MADE inverse for the cached inverse to replace"),
    (["--cached-inverse", "513"], "minimum batch must be at most 512"),
])
def test_cli_export_refuses_a_cached_inverse_it_cannot_build_or_check(checkpoint, tmp_path, capsys, extra, message):
    code = cli.main(["export", str(checkpoint), "--model-repository", str(tmp_path / "repo"), "--cached-inverse",
                     *extra])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_checkpoint_with_unknown_path_is_a_clear_cli_error(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "missing.pt")]) == 1
    assert "missing.pt" in capsys.readouterr().err


def test_a_corrupt_metadata_file_does_not_hide_other_flows(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    (repo / f"{SMALL_CHUNKS}.flowserve.json").write_text("{ half-written")
    (repo / "old.flowserve.json").write_text(json.dumps({"schema": 0, "name": "old"}))
    assert set(read_all(repo)) == {LARGE_CHUNKS}


class ShiftScale(nn.Module):
    """A flow written without flowserve: x = mean + context @ w + exp(log_scale) * z."""

    def __init__(self, dim: int, context_dim: int = 0):
        super().__init__()
        self.event_shape, self.noise_dim, self.context_dim = (dim,), dim, context_dim
        self.mean = nn.Parameter(torch.linspace(-1.0, 1.0, dim))
        self.log_scale = nn.Parameter(torch.linspace(-0.5, 0.5, dim))
        self.weight = nn.Parameter(torch.full((max(context_dim, 1), dim), 0.3))

    def shift(self, context):
        return self.mean if context is None else self.mean + context @ self.weight

    def log_prob(self, x, context=None):
        z = (x - self.shift(context)) * torch.exp(-self.log_scale)
        return -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) - self.log_scale.sum()

    def sample_with_log_prob(self, z, context=None):
        x = self.shift(context) + torch.exp(self.log_scale) * z
        return x, self.log_prob(x, context)


def test_export_model_takes_any_module_that_follows_the_protocol(tmp_path):
    model = ShiftScale(3, context_dim=2)
    rng = np.random.default_rng(0)
    rows, contexts = rng.normal(size=(40, 3)).astype(np.float32), rng.normal(size=(40, 2)).astype(np.float32)
    meta = export_model(model, tmp_path, name="byo", example_data=rows, example_context=contexts)
    assert (meta.family, meta.architecture, meta.event_shape, meta.context_shape) == (
        "custom", {"class": "ShiftScale"}, (3,), (2,))
    assert meta.data["n"] == 40 and max(meta.parity_max_diff.values()) <= 1e-4
    assert set(read_all(tmp_path)) == {"byo"}
    session = ort.InferenceSession(str(tmp_path / "byo-density" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (log_prob,) = session.run(None, {"x": rows, "context": contexts})
    scale = np.exp(np.linspace(-0.5, 0.5, 3))
    z = (rows - np.linspace(-1.0, 1.0, 3) - contexts @ np.full((2, 3), 0.3)) / scale
    expected = -0.5 * (z**2).sum(1) - 1.5 * math.log(2 * math.pi) - np.log(scale).sum()
    np.testing.assert_allclose(log_prob, expected, rtol=0, atol=1e-4)


class DensityOnly(nn.Module):
    """Follows half of the protocol: no generation direction."""

    event_shape, noise_dim, context_dim = (3,), 3, 0

    def log_prob(self, x, context=None):
        return -x.sum(1)


def test_export_model_names_what_is_wrong(tmp_path):
    rows = np.zeros((4, 3), np.float32)
    with pytest.raises(TypeError, match=r"DensityOnly is not a servable model: .* \(missing: \['sample_with_log_prob'\]\)"):
        export_model(DensityOnly(), tmp_path, name="x", example_data=rows)
    model = ShiftScale(3)
    with pytest.raises(ValueError, match=r"example_data has shape \[4, 5\]; the model's event shape is \[3\]"):
        export_model(model, tmp_path, name="x", example_data=np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="takes no context"):
        export_model(model, tmp_path, name="x", example_data=rows, example_context=np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="takes a context of 2 values per row: pass example_context"):
        export_model(ShiftScale(3, context_dim=2), tmp_path, name="x", example_data=rows)
    with pytest.raises(ValueError, match=r"example_context has shape \[3, 2\]; expected \[4, 2\]"):
        export_model(ShiftScale(3, context_dim=2), tmp_path, name="x", example_data=rows,
                     example_context=np.zeros((3, 2), np.float32))
    assert list(tmp_path.iterdir()) == []

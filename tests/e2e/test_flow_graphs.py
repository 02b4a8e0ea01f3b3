"""Every family's exported ONNX and TorchScript graphs match PyTorch; sequential directions
export as loops, not unrolled; and short training beats the Gaussian baseline."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.flows import (
    AUTOREGRESSIVE,
    FLOW_CONFIGS,
    SEQUENTIAL,
    assert_like_the_loop,
    contexts,
    data_points,
    moons_dataset,
    parametrize_configs,
    perturbed_model,
    sequential_direction,
    set_early_exit,
    standard_normal,
)

from flowserve.contract.spec import DENSITY, DIRECTIONS, EMBED, GENERATION, triton_model_name
from flowserve.export.exporter.formats import EXPORTERS, cuda_graph_blockers, export_onnx, graph_stats, load_exported
from flowserve.export.exporter.graphs import GRAPHS, EmbeddingApart
from flowserve.export.exporter.parity import check_parity, parity_inputs
from flowserve.export.exporter.pipeline import export_model
from flowserve.export.exporter.triton_config import ServingConfig
from flowserve.export.flows.base import Flow
from flowserve.export.flows.registry import build_flow
from flowserve.export.flows.transforms import fixed_point_inverses
from flowserve.export.quality import gaussian_baseline
from flowserve.export.training import TrainConfig, mean_log_prob, train_flow

# Every config but the 2-D autoregressive NSF, whose graphs are those of nsf-4d-context with
# another width (14 s of export here); its invariants are in tests/unit/test_flows.py.
all_models = parametrize_configs(lambda config: config is not FLOW_CONFIGS["nsf-2d-autoregressive"])


@all_models
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_graphs_match_pytorch(config, fmt, caplog):
    """A model with a context embedding exports it apart, as export_model does; the parity
    check runs the directions on the embed graph's outputs."""
    model = perturbed_model(config)
    heldout = data_points(model, 64, seed=8)
    embedded = "context_embedding" in config
    served, directions = (EmbeddingApart(model), (DENSITY, GENERATION, EMBED)) if embedded else (model, DIRECTIONS)
    graphs = {direction: EXPORTERS[fmt](served, direction) for direction in directions}
    report = check_parity(model, graphs, fmt, parity_inputs(model, heldout, contexts(model, 64, seed=9), rows=64))
    assert max(report.values()) <= 1e-4
    assert "float64" not in caplog.text  # checked against a float64 reference
    assert ("round_trip_x" in report) == isinstance(model, Flow)
    assert ("embedded_context" in report) == embedded
    looping = sequential_direction(config) if config in SEQUENTIAL.values() else None
    assert {direction: graph_stats(fmt, graph)["loops"] for direction, graph in graphs.items()} == {
        direction: len(fixed_point_inverses(model)) if direction == looping else 0 for direction in graphs}
    if fmt == "torchscript":  # a direction goes into a CUDA graph unless it runs the loop that stops on the host
        blockers = {direction: cuda_graph_blockers(graph) for direction, graph in graphs.items()}
        assert blockers == {direction: ["aten::equal", "prim::If", "prim::Loop"] if direction == looping else []
                            for direction in graphs}


@pytest.mark.parametrize("family, direction", [("maf", GENERATION), ("iaf", DENSITY)])
def test_sequential_direction_is_a_loop_not_unrolled(family, direction):
    """D=64: the early-exit loop stays one Loop per layer, and its exported graphs compute
    what the D-step loop's graphs compute."""
    model = perturbed_model(AUTOREGRESSIVE[f"{family}-64d"])
    layers = len(fixed_point_inverses(model))
    points = (standard_normal(256, 64, seed=3) if direction == GENERATION else data_points(model, 256, seed=3)).numpy()
    for fmt, node_budget in (("onnx", 60 * layers), ("torchscript", None)):
        early = EXPORTERS[fmt](model, direction)
        d_steps = EXPORTERS[fmt](set_early_exit(copy.deepcopy(model), False), direction)
        stats = graph_stats(fmt, early)
        assert stats["loops"] == layers and (node_budget is None or stats["nodes"] < node_budget), stats
        for got, expected in zip(load_exported(fmt, early)(points), load_exported(fmt, d_steps)(points), strict=True):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    one_pass = graph_stats("onnx", export_onnx(model, DENSITY if direction == GENERATION else GENERATION))
    assert one_pass["loops"] == 0


def test_exported_cached_inverse_gives_the_d_step_result(tmp_path):
    """A conditional IAF exported with the cached inverse from 100 rows (by export_model,
    which checks parity): the slow direction's ONNX graph computes what the D-step graph
    computes, below and above 100 rows; each layer is an If over two Loops."""
    model = perturbed_model(AUTOREGRESSIVE["iaf-4d-context"])
    points, context = data_points(model, 300, seed=3), contexts(model, 300, seed=8)
    export_model(model, tmp_path, name="flow", example_data=points[:64].numpy(), example_context=context[:64].numpy(),
                 serving=ServingConfig(cached_inverse_min_batch=100, encode=False))
    graph = (tmp_path / triton_model_name("flow", DENSITY) / "1" / "model.onnx").read_bytes()
    layers = len(fixed_point_inverses(model))
    stats = graph_stats("onnx", graph)
    assert stats["loops"] == 2 * layers and stats["nodes"] < 400 * layers
    reference = set_early_exit(copy.deepcopy(model), False)
    d_steps = load_exported("onnx", export_onnx(reference, DENSITY))
    cached = load_exported("onnx", graph)
    exact = GRAPHS[DENSITY](reference.double())
    for rows in (8, 300):
        with torch.no_grad():
            truth = exact(points[:rows].double(), context[:rows].double())
        inputs = (points[:rows].numpy(), context[:rows].numpy())
        assert_like_the_loop(cached(*inputs)[0], d_steps(*inputs)[0], truth)


@pytest.mark.parametrize("name", ["realnvp-2d", "maf-2d"])
def test_short_training_beats_gaussian_baseline(name):
    dataset = moons_dataset(2000)
    torch.manual_seed(0)
    model = build_flow(FLOW_CONFIGS[name])
    before = mean_log_prob(model, dataset.test)
    metrics = train_flow(model, dataset, TrainConfig(steps=600), progress=False)
    assert metrics["test_log_likelihood"] == pytest.approx(mean_log_prob(model, dataset.test))
    assert metrics["test_log_likelihood"] > before + 0.5
    assert metrics["test_log_likelihood"] > gaussian_baseline(dataset)["test_log_likelihood"] + 0.25

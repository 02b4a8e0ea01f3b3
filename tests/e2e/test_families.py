"""One model of every family, served live: real Triton, real gateway, both directions.

Each model is briefly trained, exported (ONNX, or TorchScript for one of them), served by
``flowserve serve``, and called through the gateway. The served numbers must equal
PyTorch's on the same inputs and the same base noise.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from helpers.flows import set_early_exit
from helpers.processes import start_serve, stop_serve, wait_for_health

from flowserve.contract.spec import CONTEXT, GENERATION, triton_model_name
from flowserve.export.data import load_dataset
from flowserve.export.exporter.formats import export_onnx, load_exported
from flowserve.export.exporter.parity import scaled_gap
from flowserve.export.exporter.pipeline import export_flow
from flowserve.export.exporter.triton_config import ServingConfig
from flowserve.export.flows.registry import FAMILY_NAMES, build_flow, default_flow_config
from flowserve.export.training import TrainConfig, load_checkpoint, save_checkpoint, train_flow
from flowserve.server.client import FlowClient
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.triton.launcher import free_port


@dataclass(frozen=True)
class ZooEntry:
    family: str
    dataset: str
    options: dict
    format: str = "onnx"


ZOO = {
    "nice-moons": ZooEntry("nice", "moons", {"num_couplings": 4, "hidden_features": [32, 32]}),
    "realnvp-digits": ZooEntry("realnvp", "digits-conditional", {"num_scales": 2, "hidden_channels": 16}),
    "glow-digits": ZooEntry("glow", "digits", {"num_levels": 2, "steps_per_level": 2, "hidden_channels": 16}),
    "maf-breast-cancer": ZooEntry("maf", "breast-cancer", {"num_layers": 3, "hidden_features": [64]}),
    "iaf-moons": ZooEntry("iaf", "moons", {"num_layers": 3, "hidden_features": [32]}, format="torchscript"),
    "vae-moons": ZooEntry("vae", "moons", {"hidden_features": [32], "prior_couplings": 2,
                                           "importance_samples": 16}),
    "nsf-moons": ZooEntry("nsf", "moons", {"num_transforms": 3, "hidden_features": [32], "bins": 6}),
    "nsf-ar-moons": ZooEntry("nsf", "moons", {"num_transforms": 2, "hidden_features": [32], "bins": 6,
                                              "variant": "autoregressive"}, format="torchscript"),
}
ROWS = 40


def test_the_zoo_covers_every_family():
    assert {entry.family for entry in ZOO.values()} == set(FAMILY_NAMES)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of every zoo model, trained for 60 steps."""
    directory = tmp_path_factory.mktemp("zoo")
    checkpoints = {}
    for name, entry in ZOO.items():
        dataset = load_dataset(entry.dataset, num_points=1000 if entry.dataset == "moons" else None, seed=0)
        torch.manual_seed(0)
        model = build_flow({**default_flow_config(entry.family, dataset), **entry.options})
        metrics = train_flow(model, dataset, TrainConfig(steps=60, batch_size=128), progress=False)
        checkpoints[name] = directory / f"{name}.pt"
        save_checkpoint(checkpoints[name], model, data_summary={"n": len(dataset.train)}, metrics=metrics,
                        dataset=dataset.name, heldout=dataset.test, heldout_context=dataset.test_context)
    return checkpoints


@pytest.fixture(scope="module")
def zoo_serve(tmp_path_factory, zoo):
    """``flowserve serve`` over the zoo: a client of the gateway, and the address of its Triton."""
    repository = tmp_path_factory.mktemp("zoo_repository")
    for name, checkpoint in zoo.items():
        export_flow(checkpoint, repository, name=name, progress=False,
                    serving=ServingConfig(format=ZOO[name].format, max_batch_size=256))
    workdir = tmp_path_factory.mktemp("zoo_triton")
    triton_port = free_port()
    process, port, _ = start_serve(repository, workdir, "--triton-grpc-port", str(triton_port))
    target = f"127.0.0.1:{port}"
    try:
        wait_for_health(target, process, health_pb2.HealthCheckResponse.SERVING)
        with FlowClient(target, timeout=120) as client:
            yield client, f"127.0.0.1:{triton_port}"
    finally:
        stop_serve(process)


@pytest.fixture(scope="module")
def zoo_server(zoo_serve) -> FlowClient:
    return zoo_serve[0]


def test_list_models_describes_every_family(zoo_server):
    infos = {info.name: info for info in zoo_server.list_models()}
    assert set(infos) == set(ZOO)
    for name, info in infos.items():
        assert info.ready and info.family == ZOO[name].family
    assert list(infos["realnvp-digits"].event_shape) == [1, 8, 8]
    assert list(infos["realnvp-digits"].context_shape) == [10]
    assert all(not infos[name].context_shape for name in ZOO if name != "realnvp-digits")
    assert infos["vae-moons"].log_likelihood_kind == pb.LOG_LIKELIHOOD_KIND_LOWER_BOUND
    assert all(infos[name].log_likelihood_kind == pb.LOG_LIKELIHOOD_KIND_EXACT for name in ZOO if name != "vae-moons")
    assert infos["iaf-moons"].metadata["format"] == "torchscript"


def _heldout(checkpoint: Path):
    model, ckpt = load_checkpoint(checkpoint)
    context = ckpt.heldout_context
    return model, ckpt.heldout_sample[:ROWS], None if context is None else context[:ROWS]


@pytest.mark.parametrize("name", ZOO)
def test_served_log_likelihood_equals_pytorch(zoo_server, zoo, name):
    model, x, context = _heldout(zoo[name])
    served = zoo_server.score(name, x.numpy(), None if context is None else context.numpy(),
                              return_bits_per_dim=True)
    with torch.no_grad():
        expected = model.log_prob(x, context).numpy()
    np.testing.assert_allclose(served.log_prob, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(served.bits_per_dim, -expected / (model.dim * math.log(2)), rtol=1e-5)


@pytest.mark.parametrize("name", ZOO)
def test_served_samples_equal_pytorch_with_the_same_noise(zoo_server, zoo, name):
    model, _, context = _heldout(zoo[name])
    one_context = None if context is None else context[3]
    result = zoo_server.sample(name, ROWS, seed=11, temperature=0.8,
                               context=None if one_context is None else one_context.numpy())
    noise = np.random.Generator(np.random.PCG64(11)).standard_normal((ROWS, model.noise_dim), dtype=np.float32)
    noise *= np.float32(0.8)
    with torch.no_grad():
        expected_x, expected_log_prob = model.sample_with_log_prob(
            torch.from_numpy(noise), None if one_context is None else one_context.expand(ROWS, -1))
    assert result.x.shape == (ROWS, *model.event_shape)
    np.testing.assert_allclose(result.x, expected_x.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.log_prob, expected_log_prob.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", [name for name, entry in ZOO.items() if entry.dataset.endswith("-conditional")])
def test_samples_per_context_are_the_repeated_context_samples_bit_for_bit(zoo_server, zoo, name):
    """B x N on the real Triton: 4 contexts x 25 samples are the samples of the call that
    sends each context 25 times, one per row, with the same seed; SampleStream likewise."""
    model, _, context = _heldout(zoo[name])
    contexts = context[:4].numpy()
    grouped = zoo_server.sample(name, seed=3, context=contexts, samples_per_context=25)
    repeated = zoo_server.sample(name, 100, seed=3, context=np.repeat(contexts, 25, axis=0))
    streamed = list(zoo_server.sample_stream(name, seed=3, context=contexts, samples_per_context=25))
    assert grouped.x.shape == (4, 25, *model.event_shape) and grouped.log_prob.shape == (4, 25)
    np.testing.assert_array_equal(grouped.x.reshape(repeated.x.shape), repeated.x)
    np.testing.assert_array_equal(grouped.log_prob.reshape(100), repeated.log_prob)
    np.testing.assert_array_equal(np.concatenate([chunk.x for chunk in streamed]), repeated.x)
    assert np.concatenate([chunk.context_index for chunk in streamed]).tolist() == [i // 25 for i in range(100)]


def test_served_maf_samples_are_the_d_step_loops(zoo_server, zoo):
    """The early exit changes no served sample: Sample through the gateway equals the
    generation graph that runs all D steps, on the same seeded noise."""
    model, _, _ = _heldout(zoo["maf-breast-cancer"])
    d_steps = load_exported("onnx", export_onnx(set_early_exit(model, False), GENERATION))
    served = zoo_server.sample("maf-breast-cancer", ROWS, seed=11)
    noise = np.random.Generator(np.random.PCG64(11)).standard_normal((ROWS, model.noise_dim), dtype=np.float32)
    expected_x, expected_log_prob = d_steps(noise)
    assert np.abs(served.x - expected_x).max() <= 1e-6 * np.abs(expected_x).max()
    np.testing.assert_allclose(served.log_prob, expected_log_prob, rtol=0, atol=1e-6)


def generate_on_triton(triton_url: str, name: str, z: np.ndarray, context: np.ndarray | None) -> np.ndarray:
    """x from the base noise ``z``: the flow's generation model, called on Triton directly (the
    gateway's Sample draws its own noise)."""
    import tritonclient.grpc as triton

    inputs = [("z", z)] + ([] if context is None else [(CONTEXT, context)])
    requests = []
    for tensor_name, array in inputs:
        requests.append(triton.InferInput(tensor_name, list(array.shape), "FP32"))
        requests[-1].set_data_from_numpy(np.ascontiguousarray(array, np.float32))
    client = triton.InferenceServerClient(triton_url)
    try:
        return client.infer(triton_model_name(name, GENERATION), requests).as_numpy("x")
    finally:
        client.close()


@pytest.mark.parametrize("name", ZOO)
def test_encode_gives_the_models_own_z_and_generation_maps_it_back_to_x(zoo_serve, zoo, name):
    """Served z, log|det| and log p equal the model's own in float64 to 1e-4, and the served
    generation maps z back to x within 1e-4 (relative above 1). The VAE has no data -> noise
    map: FAILED_PRECONDITION, saying so."""
    client, triton_url = zoo_serve
    model, x, context = _heldout(zoo[name])
    served_context = None if context is None else context.numpy()
    if ZOO[name].family == "vae":
        with pytest.raises(grpc.RpcError) as info:
            client.encode(name, x.numpy(), served_context)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "its log-likelihood is a lower bound (vae): it has no exact data -> noise map" in info.value.details()
        return
    encoded = client.encode(name, x.numpy(), served_context)
    with torch.no_grad():
        z, log_det, log_prob = copy.deepcopy(model).double().encode(
            x.double(), None if context is None else context.double())
    assert encoded.z.shape == (ROWS, model.noise_dim)
    for got, expected in ((encoded.z, z.flatten(1)), (encoded.log_det, log_det), (encoded.log_prob, log_prob)):
        assert scaled_gap(got, expected.numpy()) <= 1e-4
    x_back = generate_on_triton(triton_url, name, encoded.z, served_context)
    assert scaled_gap(x_back, x.reshape(ROWS, -1).numpy()) <= 1e-4


def test_maf_encodes_in_its_fast_direction(zoo_server, zoo):
    """MAF's x -> z is one pass of its network per layer, z -> x one pass per dimension (D=30,
    with early exit): served, encode takes less time than Sample for the same rows."""
    name, rows = "maf-breast-cancer", 256
    model, _, _ = _heldout(zoo[name])
    x = zoo_server.sample(name, rows, seed=1).x
    times = {"encode": [], "sample": []}
    for _ in range(7):  # interleaved, the median of each
        for what, call in (("encode", lambda: zoo_server.encode(name, x)),
                           ("sample", lambda: zoo_server.sample(name, rows, seed=2))):
            started = time.perf_counter()
            call()
            times[what].append(time.perf_counter() - started)
    encode, sample = (statistics.median(times[what]) for what in ("encode", "sample"))
    assert encode < sample, times

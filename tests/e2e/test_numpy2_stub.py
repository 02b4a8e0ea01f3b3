"""Triton's Python stub under numpy 2, reproduced on the CPU: the stub of Triton 2.51 runs the
``python3`` of ``.venv/tools/numpy2`` (numpy 2.4, made by ``scripts/setup.sh --test``), as on
the GPU box where every flowserve model answered empty tensors.

What numpy 2 does to the stub's numpy path (``as_numpy()`` garbles inputs, ``Tensor(name,
ndarray)`` sends nothing) is pinned down with a model that still uses it; the runner, which
moves tensors through DLPack, answers what ONNX Runtime and TorchScript answer in-process."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as triton_grpc
from helpers.fakes import ROOT

from flowserve.contract.spec import DIRECTIONS, triton_model_name
from flowserve.export.exporter.pipeline import export_flow
from flowserve.export.exporter.triton_config import ServingConfig
from flowserve.server.triton.launcher import TritonServer

NUMPY2_PYTHON = ROOT / ".venv" / "tools" / "numpy2" / "bin" / "python"
NUMPY_IO_MODEL = ROOT / "tests" / "helpers" / "numpy_io_model"
FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def numpy2_python():
    assert NUMPY2_PYTHON.exists(), f"{NUMPY2_PYTHON} is missing: run scripts/setup.sh --test"
    version = subprocess.run([str(NUMPY2_PYTHON), "-c", "import numpy; print(numpy.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith("2."), f"{NUMPY2_PYTHON} has numpy {version}: run scripts/setup.sh --test"
    return NUMPY2_PYTHON


@pytest.fixture(scope="module")
def numpy2_triton(tmp_path_factory, checkpoint, numpy2_python):
    """One Triton whose stub runs numpy 2, serving the session's RealNVP exported in both
    formats, and the numpy-path model."""
    repo = tmp_path_factory.mktemp("numpy2_repository")
    for fmt in FORMATS:
        export_flow(checkpoint, repo, name=f"rnvp-{fmt}", progress=False, serving=ServingConfig(format=fmt))
    (repo / "numpy-io" / "1").mkdir(parents=True)
    shutil.copy(NUMPY_IO_MODEL / "config.pbtxt", repo / "numpy-io" / "config.pbtxt")
    shutil.copy(NUMPY_IO_MODEL / "model.py", repo / "numpy-io" / "1" / "model.py")
    server = TritonServer(repo, tmp_path_factory.mktemp("numpy2_triton"), stub_python=numpy2_python).start()
    client = triton_grpc.InferenceServerClient(server.grpc_url)
    yield server, client, repo
    client.close()
    server.stop()


def infer(client, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of one call, each as raw float32 bytes (an empty output stays empty)."""
    tensors = []
    for name, array in inputs.items():
        tensor = triton_grpc.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    result = client.infer(model, tensors).get_response()
    return {output.name: np.frombuffer(raw, np.float32)
            for output, raw in zip(result.outputs, result.raw_output_contents)}


def test_the_stub_runs_numpy_2_and_the_runner_loads_every_flow_model(numpy2_triton):
    server, client, _ = numpy2_triton
    assert server.failed_models == {}
    log = server.log_path.read_text()
    assert "numpy 2.4" in log and "flowserve_runner: loaded" in log  # the runner's load line names numpy


def test_numpy_2_garbles_as_numpy_inputs_and_empties_ndarray_outputs(numpy2_triton):
    _, client, _ = numpy2_triton
    x = np.arange(12, dtype=np.float32).reshape(4, 3) + 0.5
    answer = infer(client, "numpy-io", {"x": x})
    assert answer["numpy_both_ways"].size == 0 and answer["numpy_out"].size == 0
    read = answer["numpy_in"].reshape(4, 3)
    assert not np.array_equal(read, x)
    assert read[0, 0] == x[0, 0]  # the first value arrives; the rest of this batch were its copies
    assert np.all(read == x[0, 0])


@pytest.mark.parametrize("rows", [1, 64, 4096])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_runner_under_numpy_2_answers_what_the_model_answers_in_process(numpy2_triton, fmt, direction, rows):
    _, client, repo = numpy2_triton
    model = triton_model_name(f"rnvp-{fmt}", direction)
    config = client.get_model_config(model, as_json=True)["config"]
    x = np.random.default_rng(rows).normal(size=(rows, 2)).astype(np.float32)
    inputs = {config["input"][0]["name"]: x}
    path = str(repo / model / "1" / FORMATS[fmt])
    if fmt == "onnx":
        expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, inputs)
    else:
        with torch.inference_mode():
            outputs = torch.jit.load(path)(torch.from_numpy(x))
        expected = [o.numpy() for o in (outputs if isinstance(outputs, tuple) else (outputs,))]
    served = infer(client, model, inputs)
    for output, want in zip(config["output"], expected):
        np.testing.assert_allclose(served[output["name"]], want.ravel(), rtol=1e-5, atol=1e-6)

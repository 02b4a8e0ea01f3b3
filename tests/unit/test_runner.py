"""The Triton runner, called as Triton calls it, beside a stand-in for the stub's
``triton_python_backend_utils`` (the real stub runs in tests/e2e/test_numpy2_stub.py): it batches
requests through DLPack, and refuses to load, with the reason, where it would answer wrongly
or on the wrong device."""

from __future__ import annotations

import re
import types

import numpy as np
import onnx
import pytest
import torch
from helpers.fakes import StubTensor, load_runner, runner_args, stub_utils
from onnx import TensorProto, helper

from flowserve.contract.spec import CUDA_GRAPH_PARAMETER, RUNNER_PROBE_PARAMETER

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.[a-z]*` is deprecated:DeprecationWarning")
ROWS = (1, 5, 2)


def write_onnx_flow(path) -> None:
    """A stand-in density graph: ``log_prob = sum(2 x)`` over x of [batch, 2]."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["doubled"]),
         helper.make_node("ReduceSum", ["doubled", "axes"], ["log_prob"], keepdims=0)],
        "density",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("log_prob", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


class Doubling(torch.nn.Module):
    def forward(self, x):
        return 2 * x, (2 * x).sum(dim=1)


def write_torchscript_flow(path) -> None:
    """A stand-in generation module: ``(2 z, sum(2 z))``."""
    torch.jit.save(torch.jit.script(Doubling()), str(path))


FORMATS = {
    "onnx": ("model.onnx", write_onnx_flow, ["log_prob"]),
    "torchscript": ("model.pt", write_torchscript_flow, ["x", "log_prob"]),
}


def model_dir(tmp_path, fmt: str) -> tuple:
    filename, write, outputs = FORMATS[fmt]
    (tmp_path / "1").mkdir()
    write(tmp_path / "1" / filename)
    config = {
        "default_model_filename": filename,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [2]}],
        "output": [{"name": name, "data_type": "TYPE_FP32", "dims": [2] if name == "x" else [1]} for name in outputs],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {"intra_op_num_threads": {"string_value": "1"}},
    }
    return tmp_path, config


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the runner sets the process's threads, as it may inside Triton


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_runner_runs_requests_as_one_batch_and_splits_the_answers(tmp_path, monkeypatch, keep_torch_threads, fmt):
    runner = load_runner(monkeypatch)
    model = runner.TritonPythonModel()
    model.initialize(runner_args(*model_dir(tmp_path, fmt)))
    calls = []
    run = model.session.run
    monkeypatch.setattr(model.session, "run", lambda *args: calls.append(args) or run(*args))
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(rows, 2)).astype(np.float32) for rows in ROWS]
    responses = model.execute([{"x": StubTensor("x", x)} for x in inputs])
    assert len(calls) == 1
    for x, response in zip(inputs, responses):
        assert response.error is None
        np.testing.assert_allclose(response.outputs["log_prob"], (2 * x).sum(axis=1), rtol=1e-6)
        assert response.outputs["log_prob"].dtype == np.float32
        if fmt == "torchscript":
            np.testing.assert_array_equal(response.outputs["x"], 2 * x)


def test_a_failing_batch_fails_its_requests_with_the_reason(tmp_path, monkeypatch):
    runner = load_runner(monkeypatch)
    model = runner.TritonPythonModel()
    model.initialize(runner_args(*model_dir(tmp_path, "onnx")))
    responses = model.execute([{"x": StubTensor("x", np.zeros((2, 3), np.float32))}] * 2)
    assert [r.error is not None for r in responses] == [True, True]
    assert "flowserve_runner: InvalidArgument" in responses[0].error


def test_a_probe_config_answers_each_request_with_its_inputs(tmp_path, monkeypatch):
    runner = load_runner(monkeypatch)
    model = runner.TritonPythonModel()
    config = {"input": [{"name": "probe_in", "data_type": "TYPE_FP32"}],
              "output": [{"name": "probe_out", "data_type": "TYPE_FP32"}],
              "parameters": {runner.PROBE_PARAMETER: {"string_value": "echo"}}}
    model.initialize(runner_args(tmp_path, config))
    known = [np.arange(6, dtype=np.float32).reshape(2, 3), np.full((1, 3), -1.5, np.float32)]
    responses = model.execute([{"probe_in": StubTensor("probe_in", x)} for x in known])
    for x, response in zip(known, responses):
        np.testing.assert_array_equal(response.outputs["probe_out"], x)


def zeroing_utils() -> types.ModuleType:
    """A stub whose tensors come back as zeros: what ``as_numpy`` does under numpy 2."""
    utils = stub_utils()

    class ZeroingTensor(StubTensor):
        @classmethod
        def from_dlpack(cls, name, source):
            return cls(name, np.zeros_like(StubTensor.from_dlpack(name, source).array))

    utils.Tensor = ZeroingTensor
    return utils


def raising_utils() -> types.ModuleType:
    """A stub that cannot take DLPack at all."""
    utils = stub_utils()

    class NoDLPack(StubTensor):
        @classmethod
        def from_dlpack(cls, name, source):
            raise ValueError("PyCapsule_GetPointer called with incorrect name")

    utils.Tensor = NoDLPack
    return utils


@pytest.mark.parametrize("utils, found", [(zeroing_utils, r"came back as float32\[4, 3\] \[0.0, 0.0"),
                                           (raising_utils, "failed: ValueError: PyCapsule")])
def test_a_stub_whose_round_trip_comes_back_wrong_fails_the_load_naming_numpy(tmp_path, monkeypatch, utils, found):
    runner = load_runner(monkeypatch, utils())
    with pytest.raises(RuntimeError, match=found) as info:
        runner.TritonPythonModel().initialize(runner_args(*model_dir(tmp_path, "onnx")))
    assert f"(numpy {np.__version__})" in str(info.value) and "numpy<2" in str(info.value)


def test_a_gpu_instance_fails_the_load_when_onnx_runtime_has_no_cuda_provider_mocked(tmp_path, monkeypatch):
    runner = load_runner(monkeypatch)
    monkeypatch.setattr(runner.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="a GPU instance, but ONNX Runtime .* has no CUDA execution provider "
                                           r"\(it has CPUExecutionProvider\); install onnxruntime-gpu"):
        runner.TritonPythonModel().initialize(runner_args(*model_dir(tmp_path, "onnx"), kind="GPU"))


def test_a_gpu_instance_fails_the_load_when_the_cuda_provider_cannot_start_mocked(tmp_path, monkeypatch):
    runner = load_runner(monkeypatch)
    real_session = runner.ort.InferenceSession
    monkeypatch.setattr(runner.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    # ONNX Runtime logs why CUDA would not start and falls back to the CPU, as it does here for missing libraries.
    monkeypatch.setattr(runner.ort, "InferenceSession", lambda path, options, providers: real_session(
        path, options, providers=["CPUExecutionProvider"]))
    with pytest.raises(RuntimeError, match="could not start its CUDA execution provider on GPU 0 and would run on "
                                           "the CPU"):
        runner.TritonPythonModel().initialize(runner_args(*model_dir(tmp_path, "onnx"), kind="GPU"))


def test_a_gpu_instance_fails_the_load_when_torch_sees_no_cuda_device_mocked(tmp_path, monkeypatch, keep_torch_threads):
    runner = load_runner(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = f"a GPU instance, but torch {torch.__version__} sees no CUDA device"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        runner.TritonPythonModel().initialize(runner_args(*model_dir(tmp_path, "torchscript"), kind="GPU"))


def test_requests_whose_inputs_disagree_on_rows_fail_instead_of_being_split_wrongly(tmp_path, monkeypatch):
    runner = load_runner(monkeypatch)
    model = runner.TritonPythonModel()
    directory, config = model_dir(tmp_path, "onnx")
    config["input"].append({"name": "context", "data_type": "TYPE_FP32", "dims": [3]})
    model.initialize(runner_args(directory, config))
    monkeypatch.setattr(model.session, "run", lambda *args: [np.zeros(5, np.float32)])
    requests = [{"x": StubTensor("x", np.zeros((rows, 2), np.float32)),
                 "context": StubTensor("context", np.zeros((context_rows, 3), np.float32))}
                for rows, context_rows in ((2, 3), (3, 2))]
    responses = model.execute(requests)
    assert [r.error for r in responses] == ["flowserve_runner: ValueError: input 'context' has [3, 2] rows per "
                                            "request where 'x' has [2, 3]"] * 2


@pytest.mark.parametrize("answer, error", [
    ([np.zeros(1, np.float32)], "output 'log_prob' has 1 rows for 8 input rows"),
    ([], "the model returned 0 output(s) for the config's 1"),
])
def test_an_answer_of_the_wrong_size_fails_its_requests_instead_of_being_split_wrongly(
        tmp_path, monkeypatch, answer, error):
    runner = load_runner(monkeypatch)
    model = runner.TritonPythonModel()
    model.initialize(runner_args(*model_dir(tmp_path, "onnx")))
    monkeypatch.setattr(model.session, "run", lambda *args: answer)
    responses = model.execute([{"x": StubTensor("x", np.zeros((rows, 2), np.float32))} for rows in ROWS])
    assert [r.error for r in responses] == [f"flowserve_runner: ValueError: {error}"] * len(ROWS)


def test_the_runner_and_the_contract_name_the_probe_parameter_alike(monkeypatch):
    assert load_runner(monkeypatch).PROBE_PARAMETER == RUNNER_PROBE_PARAMETER


class RowWise(torch.nn.Module):
    """A stand-in flow of two inputs whose rows are computed each on its own, as a flow's are."""

    def forward(self, x, context):
        shifted = x * torch.exp(context.sum(dim=1, keepdim=True)) + 1
        return shifted, shifted.sum(dim=1)


def recording_capture(replayed: list[int]):
    """What the runner needs of CUDA graph capture, on the CPU: a capture runs the module once
    on the static inputs, and each replay runs it again on whatever they hold, writing into
    the outputs of the capture (and notes the bucket it replayed)."""
    def capture(run, statics):
        outputs = run(*statics)

        def replay():
            replayed.append(statics[0].shape[0])
            for output, again in zip(outputs, run(*statics)):
                output.copy_(again)

        return replay, outputs

    return capture


def test_batches_replay_the_smallest_bucket_that_holds_them_padded_and_the_rest_run_as_they_come(monkeypatch):
    runner, module, replayed = load_runner(monkeypatch), RowWise(), []
    templates = [(torch.float32, [3]), (torch.float32, [2])]
    graphs = runner.CapturedBatches(module, templates, [16, 1, 4], recording_capture(replayed),
                                    lambda shape, dtype: torch.zeros(shape, dtype=dtype))
    assert graphs.buckets == [1, 4, 16] and replayed == []  # captured largest first, none replayed yet
    generator = torch.Generator().manual_seed(0)
    for rows in (16, 5, 1, 3, 4, 17, 40):  # 5 after 16: the padding rows still hold the 16-row batch
        inputs = [torch.randn(rows, 3, generator=generator), torch.randn(rows, 2, generator=generator)]
        for replayed_output, eager_output in zip(graphs(inputs), module(*inputs)):
            assert replayed_output.shape[0] == rows
            torch.testing.assert_close(replayed_output, eager_output, rtol=0, atol=0)
    assert replayed == [16, 16, 1, 4, 4]  # 17 and 40 rows: above the largest bucket


def test_the_runner_and_the_contract_name_the_cuda_graph_parameter_alike(monkeypatch):
    assert load_runner(monkeypatch).CUDA_GRAPH_PARAMETER == CUDA_GRAPH_PARAMETER


def test_buckets_whose_capture_fails_leave_the_model_running_without_graphs(tmp_path, monkeypatch, keep_torch_threads):
    utils = stub_utils()
    runner = load_runner(monkeypatch, utils)
    directory, config = model_dir(tmp_path, "torchscript")
    session = runner.TorchScriptSession(str(directory / "1" / "model.pt"), 1, None, config)
    assert session._capture({**config, "max_batch_size": 64}, [1, 4, 4096]) is None  # CPU torch has no CUDA
    ((level, message),) = utils.logged
    assert level == "warn" and message.startswith("flowserve_runner: no CUDA graphs for buckets [1, 4], running "
                                                  "each batch as it comes: ")
    x = torch.ones(3, 2)
    torch.testing.assert_close(session.run(["x", "log_prob"], ["x"], [x])[0], 2 * x)

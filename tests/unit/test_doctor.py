"""``flowserve doctor``'s checks as functions of a machine and a repository: each failure gives
its ✗ and its fix, GPU checks apply only where a model asks for a GPU. Machines with GPUs are
made up (this one has none); the real machine and Triton are in tests/e2e/test_doctor_live.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers.fake_nvml.pynvml import FakeNvml
from helpers.fakes import write_flow

from flowserve.cli.doctor import (
    FAIL,
    NOT_APPLICABLE,
    OK,
    WARN,
    Machine,
    environment_checks,
    gather_machine,
    model_checks,
    model_file_loads,
    read_models,
)

CPU_ONLY = Machine(python="3.11.7", numpy="1.26.4", onnxruntime="1.31.1",
                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"], torch="2.13.0+cpu",
                   nvml_error="NVMLError_LibraryNotFound: NVML Shared Library Not Found")
TWO_GPUS_MOCKED = replace(CPU_ONLY, torch="2.11.0+cu130", torch_cuda="13.0", cuda_devices=2,
                          gpus=["NVIDIA H100 80GB HBM3, 80 GiB"] * 2, nvml_error="")


def checks_of(machine, tmp_path, cuda_starts=lambda path: None,
              file_loads=lambda model: None) -> dict[str, tuple[str, str, str]]:
    models = read_models(tmp_path)
    checks = environment_checks(machine, models) + model_checks(machine, models, file_loads, cuda_starts)
    return {c.name: (c.status, c.detail, c.fix) for c in checks}


def test_a_cpu_repository_on_a_cpu_machine_passes_and_gpu_checks_do_not_apply(tmp_path):
    write_flow(tmp_path, "moons")
    write_flow(tmp_path, "digits", filename="model.pt")
    checks = checks_of(CPU_ONLY, tmp_path)
    assert {name: status for name, (status, _, _) in checks.items()} == {
        "python": OK, "numpy": OK, "torch": OK, "onnxruntime": OK, "GPUs (NVML)": NOT_APPLICABLE,
        "flow moons": OK, "flow digits": OK}
    assert checks["flow digits"][1] == "density and generation: torchscript on flowserve_runner, KIND_CPU"
    assert "no model asks for a GPU (NVMLError_LibraryNotFound" in checks["GPUs (NVML)"][1]


def test_a_gpu_flow_on_a_machine_without_gpus_fails_with_its_fix(tmp_path):
    write_flow(tmp_path, "moons", kind="KIND_GPU")
    checks = checks_of(CPU_ONLY, tmp_path)
    status, detail, fix = checks["GPUs (NVML)"]
    assert status == FAIL and "a model asks for a GPU, and NVML sees none" in detail
    assert "--instance-kind cpu" in fix
    status, detail, fix = checks["flow moons"]
    assert (status, detail) == (FAIL, "density and generation: asks for a GPU; this machine has none")
    assert "--instance-kind cpu" in fix


def test_a_gpu_torchscript_flow_fails_where_torch_has_no_cuda_device_with_fake_nvml_gpus(tmp_path):
    write_flow(tmp_path, "moons", filename="model.pt", kind="KIND_GPU")
    machine = replace(gather_machine(nvml=FakeNvml()), torch="2.13.0+cpu", torch_cuda=None, cuda_devices=0)
    assert machine.gpus == ["NVIDIA H100 80GB HBM3, 80 GiB"] * 2
    checks = checks_of(machine, tmp_path)
    assert checks["GPUs (NVML)"][0] == OK
    assert checks["flow moons"][:2] == (FAIL, "density and generation: asks for a GPU; torch 2.13.0+cpu "
                                              "(a CPU-only build) sees no CUDA device")


def test_a_gpu_onnx_flow_needs_a_cuda_provider_that_starts_mocked_gpus(tmp_path):
    write_flow(tmp_path, "moons", kind="KIND_GPU")
    assert checks_of(TWO_GPUS_MOCKED, tmp_path)["flow moons"][0] == OK
    failing = checks_of(TWO_GPUS_MOCKED, tmp_path, cuda_starts=lambda path: "it fell back to the CPU")
    assert failing["flow moons"][:2] == (FAIL, "density and generation: asks for a GPU; ONNX Runtime's CUDA "
                                               "provider does not start: it fell back to the CPU")
    no_provider = checks_of(replace(TWO_GPUS_MOCKED, providers=["CPUExecutionProvider"]), tmp_path)
    assert "ONNX Runtime has no CUDA execution provider (install onnxruntime-gpu)" in no_provider["flow moons"][1]


def test_torchscript_flows_without_torch_fail_and_torch_is_optional_otherwise(tmp_path):
    without_torch = replace(CPU_ONLY, torch=None)
    write_flow(tmp_path, "moons")
    assert checks_of(without_torch, tmp_path)["torch"][0] == NOT_APPLICABLE
    write_flow(tmp_path, "digits", filename="model.pt")
    checks = checks_of(without_torch, tmp_path)
    assert checks["torch"][0] == FAIL and checks["torch"][2].startswith("pip install torch")
    assert checks["flow digits"][:2] == (FAIL, "density and generation: TorchScript, and torch is not installed")


def test_a_missing_model_file_fails_and_a_native_backend_is_a_caveat(tmp_path):
    write_flow(tmp_path, "moons", with_files=False)
    write_flow(tmp_path, "native", backend="onnxruntime")
    checks = checks_of(CPU_ONLY, tmp_path)
    assert checks["flow moons"][:2] == (FAIL, "density and generation: model.onnx is missing")
    status, detail, fix = checks["flow native"]
    assert status == WARN and "needs Triton's ONNX Runtime backend, which the embedded Triton lacks" in detail
    assert "--triton-url" in fix


def test_an_unreadable_config_fails_its_flow(tmp_path):
    write_flow(tmp_path, "moons")
    (tmp_path / "moons-density" / "config.pbtxt").write_text("no_such_field: 1\n")
    status, detail, fix = checks_of(CPU_ONLY, tmp_path)["flow moons"]
    assert status == FAIL and detail.startswith("density: cannot read config.pbtxt: ")
    assert "flowserve export ... --name moons" in fix


@pytest.mark.parametrize("version, status", [("1.26.4", OK), ("2.4.6", WARN)])
def test_numpy_2_is_a_caveat_that_the_stub_check_settles(tmp_path, version, status):
    checks = checks_of(replace(CPU_ONLY, numpy=version), tmp_path)
    assert checks["numpy"][0] == status
    if status == WARN:
        assert "DLPack" in checks["numpy"][1] and "numpy<2" in checks["numpy"][2]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_a_model_file_that_does_not_load_fails_its_flow(tmp_path):
    write_flow(tmp_path, "moons")  # empty model.onnx files: no ONNX model
    write_flow(tmp_path, "digits", filename="model.pt")
    checks = checks_of(CPU_ONLY, tmp_path, file_loads=model_file_loads)
    for flow, error in (("moons", "model.onnx does not load: InvalidArgument: "), ("digits", "model.pt does not load: ")):
        status, detail, fix = checks[f"flow {flow}"]
        assert status == FAIL and detail.startswith(f"density and generation: {error}"), detail
        assert fix.startswith(f"export the flow again: flowserve export ... --name {flow}")

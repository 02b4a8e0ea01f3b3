"""``flowserve doctor`` from the command line, without starting Triton (the real stub check is
in tests/e2e/test_doctor_live.py): each fault, injected as a made-up machine, a repository or a
port in use, is a ✗ with its fix and exit code 1, and ``--json`` carries the same checks."""

from __future__ import annotations

import json
import socket
from dataclasses import replace

import pytest
from helpers.fakes import write_flow

from flowserve import cli
from flowserve.cli import doctor
from flowserve.cli.doctor import Machine
from flowserve.server.triton import launcher
from flowserve.server.triton.launcher import TritonLaunchError, free_port


def test_a_port_in_use_fails_with_its_fix_and_json_carries_it(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["doctor", "--skip-triton", "--model-repository", str(tmp_path / "none"), "--port", str(port),
                "--metrics-port", str(free_port())]
        code = cli.main(argv)
        out, err = capsys.readouterr()
        json_code = cli.main([*argv, "--json"])
        json_out, json_err = capsys.readouterr()
        report = json.loads(json_out)
        err += json_err
    assert code == json_code == 1
    lines = out.splitlines()
    failed = lines.index(next(line for line in lines if line.startswith("✗ gateway port")))
    assert f"cannot bind 127.0.0.1:{port}: Address already in use" in lines[failed]
    assert lines[failed + 1].strip() == "fix: stop what holds it, or pass serve (and doctor) another --port"
    assert any(line.startswith("✓ metrics port") for line in lines)
    assert any(line.startswith("– model repository") for line in lines)
    assert err.splitlines() == ["flowserve doctor: error: 1 blocking problem(s): gateway port"] * 2
    assert report["ok"] is False
    assert [c["status"] for c in report["checks"] if c["name"] == "gateway port"] == ["fail"]


NO_GPU = Machine(python="3.11.7", numpy="1.26.4", onnxruntime="1.31.1", providers=["CPUExecutionProvider"],
                 torch="2.13.0+cpu", nvml_error="NVMLError_LibraryNotFound: NVML Shared Library Not Found")


def no_triton():
    raise TritonLaunchError("no embedded Triton: nvidia-pytriton is not installed")


# Each fault: the made-up machine, how the repository is written, and each ✗ it gives with its fix's start.
FAULTS = {
    "gpu flow, no gpu": (NO_GPU, dict(kind="KIND_GPU"), {"GPUs (NVML)": "run on a machine with an NVIDIA GPU",
                                                         "flow moons": "export the flow again"}),
    "torchscript, no torch": (replace(NO_GPU, torch=None), dict(filename="model.pt"),
                              {"torch": "pip install torch", "flow moons": "export the flow again"}),
    "no onnxruntime": (replace(NO_GPU, onnxruntime=None, providers=[]), {},
                       {"onnxruntime": "pip install onnxruntime-gpu"}),
    "missing model file": (NO_GPU, dict(with_files=False), {"flow moons": "export the flow again"}),
    "no triton": (NO_GPU, {}, {"triton": "pip install nvidia-pytriton"}),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_injected_fault_gives_its_cross_its_fix_and_exit_1(tmp_path, monkeypatch, capsys, fault):
    machine, flow_options, crosses = FAULTS[fault]
    write_flow(tmp_path, "moons", **flow_options)
    monkeypatch.setattr(doctor, "gather_machine", lambda: machine)
    monkeypatch.setattr(doctor, "model_file_loads", lambda model: None)  # the files are empty stand-ins
    if fault == "no triton":
        monkeypatch.setattr(launcher.TritonInstallation, "find", no_triton)
    skip = [] if fault == "no triton" else ["--skip-triton"]  # the stub check itself is in tests/e2e
    code = cli.main(["doctor", "--model-repository", str(tmp_path), "--port", str(free_port()),
                     "--metrics-port", str(free_port()), *skip])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert code == 1
    crossed = {line[2:].split("  ")[0].strip(): lines[i + 1].strip() for i, line in enumerate(lines)
               if line.startswith("✗")}
    assert set(crossed) == set(crosses), lines
    for name, fix in crosses.items():
        assert crossed[name].startswith(f"fix: {fix}"), crossed[name]
    assert err == f"flowserve doctor: error: {len(crosses)} blocking problem(s): {', '.join(crossed)}\n"

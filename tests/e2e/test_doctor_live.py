"""``flowserve doctor`` on this machine and its real Triton: every check shown and exit 0, and
a stub whose round trip comes back wrong (a runner made to read zeros) gives its ✗ and fix."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers.processes import hermetic_env

from flowserve import cli
from flowserve.server.triton import launcher
from flowserve.server.triton.launcher import free_port

CHECKS = ["python", "numpy", "torch", "onnxruntime", "GPUs (NVML)", "triton", "triton stub", "gateway port",
          "metrics port"]


def doctor(repository, workdir, *extra: str) -> subprocess.CompletedProcess:
    """``flowserve doctor`` run as a user runs it, from ``workdir``."""
    ports = ["--port", str(free_port()), "--metrics-port", str(free_port())]
    return subprocess.run([sys.executable, "-m", "flowserve.cli", "doctor", "--model-repository", str(repository),
                           *ports, *extra], capture_output=True, text=True, timeout=300, env=hermetic_env(),
                          cwd=workdir)


def test_doctor_on_this_machine_shows_every_check_and_is_ready(repository, tmp_path):
    text = doctor(repository, tmp_path)
    assert text.returncode == 0, text.stdout + text.stderr
    lines = text.stdout.splitlines()
    marks = {line[2:].split("  ")[0].strip(): line[0] for line in lines[:-1] if line[:1] in "✓✗!–"}
    flows = sorted(name for name in marks if name.startswith("flow "))
    assert flows == ["flow moons-large-chunks", "flow moons-small-chunks"]
    assert [name for name in marks if not name.startswith("flow ")] == CHECKS
    assert marks["GPUs (NVML)"] == "–" and all(marks[name] == "✓" for name in CHECKS if name != "GPUs (NVML)")
    assert f"client → Triton → stub (numpy {np.__version__}) → client unchanged" in text.stdout
    assert lines[-1] == "flowserve doctor: ready to serve"

    report = json.loads(doctor(repository, tmp_path, "--json").stdout)
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == list(marks)
    assert {c["status"] for c in report["checks"]} == {"ok", "not applicable"}


# Faults injected into the runner the probe model runs: a stub whose tensors read back as zeros
# (the runner's own check at load refuses it), and one that passes that check but answers zeros
# (the doctor's comparison of the answer catches it).
RUNNER_FAULTS = {
    "reads zeros": ("    return np.from_dlpack(tensor)\n", "    return np.zeros_like(np.from_dlpack(tensor))\n",
                    f"the probe model did not load: Internal: RuntimeError: flowserve_runner: a known float32[4, 3] "
                    f"tensor sent through Triton's Python stub came back as float32[4, 3] [0.0, 0.0, 0.0, 0.0] "
                    f"(numpy {np.__version__})"),
    "answers zeros": ("        return inputs\n", "        return [np.zeros_like(i) for i in inputs]\n",
                      f"a float32[64, 3] tensor came back as 192 value(s) [0.0, 0.0, 0.0, 0.0]..., not as sent "
                      f"(numpy {np.__version__})"),
}


@pytest.mark.parametrize("fault", RUNNER_FAULTS)
def test_doctor_reports_a_stub_that_does_not_answer_what_it_was_sent_injected(tmp_path, monkeypatch, capsys, fault):
    original, replacement, reported = RUNNER_FAULTS[fault]
    build = launcher.TritonInstallation.build_backend_directory

    def faulty_runner(self, target):
        backends = build(self, target)
        runner = backends / "flowserve_runner" / "model.py"
        source = runner.read_text()
        assert source.count(original) == 1
        runner.write_text(source.replace(original, replacement))
        return backends

    monkeypatch.setattr(launcher.TritonInstallation, "build_backend_directory", faulty_runner)
    code = cli.main(["doctor", "--model-repository", str(tmp_path / "none"),
                     "--port", str(free_port()), "--metrics-port", str(free_port())])
    out, err = capsys.readouterr()
    assert code == 1
    stub = next(line for line in out.splitlines() if "triton stub" in line)
    assert stub.startswith("✗ triton stub") and reported in stub, stub
    assert "fix: give the stub's Python" in out and "numpy<2" in out
    assert err == "flowserve doctor: error: 1 blocking problem(s): triton stub\n"

"""benchmarks/gpu_check.py, the prepared GPU check, on this machine: ``prepare`` without the
wheels, then ``run --cpu-only``, the same path without the GPU models and phases. What it
reports on a GPU box is in docs/performance.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers.processes import hermetic_env

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_the_gpu_check_prepares_serves_checks_and_reports_on_the_cpu(tmp_path):
    def gpu_check(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                              env=hermetic_env(), cwd=tmp_path)

    prepared = gpu_check("prepare", "--dir", str(tmp_path / "prepared"), "--steps", "20", "--no-wheels")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    models = sorted(p.name for p in (tmp_path / "prepared" / "repository").glob("*.flowserve.json"))
    assert models == [f"{flow}-{variant}.flowserve.json" for flow, variants in
                      (("maf", ("onnx-cpu", "ts-cpu", "ts-gpu")), ("rnvp", ("onnx-cpu", "onnx-gpu", "ts-cpu", "ts-gpu")))
                      for variant in variants]
    done = gpu_check("run", "--dir", str(tmp_path / "prepared"), "--out", str(tmp_path / "report.json"), "--cpu-only",
                     "--seconds", "0.5", "--rounds", "1", "--workers", "2")
    report = json.loads((tmp_path / "report.json").read_text())
    assert done.returncode == 0 and report["passed"] and report["failures"] == [], done.stdout[-3000:]
    phases = report["phases"]
    assert list(phases) == ["environment", "doctor", "triton", "correctness", "gateway"]
    assert phases["environment"]["committed_stubs"] == "import"
    assert phases["doctor"]["exit_code"] == 0
    assert phases["triton"]["failed_models"] == {}  # the GPU variants were left out
    gaps = phases["correctness"]["gaps"]
    assert sorted(gaps) == sorted(f"{flow}-{variant}-{direction}@{rows}" for flow in ("maf", "rnvp")
                                  for variant in ("onnx-cpu", "ts-cpu") for direction in ("density", "generation",
                                                                                           "encode")
                                  for rows in (1, 64, 100, 4096))
    assert max(gaps.values()) <= 1e-4
    rates = phases["gateway"]["rows_per_s"]
    assert set(rates) == {"triton-direct", "gateway, 1 worker(s)", "gateway, 2 worker(s)"}
    assert all(rate > 0 for rate in rates.values())

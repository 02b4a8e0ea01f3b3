"""The plain install profile, live: ``pip install .`` without the ``export`` extra in a
fresh virtual environment serves a repository exported elsewhere, and has no torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2

from flowserve.server.client import FlowClient

from conftest import SMALL_CHUNKS, expected_samples, start_serve, stop_serve, wait_for_health

ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from: the same sources the gateway image copies.
SOURCES = ("pyproject.toml", "README.md", "flowserve", "export", "server")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory) -> Path:
    """A fresh venv with ``pip install .`` (pinned by constraints.txt) and nothing else."""
    build = tmp_path_factory.mktemp("plain-install")
    source = build / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    venv = build / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip>=25"], check=True, timeout=300)
    subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), str(source)], check=True, timeout=900)
    return venv


def test_a_plain_install_has_no_torch_side(plain_venv):
    python = plain_venv / "bin" / "python"
    for module in ("torch", "onnx", "sklearn", "matplotlib"):
        result = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)
        assert result.returncode == 1 and f"No module named '{module}'" in result.stderr
    result = subprocess.run([str(plain_venv / "bin" / "flowserve"), "train", "--steps", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "'flowserve train' needs the export extra (missing: torch" in result.stderr
    assert "pip install 'flowserve[export]'" in result.stderr


def test_a_plain_install_serves_a_repository_exported_elsewhere(plain_venv, repository, trained_flow, moons,
                                                                 tmp_path):
    process, port, _ = start_serve(repository, tmp_path, python=plain_venv / "bin" / "python")
    target = f"127.0.0.1:{port}"
    try:
        wait_for_health(target, process, health_pb2.HealthCheckResponse.SERVING)
        with FlowClient(target) as client:
            samples = client.sample(SMALL_CHUNKS, 200, seed=4)
            scores = client.log_likelihood(SMALL_CHUNKS, moons["test"])
    finally:
        assert stop_serve(process) == 0
    x, log_prob = expected_samples(trained_flow, 4, 200)
    with torch.no_grad():
        expected_scores = trained_flow.log_prob(torch.from_numpy(moons["test"]))
    np.testing.assert_allclose(samples.x, x, rtol=0, atol=1e-4)
    np.testing.assert_allclose(samples.log_prob, log_prob, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores, expected_scores.numpy(), rtol=0, atol=1e-4)

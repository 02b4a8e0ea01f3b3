"""The Triton launcher: environment, backend directory, and clear errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from flowserve.spec import RUNNER_BACKEND
from flowserve.server.launcher import TritonInstallation, TritonLaunchError, TritonServer

from conftest import processes_mentioning


def test_environment_puts_wheel_libraries_and_this_python_first():
    env = TritonInstallation.find().environment()
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0].endswith("nvidia_pytriton.libs")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_backend_directory_has_python_backend_and_one_runner(tmp_path):
    backends = TritonInstallation.find().build_backend_directory(tmp_path / "backends")
    python = backends / "python"
    assert {p.name for p in python.iterdir()} == {
        "libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"}
    assert os.access(python / "triton_python_backend_stub", os.X_OK)
    runner = (backends / RUNNER_BACKEND / "model.py").read_text()
    assert "class TritonPythonModel" in runner


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(TritonLaunchError, match="does not exist"):
        TritonServer(tmp_path / "nope", tmp_path / "work").start()


@pytest.mark.e2e
def test_triton_failing_to_load_reports_its_log(tmp_path):
    repo = tmp_path / "repo"
    (repo / "broken").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('backend: "no_such_backend"\nmax_batch_size: 1\n')
    server = TritonServer(repo, tmp_path / "work")
    with pytest.raises(TritonLaunchError, match="failed to load model 'broken'") as info:
        server.start(ready_timeout=60)
    assert "tritonserver exited" in str(info.value)
    assert server.log_path.exists()
    assert processes_mentioning(str(repo)) == []


def test_serve_without_a_repository_is_a_clear_cli_error(tmp_path, capsys):
    from flowserve import cli

    assert cli.main(["serve", "--model-repository", str(tmp_path / "nope"), "--triton-url", "127.0.0.1:1"]) == 1
    assert "does not exist" in capsys.readouterr().err

"""The release as a stranger installs it: the built wheel holds every file of the source tree;
installed in a fresh virtual environment, its plain profile serves a repository exported
elsewhere without torch (nor sbi or normflows), and with ``[export,zuko,nflows,sbi,normflows]`` it
imports every adapter and exports a zuko flow.

Each environment installs the wheel (not an editable checkout), pinned by constraints.txt,
and is removed afterwards: the one with torch takes about 2 GB.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from helpers.flows import SMALL_CHUNKS, expected_samples
from helpers.processes import hermetic_env, start_serve, stop_serve, wait_for_health

from flowserve.contract.metadata import FlowMetadata, metadata_path
from flowserve.export.data import two_moons
from flowserve.server.client import FlowClient

ROOT = Path(__file__).resolve().parents[2]
# What the wheel is built from: the same sources the gateway image copies.
SOURCES = ("pyproject.toml", "README.md", "flowserve", "export", "server")
# --no-compile: compiling every module of torch to bytecode took half of a 55 s install.
PIP_INSTALL = ["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
ADAPTERS = ("zuko", "nflows", "sbi", "normflows")
"""flowserve.export.adapters modules, each of which imports its library from an extra."""
ZUKO_BUILDER = '''
import zuko


def build():
    return zuko.flows.MAF(2, transforms=2)
'''


def run(command: list, timeout: float = 900, **options) -> subprocess.CompletedProcess:
    """Run ``command`` in the tests' environment; fail with its output if it fails."""
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=timeout,
                            env=hermetic_env(), **options)
    assert result.returncode == 0, f"{command} exited with {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def installed_files() -> set[str]:
    """Where each file of the package folders lands in an install, by pyproject.toml's
    ``package-dir`` (``export/data.py`` is ``flowserve/export/data.py``)."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    files = set()
    for package, folder in package_dir.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                files.add("/".join([*package.split("."), *path.relative_to(ROOT / folder).parts]))
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps`` of a copy of the sources (the checkout gets no build/ folder)."""
    build = tmp_path_factory.mktemp("wheel")
    source = build / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
         "-w", build / "dist", source], timeout=300)
    (path,) = (build / "dist").glob("flowserve-*.whl")
    return path


def fresh_venv(folder: Path, requirement: str):
    """A new virtual environment in ``folder`` with ``requirement`` installed; removed after."""
    venv = folder / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=120)
    python = venv / "bin" / "python"
    run([python, *PIP_INSTALL, "--upgrade", "pip>=25"], timeout=300)
    run([python, *PIP_INSTALL, "-c", ROOT / "constraints.txt", requirement])
    run([python, "-m", "pip", "check", "--disable-pip-version-check"], timeout=120)
    yield venv
    shutil.rmtree(venv)


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory, wheel) -> Path:
    """The plain profile: the wheel and nothing else."""
    yield from fresh_venv(tmp_path_factory.mktemp("plain-install"), str(wheel))


@pytest.fixture(scope="module")
def export_venv(tmp_path_factory, wheel) -> Path:
    """The wheel with the extras that export flows of flowserve, zuko, nflows, sbi and normflows."""
    yield from fresh_venv(tmp_path_factory.mktemp("export-install"), f"{wheel}[export,zuko,nflows,sbi,normflows]")


def test_the_wheel_holds_every_file_of_the_source_tree(wheel):
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if ".dist-info/" not in name}
    expected = installed_files()
    assert "flowserve/export/adapters/zuko.py" in expected and "flowserve/server/protocol/proto/flowserve.proto" in expected
    missing = sorted(expected - packaged)
    assert not missing, f"the wheel lacks {missing}: list their packages (or data files) in pyproject.toml"
    assert sorted(packaged - expected) == []


def test_a_plain_install_has_no_torch_side(plain_venv):
    python = plain_venv / "bin" / "python"
    for module in ("torch", "onnx", "sklearn", "matplotlib", "sbi", "normflows"):
        result = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True,
                                env=hermetic_env())
        assert result.returncode == 1 and f"No module named '{module}'" in result.stderr
    result = subprocess.run([str(plain_venv / "bin" / "flowserve"), "train", "--steps", "1"],
                            capture_output=True, text=True, timeout=60, env=hermetic_env())
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


def test_the_wheel_with_its_extras_exports_a_zuko_flow(export_venv, tmp_path):
    """``flowserve export --module`` from the installed wheel, run outside the checkout so
    that nothing of it is on sys.path: the adapters are there, and each of the MAF's two
    inverses is exported as a loop."""
    python = export_venv / "bin" / "python"
    adapters = ", ".join(f"flowserve.export.adapters.{library}" for library in ADAPTERS)
    where = run([python, "-c", f"import {adapters}; print(*[m.__file__ for m in ({adapters})])"], timeout=120,
                cwd=tmp_path)
    assert len(where.stdout.split()) == len(ADAPTERS)
    assert all(path.startswith(str(export_venv / "lib")) for path in where.stdout.split())
    (tmp_path / "builder.py").write_text(ZUKO_BUILDER)
    builder: dict = {}
    exec(ZUKO_BUILDER, builder)
    torch.manual_seed(0)
    torch.save(builder["build"]().state_dict(), tmp_path / "flow.pt")
    np.save(tmp_path / "heldout.npy", two_moons(200, seed=1))
    result = run([export_venv / "bin" / "flowserve", "export", "--module", "builder.py:build", "--weights", "flow.pt",
                  "--data", "heldout.npy", "--name", "zuko-maf", "--model-repository", "repo"], timeout=300,
                 cwd=tmp_path)
    meta = FlowMetadata.read(metadata_path(tmp_path / "repo", "zuko-maf"))
    assert meta.family == "zuko" and list(meta.event_shape) == [2], result.stdout
    assert meta.graphs["generation"]["loops"] == 2 and meta.graphs["density"]["loops"] == 0
    for direction in ("density", "generation"):
        assert (tmp_path / "repo" / f"zuko-maf-{direction}" / "1" / "model.onnx").is_file()

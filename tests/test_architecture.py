"""The design's rules, checked on the source: who may import whom, and what each install
profile (plain install, the ``export`` extra, the gateway image) must carry.

See docs/architecture.md for the rooms and the rule.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import hermetic_env

ROOT = Path(__file__).resolve().parents[1]
TORCH_SIDE = ("torch", "onnx", "onnxscript", "sklearn", "matplotlib", "tqdm", "zuko", "nflows", "flowserve.export")
# The torch-free name registries of the torch side, which the CLI's parser reads: these
# modules (and their packages) must import nothing heavy, since every command loads them.
NAME_REGISTRIES = ("flowserve.export.flows.registry", "flowserve.export.data")
NAME_REGISTRY_FILES = [ROOT / "export" / "__init__.py", ROOT / "export" / "flows" / "__init__.py",
                       ROOT / "export" / "flows" / "registry.py", ROOT / "export" / "data.py"]
CLI = ROOT / "flowserve" / "cli"
TORCH_SIDE_COMMANDS = (CLI / "build.py", CLI / "demo.py")
# Distributions the gateway image must not carry.
NOT_IN_THE_GATEWAY = {"torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "nvidia-pytriton",
                      "scikit-learn", "matplotlib", "zuko", "nflows"}
GATEWAY_REQUIREMENTS = ROOT / "deploy" / "docker" / "gateway-requirements.txt"


def imports(path: Path) -> list[tuple[str, bool]]:
    """Modules ``path`` imports, each with whether the import runs when the module loads
    (module level, including ``try`` and ``if`` blocks) rather than inside a function."""
    found = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, module_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module
                if child.level:  # relative: resolve against the package of ``path``
                    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([child.module] if child.module else []))
                found.append((base, module_level))
            visit(child, inner)

    visit(ast.parse(path.read_text()), True)
    return found


def module_name(path: Path) -> str:
    """The dotted name a source file installs as (``export/`` is ``flowserve.export``)."""
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[0] in ("export", "server"):
        parts.insert(0, "flowserve")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def is_under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_relative_imports_resolve_to_the_installed_names():
    assert ("flowserve.export.flows.base", True) in imports(ROOT / "export" / "flows" / "vae.py")
    assert ("flowserve.server.backend", True) in imports(ROOT / "server" / "service.py")
    assert ("flowserve.cli.parser", True) in imports(ROOT / "flowserve" / "cli" / "__init__.py")


RUNNER = ROOT / "server" / "runner" / "model.py"


@pytest.mark.parametrize("path", [p for p in sources("flowserve", "server") if p != RUNNER],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_contract_and_the_runtime_do_not_import_the_torch_side(path):
    """Only the torch-side commands may import the torch side, and only inside a function;
    the parser may read the name registries, inside a function. (The runner runs inside
    Triton, not in the gateway: it imports torch for TorchScript models.)"""
    def allowed(name: str, module_level: bool) -> bool:
        if module_level:
            return False
        return path in TORCH_SIDE_COMMANDS or (path == CLI / "parser.py" and name in NAME_REGISTRIES)

    offending = [name for name, module_level in imports(path)
                 if is_under(name, TORCH_SIDE) and not allowed(name, module_level)]
    assert offending == []


@pytest.mark.parametrize("path", NAME_REGISTRY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_name_registries_import_nothing_heavy_when_loaded(path):
    heavy = ("torch", "onnx", "onnxscript", "sklearn", "matplotlib", "tqdm")
    assert [name for name, module_level in imports(path) if module_level and is_under(name, heavy)] == []


def test_building_the_parser_loads_no_torch_side_package():
    code = ("import sys; from flowserve.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'onnx', 'sklearn', 'matplotlib', 'tqdm') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests",
                            env=hermetic_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_runner_imports_nothing_of_flowserve():
    """Triton loads the runner on its own, from its backend directory."""
    names = [name for name, _ in imports(RUNNER)]
    assert "triton_python_backend_utils" in names
    assert not [name for name in names if is_under(name, ["flowserve"])]


@pytest.mark.parametrize("path", sources("export"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_torch_side_imports_only_the_contract_of_flowserve(path):
    names = [name for name, _ in imports(path) if is_under(name, ["flowserve"])]
    allowed = ["flowserve.export", "flowserve.spec", "flowserve.metadata"]
    assert [name for name in names if not is_under(name, allowed) and name != "flowserve"] == []


@pytest.mark.parametrize("path", [ROOT / "flowserve" / "spec.py", ROOT / "flowserve" / "metadata.py"])
def test_the_contract_imports_only_the_standard_library_and_itself(path):
    names = [name for name, _ in imports(path)]
    assert [name for name in names if not is_under(name, ["flowserve.spec"])
            and name.split(".")[0] not in sys.stdlib_module_names] == []


def test_a_plain_install_carries_no_torch_side_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plain = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    export = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["export"]}
    assert plain.isdisjoint({"torch", "onnx", "onnxscript", "scikit-learn", "matplotlib", "tqdm", "zuko", "nflows"})
    assert {"torch", "onnx", "onnxscript", "scikit-learn", "matplotlib"} <= export


@functools.cache
def providers() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions that provide it."""
    return metadata.packages_distributions()


def gateway_requirements() -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in GATEWAY_REQUIREMENTS.read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line]
    return {canonicalize_name(r.name): r for r in requirements}


def gateway_modules() -> set[str]:
    """Top-level third-party modules the gateway image runs: everything under flowserve/
    and server/ but the torch-side commands (train, export, quality, plot, demo), the
    runner (Triton runs it) and the embedded Triton of ``serve`` without ``--triton-url``;
    plus what loading the name registries that the parser reads imports."""
    paths = [p for p in sources("flowserve", "server") if p not in TORCH_SIDE_COMMANDS and p != RUNNER]
    names = {name.split(".")[0] for path in paths for name, _ in imports(path)} - {"pytriton"}
    names |= {name.split(".")[0] for path in NAME_REGISTRY_FILES for name, module_level in imports(path)
              if module_level}
    return {name for name in names if name in providers() and name != "flowserve"}


def test_the_gateway_image_installs_what_the_gateway_imports_and_nothing_of_the_torch_side():
    requirements = gateway_requirements()
    assert set(requirements).isdisjoint(NOT_IN_THE_GATEWAY)
    provided_by = {name: {canonicalize_name(d) for d in providers()[name]} for name in gateway_modules()}
    assert {"grpc", "numpy", "tritonclient", "prometheus_client", "google"} <= set(provided_by)
    missing = {name: dists for name, dists in provided_by.items() if not dists & set(requirements)}
    assert missing == {}


def test_the_gateway_requirements_are_closed_and_pinned_as_in_constraints():
    requirements = gateway_requirements()
    constraints = {canonicalize_name(Requirement(line).name): Requirement(line)
                   for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if line.strip() and not line.startswith("#")}
    for name, requirement in requirements.items():
        (pin,) = requirement.specifier
        assert pin.operator == "==" and str(constraints[name].specifier) == str(requirement.specifier), name
        for needed in map(Requirement, metadata.distribution(name).requires or []):
            if needed.marker and not any(needed.marker.evaluate({"extra": e}) for e in requirement.extras or {""}):
                continue
            needed_name = canonicalize_name(needed.name)
            assert needed_name in requirements, f"{name} needs {needed_name}"
            assert needed.specifier.contains(next(iter(requirements[needed_name].specifier)).version), needed


def test_the_gateway_dockerfile_installs_flowserve_without_its_dependencies():
    text = (ROOT / "deploy" / "docker" / "gateway.Dockerfile").read_text()
    assert "pip install --requirement gateway-requirements.txt" in text
    assert re.search(r"pip install --no-deps \.$", text, re.MULTILINE)
    assert "torch" not in re.sub(r"#.*", "", text)

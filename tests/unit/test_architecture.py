"""The design's rules, checked on the source: who may import whom (the rooms of
docs/architecture.md, as folder rules), and what each install profile (plain install, the
``export`` extra, the gateway image) must carry."""

from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
TORCH_SIDE = ("torch", "onnx", "onnxscript", "sklearn", "matplotlib", "tqdm", "zuko", "nflows", "flowserve.export")
CONTRACT, CLI, EXPORT = "flowserve.contract", "flowserve.cli", "flowserve.export"
PROTOCOL, GATEWAY, CLIENT, TRITON = (f"flowserve.server.{room}" for room in ("protocol", "gateway", "client", "triton"))


@dataclass(frozen=True)
class Room:
    """A folder of the house: the rooms of flowserve its files may import, and whether they
    may import the torch side (TORCH_SIDE) always, only inside functions, or never."""

    may_import: tuple[str, ...]
    torch_side: str = "never"  # "always", "in functions", "never"


# The folder a file sits in names its room; the deepest folder listed wins. See docs/architecture.md.
ROOMS = {
    "flowserve": Room(()),
    "flowserve/contract": Room((CONTRACT,)),
    "flowserve/cli": Room((CONTRACT, CLI, EXPORT, PROTOCOL, GATEWAY, CLIENT, TRITON), torch_side="in functions"),
    "export": Room((CONTRACT, EXPORT), torch_side="always"),
    "server": Room(()),
    "server/protocol": Room((CONTRACT, PROTOCOL)),
    "server/gateway": Room((CONTRACT, PROTOCOL, GATEWAY)),
    "server/client": Room((CONTRACT, PROTOCOL, CLIENT)),
    "server/triton": Room((CONTRACT, TRITON)),
    # Triton loads the runner on its own, from its backend directory; it imports torch for TorchScript models.
    "server/triton/runner": Room((), torch_side="always"),
}
# The torch-free name registries of the torch side, which the CLI's parser reads: these
# modules (and their packages) must import nothing heavy, since every command loads them.
NAME_REGISTRY_FILES = [ROOT / "export" / "__init__.py", ROOT / "export" / "flows" / "__init__.py",
                       ROOT / "export" / "flows" / "registry.py", ROOT / "export" / "data.py"]
# Distributions the gateway image must not carry.
NOT_IN_THE_GATEWAY = {"torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "nvidia-pytriton",
                      "scikit-learn", "matplotlib", "zuko", "nflows"}
GATEWAY_REQUIREMENTS = ROOT / "deploy" / "docker" / "gateway-requirements.txt"
# Modules the gateway's rooms import only where they may be missing: `flowserve doctor` reports
# ONNX Runtime as not installed in the gateway image, which runs no runner.
OPTIONAL_IN_THE_GATEWAY = {"onnxruntime"}
# The rooms the gateway image runs: all but the torch side (an extra) and the runner (Triton runs it).
GATEWAY_IMAGE_ROOMS = ("flowserve", "flowserve/contract", "flowserve/cli", "server", "server/protocol",
                       "server/gateway", "server/client", "server/triton")


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


def room_of(path: Path) -> str:
    """The deepest folder of ROOMS that holds ``path``."""
    folder = path.parent.relative_to(ROOT).as_posix()
    while folder not in ROOMS:
        assert "/" in folder, f"{path} is in no room of ROOMS"
        folder = folder.rpartition("/")[0]
    return folder


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def files_of(rooms) -> list[Path]:
    return [p for p in sources("flowserve", "export", "server") if room_of(p) in rooms]


def is_under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_relative_imports_resolve_to_the_installed_names():
    assert ("flowserve.export.flows.base", True) in imports(ROOT / "export" / "flows" / "vae.py")
    assert ("flowserve.server.gateway.backend", True) in imports(ROOT / "server" / "gateway" / "service.py")
    assert ("flowserve.cli.parser", True) in imports(ROOT / "flowserve" / "cli" / "__init__.py")


def test_every_source_file_sits_in_a_room():
    assert {room_of(p) for p in sources("flowserve", "export", "server")} == set(ROOMS)


@pytest.mark.parametrize("path", sources("flowserve", "export", "server"), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_file_imports_only_what_its_room_may(path):
    """Of flowserve, only the rooms its folder lists; of the torch side, only what its
    folder allows (the CLI inside the functions of the commands that need it)."""
    room = ROOMS[room_of(path)]
    found = imports(path)
    crossing = [name for name, _ in found
                if is_under(name, ["flowserve"]) and name != "flowserve" and not is_under(name, room.may_import)]
    assert crossing == []
    if room.torch_side != "always":
        heavy = [name for name, module_level in found if is_under(name, TORCH_SIDE)
                 and (room.torch_side == "never" or module_level)]
        assert heavy == []


@pytest.mark.parametrize("path", NAME_REGISTRY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_name_registries_import_nothing_heavy_when_loaded(path):
    heavy = ("torch", "onnx", "onnxscript", "sklearn", "matplotlib", "tqdm")
    assert [name for name, module_level in imports(path) if module_level and is_under(name, heavy)] == []


@pytest.mark.parametrize("path", sources("flowserve/contract"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_contract_imports_only_the_standard_library_and_itself(path):
    names = [name for name, _ in imports(path)]
    assert [name for name in names if not is_under(name, [CONTRACT])
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
    """Top-level third-party modules the gateway image runs: those its rooms import (the CLI
    reaches the torch side only in commands that need the ``export`` extra), plus what loading
    the name registries that the parser reads imports."""
    names = {name.split(".")[0] for path in files_of(GATEWAY_IMAGE_ROOMS) for name, _ in imports(path)
             if not is_under(name, TORCH_SIDE)}
    names |= {name.split(".")[0] for path in NAME_REGISTRY_FILES for name, module_level in imports(path)
              if module_level}
    return {name for name in names if name in providers() and name != "flowserve"} - OPTIONAL_IN_THE_GATEWAY


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

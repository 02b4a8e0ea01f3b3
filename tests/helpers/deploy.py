"""Kustomize builds of deploy/, as a platform team runs them: ``kubectl kustomize`` offline."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TLS_FILES = "/etc/flowserve/tls"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
COMBINATIONS = [[], ["tokens"], ["tls"], ["tls", "tokens"], ["tls", "mtls"], ["tls", "mtls", "tokens"]]
"""The lists of deploy/components/tls, mtls and tokens a user's overlay can add, in order."""


def kustomize(folder: Path) -> subprocess.CompletedProcess:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not on PATH"
    return subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True)


def build(overlay: str) -> str:
    result = kustomize(DEPLOY / "overlays" / overlay)
    assert result.returncode == 0, result.stderr
    return result.stdout


def build_with_components(overlay: str, components: list[str], folder: Path) -> subprocess.CompletedProcess:
    """``kubectl kustomize`` of an overlay, made in ``folder``, of ``overlay`` with
    ``components`` of deploy/components, as a user's overlay adds them."""
    deploy = Path(os.path.relpath(DEPLOY, folder))  # kustomize takes no absolute paths
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(deploy / "overlays" / overlay)],
        "components": [str(deploy / "components" / component) for component in components],
    }))
    return kustomize(folder)


def find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def gateway_container(docs: list[dict]) -> dict:
    (gateway,) = find(docs, "Deployment", "flowserve-gateway")["spec"]["template"]["spec"]["containers"]
    return gateway


def built_gateway(overlay: str, components: list[str], folder: Path) -> dict:
    """The gateway container of ``overlay`` with ``components``, built in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    result = build_with_components(overlay, components, folder)
    assert result.returncode == 0, result.stderr
    return gateway_container(list(yaml.safe_load_all(result.stdout)))


def flag(args: list[str], name: str) -> str | None:
    """The value of ``name=value`` in a container's ``args`` (the manifests' one spelling), or None."""
    values = [a.partition("=")[2] for a in args if a.partition("=")[0] == name]
    assert len(values) <= 1, f"{name} given {len(values)} times"
    return values[0] if values else None


def container_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def probe_port(container: dict, port: int | str) -> int:
    """A probe's port as kubelet resolves it: a number, or the name of a container port."""
    return container_ports(container)[port] if isinstance(port, str) else port

"""The Kubernetes manifests build with kustomize and pass the platform checks.

``kubectl kustomize`` (kubectl is preinstalled on the machines) builds each overlay offline;
``kubernetes-validate --strict`` checks the result against the Kubernetes schemas, and
yamllint checks the sources.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ["gpu", "cpu"]
BIN = Path(sys.executable).parent


def build(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not on PATH"
    return subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)],
                          check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module", params=OVERLAYS)
def built(request, tmp_path_factory) -> tuple[str, list[dict], Path]:
    text = build(request.param)
    path = tmp_path_factory.mktemp("built") / f"{request.param}.yaml"
    path.write_text(text)
    return request.param, [doc for doc in yaml.safe_load_all(text) if doc], path


def validate(path: Path, strict: bool = True) -> subprocess.CompletedProcess:
    command = [str(BIN / "kubernetes-validate"), "--quiet", str(path)]
    return subprocess.run(command[:1] + ["--strict"] * strict + command[1:], capture_output=True, text=True)


def find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_overlays_pass_strict_schema_validation(built):
    _, _, path = built
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_catches_a_misspelled_field(built, tmp_path):
    """An optional field spelled wrong is silently dropped by a lenient check; --strict fails."""
    _, _, path = built
    broken = tmp_path / "broken.yaml"
    broken.write_text(path.read_text().replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:", 1))
    assert validate(broken, strict=False).returncode == 0
    result = validate(broken)
    assert result.returncode != 0
    assert "readOnlyRootFileSystem" in result.stdout + result.stderr


def test_yamllint_passes():
    result = subprocess.run([str(BIN / "yamllint"), "--strict", "-c", str(ROOT / ".yamllint"), str(DEPLOY)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_container_is_hardened_and_resourced(built):
    _, docs, _ = built
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"triton", "flowserve-gateway"}
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
            assert all(port["name"] for port in container["ports"])
            assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)


def test_triton_flags_probes_and_volumes(built):
    overlay, docs, _ = built
    pod = find(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    (triton,) = pod["containers"]
    args = triton["args"]
    assert {"--model-control-mode=none", "--exit-on-error=true"} <= set(args)
    assert any(a.startswith("--pinned-memory-pool-byte-size=") for a in args)
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert [p["name"] for p in triton["ports"]] == ["http", "grpc", "metrics"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
    models_mount = next(m for m in triton["volumeMounts"] if m["name"] == "models")
    assert models_mount["readOnly"] is True
    gpus = triton["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpus == "1" and any(a.startswith("--cuda-memory-pool-byte-size=0:") for a in args)
        assert triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    else:
        assert gpus is None and "--pinned-memory-pool-byte-size=0" in args


def test_gateway_balances_over_a_headless_triton_service_and_drains(built):
    _, docs, _ = built
    assert find(docs, "Service", "triton")["spec"]["clusterIP"] == "None"
    config = find(docs, "ConfigMap", "flowserve-gateway")["data"]
    assert config["FLOWSERVE_TRITON_URL"] == "dns:///triton:8001"
    pod = find(docs, "Deployment", "flowserve-gateway")["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    assert gateway["readinessProbe"]["grpc"]["port"] == 8500
    assert gateway["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["terminationGracePeriodSeconds"] > 5 + 10  # preStop + the gateway's own drain


def test_scaling_and_availability_objects(built):
    _, docs, _ = built
    hpa = find(docs, "HorizontalPodAutoscaler", "triton")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "triton_queue_time_per_request_seconds"
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"} == {"triton", "flowserve-gateway"}
    policy = find(docs, "NetworkPolicy", "triton")
    sources = [rule["from"][0] for rule in policy["spec"]["ingress"]]
    assert sources[0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "flowserve-gateway"}
    assert sources[1]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}

"""The Kubernetes manifests and images pass the checks a platform team would run.

``kubectl kustomize`` (kubectl is preinstalled on the machines) builds each overlay offline;
``kubernetes-validate --strict`` checks the result against the Kubernetes schemas, checkov
against security policy, and yamllint the sources. The Dockerfiles go through tally (which
implements hadolint's rules) and checkov. The linters live in ``.venv/tools/lint``, made by
``scripts/setup.sh --test``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.deploy import (
    COMBINATIONS,
    DEPLOY,
    PROBES,
    TLS_FILES,
    build,
    build_with_components,
    container_ports,
    find,
    flag,
    gateway_container,
    probe_port,
)

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["gpu", "cpu"]
BIN = Path(sys.executable).parent
LINT_BIN = ROOT / ".venv" / "tools" / "lint" / "bin"
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
SECURITY_COMPONENTS = ["tls", "mtls", "tokens"]


@pytest.fixture(scope="module", params=OVERLAYS)
def built(request, tmp_path_factory) -> tuple[str, list[dict], Path]:
    text = build(request.param)
    path = tmp_path_factory.mktemp("built") / f"{request.param}.yaml"
    path.write_text(text)
    return request.param, [doc for doc in yaml.safe_load_all(text) if doc], path


def validate(path: Path, strict: bool = True) -> subprocess.CompletedProcess:
    command = [str(BIN / "kubernetes-validate"), "--quiet", str(path)]
    return subprocess.run(command[:1] + ["--strict"] * strict + command[1:], capture_output=True, text=True)


@pytest.fixture(scope="module", params=OVERLAYS)
def secured(request, tmp_path_factory) -> tuple[str, list[dict], Path]:
    """An overlay with TLS, mutual TLS and tokens: the components in deploy/components."""
    folder = tmp_path_factory.mktemp(f"secured-{request.param}")
    result = build_with_components(request.param, SECURITY_COMPONENTS, folder)
    assert result.returncode == 0, result.stderr
    path = folder / "built.yaml"
    path.write_text(result.stdout)
    return request.param, [doc for doc in yaml.safe_load_all(result.stdout) if doc], path


@pytest.fixture(scope="module", params=COMBINATIONS, ids=lambda components: "+".join(components) or "none")
def combined(request, tmp_path_factory) -> tuple[list[str], list[dict]]:
    """The cpu overlay with each list of security components a user's overlay can add."""
    folder = tmp_path_factory.mktemp("combined")
    result = build_with_components("cpu", request.param, folder)
    assert result.returncode == 0, result.stderr
    return request.param, [doc for doc in yaml.safe_load_all(result.stdout) if doc]


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


def assert_hardened_and_resourced(docs: list[dict]) -> None:
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


def test_every_container_is_hardened_and_resourced(built):
    assert_hardened_and_resourced(built[1])


def test_triton_flags_probes_and_volumes(built):
    overlay, docs, _ = built
    pod = find(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    (triton,) = pod["containers"]
    args = triton["args"]
    assert {"--model-control-mode=explicit", "--load-model=*", "--exit-on-error=true"} <= set(args)
    assert any(a.startswith("--pinned-memory-pool-byte-size=") for a in args)
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    rollout = find(docs, "Deployment", "triton")["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0 and rollout["maxSurge"] >= 1
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
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gateway["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["terminationGracePeriodSeconds"] > 5 + 10  # preStop + the gateway's own drain


def test_the_security_components_pass_strict_validation_and_keep_the_hardening(secured):
    _, docs, path = secured
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_hardened_and_resourced(docs)
    assert_http_port_is_wired(docs)


def test_the_security_components_serve_tls_mtls_and_tokens_from_secrets(secured):
    _, docs, _ = secured
    gateway = gateway_container(docs)
    assert {f"--tls-cert={TLS_FILES}/tls.crt", f"--tls-key={TLS_FILES}/tls.key", f"--tls-client-ca={TLS_FILES}/ca.crt",
            "--tokens-file=/etc/flowserve/tokens/tokens"} <= set(gateway["args"])
    mounts = {m["name"]: m for m in gateway["volumeMounts"]}
    assert (mounts["tls"]["mountPath"], mounts["tokens"]["mountPath"]) == (TLS_FILES, "/etc/flowserve/tokens")
    assert mounts["tls"]["readOnly"] is True and mounts["tokens"]["readOnly"] is True
    pod = find(docs, "Deployment", "flowserve-gateway")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "flowserve-gateway-tls"
    assert volumes["tokens"]["secret"]["secretName"] == "flowserve-gateway-tokens"
    # kubelet has no client certificate: flowserve health does mutual TLS with the gateway's own.
    for probe in (gateway["startupProbe"], gateway["readinessProbe"]):
        assert set(probe) == {"exec", "timeoutSeconds", "periodSeconds", "failureThreshold"}
        command = probe["exec"]["command"]
        assert command[:3] == ["flowserve", "health", "--target=127.0.0.1:8500"]
        assert {f"--tls-ca={TLS_FILES}/ca.crt", f"--tls-cert={TLS_FILES}/tls.crt",
                f"--tls-key={TLS_FILES}/tls.key"} <= set(command)
    assert gateway["livenessProbe"]["tcpSocket"]["port"] == "grpc"


@pytest.mark.parametrize("components", [["mtls"], ["mtls", "tls"]])
def test_mutual_tls_without_tls_before_it_does_not_build(components, tmp_path):
    """mtls tests that tls has made the probes HTTPS: without it the gateway would refuse to start."""
    result = build_with_components("cpu", components, tmp_path)
    assert result.returncode != 0
    assert "readinessProbe/httpGet/scheme failed: test failed" in result.stderr


def assert_http_port_is_wired(docs: list[dict]) -> None:
    """The HTTP API's port: passed as --http-port, declared as the container port "http",
    exposed by the Service, and admitted by the NetworkPolicy from wherever gRPC is."""
    gateway = gateway_container(docs)
    args, ports = gateway["args"], container_ports(gateway)
    assert "--no-http" not in args
    assert ports["http"] == int(flag(args, "--http-port")) == 8501
    assert ports["grpc"] == int(flag(args, "--port")) == 8500
    service = {p["name"]: p for p in find(docs, "Service", "flowserve-gateway")["spec"]["ports"]}
    assert (service["http"]["port"], service["http"]["targetPort"]) == (8501, "http")
    assert {p["targetPort"] for p in service.values()} <= set(ports)
    ingress = find(docs, "NetworkPolicy", "flowserve-gateway")["spec"]["ingress"]

    def sources(port: str) -> list:
        return [rule.get("from") for rule in ingress if {"port": port} in rule["ports"]]

    assert sources("http") == sources("grpc") == [None]  # from any client
    assert sources("metrics") != [None]


def test_the_gateway_serves_http_where_the_service_and_network_policy_say(built):
    assert_http_port_is_wired(built[1])


def test_every_probe_is_one_kubelet_can_pass(combined):
    """kubelet's HTTP probes speak HTTPS without checking the certificate, but present no client
    certificate: plaintext and TLS probe /readyz and /livez on the HTTP port, in the port's
    scheme; mutual TLS probes with flowserve health (gRPC, the gateway's own certificate) and a
    TCP check. Tokens change nothing: health needs none."""
    components, docs = combined
    assert_http_port_is_wired(docs)
    gateway = gateway_container(docs)
    args, ports = gateway["args"], container_ports(gateway)
    assert (flag(args, "--tls-cert") is not None, flag(args, "--tls-client-ca") is not None,
            flag(args, "--tokens-file") is not None) == ("tls" in components, "mtls" in components,
                                                          "tokens" in components)
    startup, readiness, liveness = probes = [gateway[name] for name in PROBES]
    for probe in probes:
        assert len(set(probe) & {"httpGet", "exec", "tcpSocket", "grpc"}) == 1, probe
    if "mtls" not in components:
        scheme = "HTTPS" if "tls" in components else "HTTP"
        assert [(p["httpGet"]["path"], probe_port(gateway, p["httpGet"]["port"]), p["httpGet"].get("scheme", "HTTP"))
                for p in probes] == [("/readyz", 8501, scheme), ("/readyz", 8501, scheme), ("/livez", 8501, scheme)]
        assert readiness["periodSeconds"] == 5
        assert liveness["timeoutSeconds"] >= 5  # a busy event loop is not a stuck one
    else:
        for probe in (startup, readiness):
            command = probe["exec"]["command"]
            assert command[:3] == ["flowserve", "health", f"--target=127.0.0.1:{ports['grpc']}"]
            assert {f"--tls-ca={TLS_FILES}/ca.crt", f"--tls-cert={TLS_FILES}/tls.crt", f"--tls-key={TLS_FILES}/tls.key",
                    "--tls-server-name=flowserve-gateway"} <= set(command)
            assert probe["timeoutSeconds"] > 3  # flowserve health's own --timeout
        assert probe_port(gateway, liveness["tcpSocket"]["port"]) == 8500


def test_scaling_and_availability_objects(built):
    _, docs, _ = built
    hpa = find(docs, "HorizontalPodAutoscaler", "triton")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "triton_queue_time_per_request_seconds"
    budgets = {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert budgets == {"triton", "flowserve-gateway"}
    policy = find(docs, "NetworkPolicy", "triton")
    sources = [rule["from"][0] for rule in policy["spec"]["ingress"]]
    assert sources[0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "flowserve-gateway"}
    assert sources[1]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}


def checkov(*args: str) -> dict:
    """Run checkov offline; returns its JSON report."""
    command = [str(LINT_BIN / "checkov"), *args, "--compact", "--skip-download", "--output", "json"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.stdout.startswith(("{", "[")), result.stdout + result.stderr
    report = json.loads(result.stdout)
    return report[0] if isinstance(report, list) else report


def checkov_without_failures(path: Path) -> dict:
    """checkov's report on the manifests in ``path``, asserted to fail no check."""
    report = checkov("--file", str(path), "--framework", "kubernetes")
    assert report["summary"]["failed"] == 0, [
        (c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    return report


def test_checkov_fails_nothing_and_every_skip_has_a_reason(built):
    _, _, path = built
    report = checkov_without_failures(path)
    assert report["summary"]["passed"] > 100
    for skipped in report["results"]["skipped_checks"]:
        assert len(skipped["check_result"]["suppress_comment"]) > 20, skipped["check_id"]


def test_checkov_fails_nothing_with_the_security_components(secured):
    _, _, path = secured
    checkov_without_failures(path)


def test_checkov_catches_privilege_escalation(built, tmp_path):
    _, _, path = built
    broken = tmp_path / "broken.yaml"
    broken.write_text(path.read_text().replace("allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true", 1))
    report = checkov("--file", str(broken), "--framework", "kubernetes")
    assert "CKV_K8S_20" in {c["check_id"] for c in report["results"]["failed_checks"]}


def tally(*paths: Path) -> subprocess.CompletedProcess:
    command = [str(LINT_BIN / "tally"), "lint", "--fail-level", "style", "--slow-checks", "off",
               "--no-color", "--context", str(ROOT), *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True)


def test_dockerfiles_pass_tally_and_checkov():
    assert [p.name for p in DOCKERFILES] == ["gateway.Dockerfile", "triton.Dockerfile"]
    result = tally(*DOCKERFILES)
    assert result.returncode == 0, result.stdout + result.stderr
    report = checkov("--directory", str(DEPLOY / "docker"), "--framework", "dockerfile")
    assert report["summary"]["failed"] == 0 and report["summary"]["passed"] > 50


def test_dockerfile_linters_catch_a_latest_tag_and_a_root_user(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python\n")
    result = tally(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout  # the "latest" tag
    report = checkov("--file", str(bad), "--framework", "dockerfile")
    assert {"CKV_DOCKER_3", "CKV_DOCKER_7"} <= {c["check_id"] for c in report["results"]["failed_checks"]}


def test_overlays_use_the_images_the_dockerfiles_build(built):
    overlay, docs, _ = built
    tags = {re.search(r"-t (\S+) \.", p.read_text()).group(1) for p in DOCKERFILES}
    images = {c["image"] for d in docs if d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert "ghcr.io/flowserve/gateway:0.1.0" in images & tags
    if overlay == "cpu":
        assert "ghcr.io/flowserve/triton:0.1.0" in images & tags


def test_pod_monitors_scrape_named_metrics_ports(built):
    _, docs, _ = built
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodMonitor"}
    assert set(monitors) == {"triton", "flowserve-gateway"}
    for name, monitor in monitors.items():
        pod = find(docs, "Deployment", name)["spec"]["template"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
        assert "metrics" in ports
    assert find(docs, "PrometheusRule", "flowserve")["metadata"]["namespace"] == "flowserve"
    dashboard = find(docs, "ConfigMap", "flowserve-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["grafana-dashboard.json"])["uid"] == "flowserve"


def test_model_loader_passes_the_same_checks():
    loader = DEPLOY / "model-loader.yaml"
    result = validate(loader)
    assert result.returncode == 0, result.stdout + result.stderr
    report = checkov("--file", str(loader), "--framework", "kubernetes")
    assert report["summary"]["failed"] == 0 and report["summary"]["passed"] > 50
    pod = next(yaml.safe_load_all(loader.read_text()))
    (mount,) = pod["spec"]["containers"][0]["volumeMounts"]
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "flowserve-models"
    assert mount["mountPath"] == "/models" and not mount.get("readOnly")

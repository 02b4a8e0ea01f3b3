"""The gateway's probes, as kubectl kustomize builds them with deploy/components/tls, mtls and
tokens, run the way kubelet runs them against a live gateway that serves what the container's
flags say: they pass while Triton is ready, startup and readiness fail while it is not (liveness
does not), and kubelet's own HTTPS cannot pass mutual TLS, which is why mtls probes with
``flowserve health`` instead."""

from __future__ import annotations

import http.client
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers.deploy import PROBES, TLS_FILES, built_gateway, container_ports, flag, probe_port
from helpers.fakes import UNCONDITIONAL, InMemoryBackend, fake_answer, serve_and_call, write_metadata
from helpers.pki import Pki

from flowserve import cli
from flowserve.server.gateway.app import GatewayConfig
from flowserve.server.gateway.tls import ServerTLS

COMBINATIONS = [[], ["tokens"], ["tls"], ["tls", "mtls", "tokens"]]
TOKEN = "probe-test-token"
TIMEOUT_S = 10  # kubelet's would be timeoutSeconds; a loaded test machine gets longer
PASS, FAIL = True, False


class TritonDown(InMemoryBackend):
    def __init__(self):
        super().__init__(fake_answer)

    async def is_ready(self) -> bool:
        return False


def secret_files(pki: Pki) -> dict[str, Path]:
    """This test's files in place of the Secret's."""
    return {f"{TLS_FILES}/ca.crt": pki.ca, f"{TLS_FILES}/tls.crt": pki.server_cert,
            f"{TLS_FILES}/tls.key": pki.server_key}


def served_config(container: dict, pki: Pki, repository: Path) -> GatewayConfig:
    """The gateway that the container's flags serve (TLS, mutual TLS, tokens, the HTTP port), on
    loopback and free ports, with this test's certificates and token."""
    args, files = container["args"], secret_files(pki)
    cert, key, client_ca = (flag(args, name) for name in ("--tls-cert", "--tls-key", "--tls-client-ca"))
    tls = None if cert is None else ServerTLS.from_files(files[cert], files[key],
                                                         client_ca=None if client_ca is None else files[client_ca])
    repository.mkdir()
    write_metadata(repository, UNCONDITIONAL)
    return GatewayConfig(repository, triton_url="in-memory", host="127.0.0.1", port=0, metrics_port=None,
                         http_port=None if flag(args, "--http-port") is None else 0, tls=tls,
                         tokens=frozenset({TOKEN}) if flag(args, "--tokens-file") else frozenset())


class Kubelet:
    """Runs a container's probes as kubelet does: HTTP(S) GETs that pass on 200-399, check no
    certificate and present none; TCP connects; commands (here ``flowserve health`` in this
    process). ``ports`` maps the container's port numbers to this test's gateway's."""

    def __init__(self, container: dict, ports: dict[int, int], pki: Pki):
        self.container, self.ports, self.files = container, ports, secret_files(pki)

    def __call__(self, probe: dict) -> bool:
        if "httpGet" in probe:
            get = probe["httpGet"]
            return self.get(get.get("scheme", "HTTP").lower(), self.port(get["port"]), get["path"]) in range(200, 400)
        if "tcpSocket" in probe:
            try:
                socket.create_connection(("127.0.0.1", self.port(probe["tcpSocket"]["port"])), TIMEOUT_S).close()
                return PASS
            except OSError:
                return FAIL
        if "exec" in probe:
            command = probe["exec"]["command"]
            for path, replacement in self.files.items():
                command = [argument.replace(path, str(replacement)) for argument in command]
            for port, local in self.ports.items():
                command = [argument.replace(f"127.0.0.1:{port}", f"127.0.0.1:{local}") for argument in command]
            assert command[:2] == ["flowserve", "health"], command
            return cli.main(command[1:]) == 0
        raise AssertionError(f"no stand-in for the probe {probe}")

    def port(self, port: int | str) -> int:
        return self.ports[probe_port(self.container, port)]

    @staticmethod
    def get(scheme: str, port: int, path: str, client: Pki | None = None) -> int | None:
        """The status of a GET (None: no answer), as kubelet asks: no certificate check and, unless
        ``client`` gives one, no client certificate."""
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        if client is not None:
            context.load_cert_chain(client.client_cert, client.client_key)
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}{path}", timeout=TIMEOUT_S,
                                        context=context) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except (OSError, http.client.HTTPException):  # refused, or the handshake or the answer failed
            return None


def probe(container: dict, config: GatewayConfig, pki: Pki, backend: InMemoryBackend | None = None) -> dict:
    """Each of ``container``'s probes run against the gateway of ``config``, and the status of a
    token-less GET /v1/models (with a client certificate) beside them."""
    ports = container_ports(container)

    def calls(target: str, http_url: str) -> dict:
        local = urlsplit(http_url)
        kubelet = Kubelet(container, {ports["grpc"]: int(target.rpartition(":")[2]), ports["http"]: local.port}, pki)
        results = {name: kubelet(container[name]) for name in PROBES}
        return {**results, "/v1/models": Kubelet.get(local.scheme, local.port, "/v1/models", client=pki)}

    return serve_and_call(config, calls, backend)[0]


@pytest.mark.parametrize("components", COMBINATIONS, ids=lambda components: "+".join(components) or "none")
def test_the_built_probes_pass_on_the_gateway_the_manifests_serve(components, pki, tmp_path, capsys):
    container = built_gateway("cpu", components, tmp_path / "built")
    config = served_config(container, pki, tmp_path / "repository")
    models = 401 if "tokens" in components else 200  # the probes' paths are open, the API is not
    assert probe(container, config, pki) == {
        "startupProbe": PASS, "readinessProbe": PASS, "livenessProbe": PASS, "/v1/models": models}
    assert probe(container, config, pki, TritonDown()) == {
        "startupProbe": FAIL, "readinessProbe": FAIL, "livenessProbe": PASS, "/v1/models": models}
    if "mtls" in components:  # flowserve health's answers
        assert capsys.readouterr().out == "SERVING\n" * 2 + "NOT_SERVING\n" * 2


def test_kubelet_https_probes_cannot_pass_mutual_tls(pki, tmp_path, capsys):
    """The HTTPS probes of components/tls alone fail on the gateway that mtls makes, ready or
    not: kubelet has no client certificate. mtls's own probes pass there (the test above)."""
    one_sided = built_gateway("cpu", ["tls"], tmp_path / "tls")
    mutual = built_gateway("cpu", ["tls", "mtls"], tmp_path / "mtls")
    assert [one_sided[name]["httpGet"]["scheme"] for name in PROBES] == ["HTTPS"] * 3
    results = probe(one_sided, served_config(mutual, pki, tmp_path / "repository"), pki)
    assert results == {"startupProbe": FAIL, "readinessProbe": FAIL, "livenessProbe": FAIL, "/v1/models": 200}

"""The readiness probes of deploy/components/tls and mtls, built by kubectl kustomize, pass
on a mutual-TLS gateway."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers.deploy import TLS_FILES, build_with_components, gateway_container
from helpers.fakes import UNCONDITIONAL, serve_and_call, write_metadata
from helpers.pki import Pki

from flowserve import cli
from flowserve.server.gateway.app import GatewayConfig
from flowserve.server.gateway.tls import ServerTLS
from flowserve.server.triton.launcher import free_port


@pytest.fixture
def config(tmp_path) -> GatewayConfig:
    write_metadata(tmp_path, UNCONDITIONAL)
    return GatewayConfig(tmp_path, triton_url="in-memory", host="127.0.0.1", port=0, metrics_port=free_port())


def probe_command(folder: Path, components: list[str], pki: Pki, target: str) -> list[str]:
    """The readiness probe's command of the gateway built (in ``folder``) with ``components``,
    on this test's files and gateway instead of the Secret's and the pod's."""
    folder.mkdir()
    result = build_with_components("cpu", components, folder)
    assert result.returncode == 0, result.stderr
    command = gateway_container(list(yaml.safe_load_all(result.stdout)))["readinessProbe"]["exec"]["command"]
    files = {f"{TLS_FILES}/ca.crt": pki.ca, f"{TLS_FILES}/tls.crt": pki.server_cert,
             f"{TLS_FILES}/tls.key": pki.server_key}
    for path, replacement in files.items():
        command = [argument.replace(path, str(replacement)) for argument in command]
    return [argument.replace("127.0.0.1:8500", target) for argument in command]


def test_the_probes_of_the_deploy_components_pass_on_a_mutual_tls_gateway(config, pki, tmp_path, capsys):
    """deploy/components/tls and mtls probe with ``flowserve health`` on 127.0.0.1, the name
    flowserve-gateway and, for mutual TLS, the gateway's own certificate."""
    config.tls = ServerTLS.from_files(pki.server_cert, pki.server_key, client_ca=pki.ca)

    def calls(target: str) -> tuple[int, int]:
        mutual = probe_command(tmp_path / "mtls", ["tls", "mtls"], pki, target)
        one_sided = probe_command(tmp_path / "tls", ["tls"], pki, target)
        assert mutual[:2] == one_sided[:2] == ["flowserve", "health"]
        return cli.main(mutual[1:]), cli.main(one_sided[1:])

    (mutual, one_sided), _ = serve_and_call(config, calls)
    out, err = capsys.readouterr()
    assert (mutual, one_sided) == (0, 1)
    assert out == "SERVING\n"
    assert "flowserve health: UNAVAILABLE" in err

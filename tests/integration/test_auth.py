"""TLS, mutual TLS and bearer tokens on the gateway, its Python client and the CLI.

The certificates are real, made with ``cryptography`` (tests/helpers/pki.py). The gateway is
the real one (interceptors, servicer, service, gRPC over TCP) in front of the in-memory
backend."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers.fakes import UNCONDITIONAL, InMemoryBackend, fake_answer, serve_and_call, write_metadata
from helpers.processes import hermetic_env

from flowserve import cli
from flowserve.server.client import FlowClient
from flowserve.server.gateway.app import GatewayConfig
from flowserve.server.gateway.auth import accepted_tokens
from flowserve.server.gateway.tls import ServerTLS
from flowserve.server.protocol.auth import read_tokens
from flowserve.server.protocol.proto import flowserve_pb2 as pb
from flowserve.server.protocol.tls import ClientTLS
from flowserve.server.triton.launcher import free_port

TOKEN = "s3cr3t-Token_for.tests~1+2/3=="
OTHER_TOKEN = "an0ther-token"
WRONG_TOKEN = "not-a-known-token"
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DENIED = "the token is not accepted by this gateway"


@pytest.fixture
def config(tmp_path) -> GatewayConfig:
    write_metadata(tmp_path, UNCONDITIONAL)
    return GatewayConfig(tmp_path, triton_url="in-memory", host="127.0.0.1", port=0, metrics_port=free_port())


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code ``call`` ends with."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def list_models(target: str, **client_options) -> grpc.StatusCode:
    """The status of ListModels through a FlowClient with ``client_options``."""
    with FlowClient(target, timeout=10, **client_options) as client:
        return code_of(client.list_models)


# TLS and mutual TLS


def test_tls_serves_clients_that_trust_its_ca_and_no_others(config, pki):
    config.tls = ServerTLS.from_files(pki.server_cert, pki.server_key)

    def calls(target: str) -> dict[str, grpc.StatusCode]:
        localhost = target.replace("127.0.0.1", "localhost")
        elsewhere = ClientTLS.from_files(pki.ca, server_name="elsewhere")
        return {
            "right CA": list_models(target, tls=ClientTLS.from_files(pki.ca)),
            "right CA, by name": list_models(localhost, tls=ClientTLS.from_files(pki.ca)),
            "plaintext": list_models(target),
            "another CA": list_models(target, tls=ClientTLS.from_files(pki.other_ca)),
            "gRPC's default roots": list_models(target, tls=ClientTLS()),
            "a name the certificate lacks": list_models(target, tls=elsewhere),
        }

    codes, _ = serve_and_call(config, calls)
    assert codes == {"right CA": grpc.StatusCode.OK, "right CA, by name": grpc.StatusCode.OK, "plaintext": UNAVAILABLE,
                     "another CA": UNAVAILABLE, "gRPC's default roots": UNAVAILABLE,
                     "a name the certificate lacks": UNAVAILABLE}


def test_mutual_tls_serves_only_clients_with_a_certificate_of_its_client_ca(config, pki):
    config.tls = ServerTLS.from_files(pki.server_cert, pki.server_key, client_ca=pki.ca)

    def calls(target: str) -> dict[str, grpc.StatusCode]:
        def client(cert: Path | None = None, key: Path | None = None) -> grpc.StatusCode:
            return list_models(target, tls=ClientTLS.from_files(pki.ca, cert, key))

        return {
            "no certificate": client(),
            "another CA's": client(pki.other_client_cert, pki.other_client_key),
            "the client CA's": client(pki.client_cert, pki.client_key),
            "the gateway's own": client(pki.server_cert, pki.server_key),
        }

    codes, _ = serve_and_call(config, calls)
    assert codes == {"no certificate": UNAVAILABLE, "another CA's": UNAVAILABLE,
                     "the client CA's": grpc.StatusCode.OK, "the gateway's own": grpc.StatusCode.OK}


def test_the_health_command_fails_while_the_gateway_cannot_serve(config, capsys):
    async def not_ready() -> bool:
        return False

    backend = InMemoryBackend(fake_answer)
    backend.is_ready = not_ready
    code, _ = serve_and_call(config, lambda target: cli.main(["health", "--target", target]), backend)
    out, err = capsys.readouterr()
    assert (code, out) == (1, "NOT_SERVING\n")
    assert err.startswith("flowserve health: error: the gateway at 127.0.0.1:") and err.endswith(" is NOT_SERVING\n")


@pytest.mark.parametrize(("files", "message"), [
    (("server_cert", None), "TLS needs both a certificate and its key; got only the certificate"),
    ((None, "server_key"), "TLS needs both a certificate and its key; got only the key"),
    (("server_cert", "client_key"), "TLS key {client_key} is not the key of certificate {server_cert}"),
    (("server_cert", "encrypted_server_key"),
     "TLS key {encrypted_server_key}: the key is encrypted; gRPC needs an unencrypted PEM key"),
    (("server_key", "server_key"), "TLS certificate {server_key} holds no PEM CERTIFICATE"),
    (("server_cert", "server_cert"), "TLS key {server_cert} holds no PEM PRIVATE KEY"),
    ((None, None, "ca"), "a client CA (mutual TLS) needs the server's TLS certificate and key too"),
    (("server_cert", "server_key", "server_key"), "client CA {server_key} holds no PEM CERTIFICATE"),
])
def test_serve_stops_before_starting_anything_when_its_tls_files_do_not_fit(pki, tmp_path, capsys, files, message):
    options = ["--tls-cert", "--tls-key", "--tls-client-ca"]
    arguments = [item for option, name in zip(options, files) if name
                 for item in (option, str(getattr(pki, name)))]
    assert cli.main(["serve", "--model-repository", str(tmp_path), *arguments]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flowserve serve: error: ") and message.format(**vars(pki)) in err


# Tokens


def test_without_a_token_rpcs_are_unauthenticated_and_with_a_wrong_one_denied_and_counted(config, caplog):
    config.tokens = frozenset({TOKEN, OTHER_TOKEN})
    sample = pb.SampleRequest(model=UNCONDITIONAL, num_samples=2, seed=1)
    score = pb.LogLikelihoodRequest(model=UNCONDITIONAL, x=pb.Tensor(shape=[1, 1, 2, 2], data=bytes(16)))

    def calls(target: str) -> dict:
        answers = {}
        for label, metadata in [("none", ()), ("basic", (("authorization", f"Basic {TOKEN}"),)),
                                ("bearer without a token", (("authorization", "Bearer "),)),
                                ("wrong", (("authorization", f"Bearer {WRONG_TOKEN}"),)),
                                ("right", (("authorization", f"bearer {OTHER_TOKEN}"),))]:
            with FlowClient(target, timeout=10) as client:
                options = {"metadata": metadata, "timeout": 10}
                rpcs = {"ListModels": lambda: client.stub.ListModels(pb.ListModelsRequest(), **options),
                        "Sample": lambda: client.stub.Sample(sample, **options),
                        "SampleStream": lambda: list(client.stub.SampleStream(sample, **options)),
                        "LogLikelihood": lambda: client.stub.LogLikelihood(score, **options)}
                for method, rpc in rpcs.items():
                    try:
                        rpc()
                        answers[label, method] = (grpc.StatusCode.OK, "")
                    except grpc.RpcError as exc:
                        answers[label, method] = (exc.code(), exc.details())
        return answers

    with caplog.at_level(logging.DEBUG):
        answers, registry = serve_and_call(config, calls)
    methods = ["ListModels", "Sample", "SampleStream", "LogLikelihood"]
    expected = {"none": grpc.StatusCode.UNAUTHENTICATED, "basic": grpc.StatusCode.UNAUTHENTICATED,
                "bearer without a token": grpc.StatusCode.UNAUTHENTICATED,
                "wrong": grpc.StatusCode.PERMISSION_DENIED, "right": grpc.StatusCode.OK}
    assert {key: code for key, (code, _) in answers.items()} == {
        (label, method): code for label, code in expected.items() for method in methods}
    assert answers["none", "Sample"][1] == "this gateway needs a token: send 'authorization: Bearer <token>' (gRPC metadata or HTTP header)"
    assert answers["basic", "Sample"][1] == "the authorization is not one 'Bearer <token>'"
    assert answers["wrong", "Sample"][1] == DENIED
    for method in methods:
        counted = {code: registry.get_sample_value(
            "flowserve_requests_total", {"method": method, "model": "unknown", "code": code, "protocol": "grpc"})
            for code in ("UNAUTHENTICATED", "PERMISSION_DENIED")}
        assert counted == {"UNAUTHENTICATED": 3, "PERMISSION_DENIED": 1}
    ok = {"method": "LogLikelihood", "model": UNCONDITIONAL, "code": "OK", "protocol": "grpc"}
    assert registry.get_sample_value("flowserve_requests_total", ok) == 1
    for token in (TOKEN, OTHER_TOKEN, WRONG_TOKEN):
        assert token not in caplog.text
        assert all(token not in details for _, details in answers.values())
    assert "Traceback" not in caplog.text
    assert TOKEN not in repr(config)


def test_health_is_open_while_reflection_needs_the_token(config):
    config.tokens = frozenset({TOKEN})

    def calls(target: str) -> dict[str, grpc.StatusCode]:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

            def list_services(metadata=()):
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                (response,) = reflection.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
                return sorted(s.name for s in response.list_services_response.service)

            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert "flowserve.v1.FlowService" in list_services((("authorization", f"Bearer {TOKEN}"),))
            return {"health": code_of(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10)),
                    "reflection": code_of(list_services),
                    "an unknown method": code_of(lambda: channel.unary_unary("/flowserve.v1.FlowService/Nothing")(
                        b"", timeout=10))}

    codes, registry = serve_and_call(config, calls)
    assert codes == {"health": grpc.StatusCode.OK, "reflection": grpc.StatusCode.UNAUTHENTICATED,
                     "an unknown method": grpc.StatusCode.UNIMPLEMENTED}
    # Only FlowService RPCs are counted, and a method that does not exist never becomes a label.
    counted = {sample.labels["method"] for metric in registry.collect() if metric.name == "flowserve_requests"
               for sample in metric.samples}
    assert counted == set()


def test_the_python_client_sends_its_token_over_tls(config, pki):
    config.tls = ServerTLS.from_files(pki.server_cert, pki.server_key)
    config.tokens = frozenset({TOKEN})
    tls = ClientTLS.from_files(pki.ca)

    def calls(target: str):
        with FlowClient(target, timeout=10, tls=tls, token=TOKEN) as client:
            names = [m.name for m in client.list_models()]
            samples = client.sample(UNCONDITIONAL, 3, seed=4)
            chunks = list(client.sample_stream(UNCONDITIONAL, 6, seed=4))
            scores = client.score(UNCONDITIONAL, samples.x)
        return names, samples, chunks, scores, list_models(target, tls=tls, token=WRONG_TOKEN)

    (names, samples, chunks, scores, wrong), _ = serve_and_call(config, calls)
    assert names == [UNCONDITIONAL]
    assert samples.x.shape[0] == 3 and [len(chunk.x) for chunk in chunks] == [4, 2]
    assert scores.log_prob.shape == (3,)
    assert wrong == grpc.StatusCode.PERMISSION_DENIED


def test_the_client_refuses_a_token_that_cannot_travel_without_echoing_it():
    with pytest.raises(ValueError) as info:
        FlowClient("127.0.0.1:1", token="two words")
    assert "two words" not in str(info.value) and "not a bearer token" in str(info.value)


def test_the_cli_takes_tls_and_a_token_from_a_file_or_the_environment(config, pki, tmp_path, capsys, monkeypatch):
    config.tls = ServerTLS.from_files(pki.server_cert, pki.server_key, client_ca=pki.ca)
    config.tokens = frozenset({TOKEN})
    token_file, wrong_file = tmp_path / "token", tmp_path / "wrong"
    token_file.write_text(f"# the test's token\n\n{TOKEN}\n")
    wrong_file.write_text(WRONG_TOKEN)
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    points = tmp_path / "points.npy"
    np.save(points, np.zeros((2, 1, 2, 2), np.float32))

    def calls(target: str) -> dict[str, tuple[int, str, str]]:
        def models(*options: str) -> tuple[int, str, str]:
            code = cli.main(["models", "--target", target, "--timeout", "10", *tls, *options])
            return code, *capsys.readouterr()

        answers = {"file": models("--token-file", str(token_file)),
                   "wrong file": models("--token-file", str(wrong_file)), "none": models()}
        monkeypatch.setenv("FLOWSERVE_TOKEN_FILE", str(token_file))
        answers["env file"] = models()
        monkeypatch.delenv("FLOWSERVE_TOKEN_FILE")
        monkeypatch.setenv("FLOWSERVE_TOKEN", TOKEN)
        answers["env"] = models()
        answers["file over env"] = models("--token-file", str(wrong_file))
        sample = cli.main(["sample", "--target", target, "--timeout", "10", *tls, "--model", UNCONDITIONAL, "-n", "3"])
        answers["sample with env"] = sample, *capsys.readouterr()
        score = cli.main(["score", "--target", target, "--timeout", "10", *tls, "--model", UNCONDITIONAL, str(points)])
        answers["score with env"] = score, *capsys.readouterr()
        return answers

    answers, _ = serve_and_call(config, calls)
    assert {label: code for label, (code, _, _) in answers.items()} == {
        "file": 0, "wrong file": 1, "none": 1, "env file": 0, "env": 0, "file over env": 1, "sample with env": 0,
        "score with env": 0}
    assert answers["file"][1].startswith(f"{UNCONDITIONAL}: vae, event shape [1, 2, 2]")
    assert answers["env"][1] == answers["file"][1]
    assert answers["wrong file"][2] == f"flowserve models: PERMISSION_DENIED: {DENIED}\n"
    assert answers["none"][2].startswith("flowserve models: UNAUTHENTICATED: ")
    assert answers["sample with env"][1].startswith(f"3 samples from {UNCONDITIONAL}")
    assert answers["score with env"][1].startswith(f"scored 2 rows with {UNCONDITIONAL}")
    for _, out, err in answers.values():
        assert TOKEN not in out + err and WRONG_TOKEN not in out + err


def test_the_tls_flag_trusts_grpcs_default_roots(config, pki, tmp_path):
    """``--tls`` alone checks the gateway against gRPC's default roots, which the file in
    GRPC_DEFAULT_SSL_ROOTS_FILE_PATH replaces; in a fresh process, since gRPC reads them once."""
    config.tls = ServerTLS.from_files(pki.server_cert, pki.server_key)

    def calls(target: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "flowserve.cli", "models", "--target", target, "--tls", "--timeout", "10"]
        env = hermetic_env(GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=str(pki.ca))
        # In tmp_path: ``python -m`` puts the working directory first on sys.path.
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    result, _ = serve_and_call(config, calls)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{UNCONDITIONAL}: vae")


@pytest.mark.parametrize(("options", "message"), [
    (["--tls-cert", "CLIENT_CERT"], "a client certificate needs both a certificate and its key; got only the "
                                    "certificate"),
    (["--tls-ca", "CLIENT_KEY"], "TLS CA {CLIENT_KEY} holds no PEM CERTIFICATE"),
    (["--token-file", "TWO_TOKENS"], "must hold one token; it holds 2"),
    (["--token-file", "NO_TOKEN"], "must hold one token; it holds 0"),
])
def test_client_commands_say_what_is_wrong_with_their_options(pki, tmp_path, capsys, options, message):
    (tmp_path / "two").write_text(f"{TOKEN}\n{OTHER_TOKEN}\n")
    (tmp_path / "none").write_text("# nothing yet\n")
    files = {"CLIENT_CERT": pki.client_cert, "CLIENT_KEY": pki.client_key, "TWO_TOKENS": tmp_path / "two",
             "NO_TOKEN": tmp_path / "none"}
    arguments = [str(files.get(option, option)) for option in options]
    assert cli.main(["models", "--target", "127.0.0.1:1", *arguments]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flowserve models: error: ") and message.format(**files) in err and TOKEN not in err


def test_tokens_come_from_a_file_and_the_environment_and_comments_are_skipped(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# who holds which\n{TOKEN}  # the batch jobs\n\n   \n{OTHER_TOKEN}\n")
    assert read_tokens(path) == [TOKEN, OTHER_TOKEN]
    assert accepted_tokens(path, None, "env") == {TOKEN, OTHER_TOKEN}
    assert accepted_tokens(None, f" {TOKEN},{OTHER_TOKEN}\n", "env") == {TOKEN, OTHER_TOKEN}
    assert accepted_tokens(path, "third", "env") == {TOKEN, OTHER_TOKEN, "third"}
    assert accepted_tokens(None, None, "env") == frozenset()


@pytest.mark.parametrize(("contents", "env", "message"), [
    ("# nobody yet\n\n", None, "token authentication is asked for, but {file} hold no token"),
    (None, " , ", "token authentication is asked for, but env FLOWSERVE_TOKENS hold no token"),
    ("# nobody\n", "", "token authentication is asked for, but {file} and env FLOWSERVE_TOKENS hold no token"),
    (f"{TOKEN}\nhas space\n", None, "line 2 of {file} is not a bearer token"),
    (None, f"{TOKEN};x", "env FLOWSERVE_TOKENS holds something that is not a bearer token"),
])
def test_serve_stops_when_token_authentication_has_no_usable_token(tmp_path, capsys, monkeypatch, contents, env,
                                                                     message):
    arguments = []
    if contents is not None:
        (tmp_path / "tokens").write_text(contents)
        arguments = ["--tokens-file", str(tmp_path / "tokens")]
    if env is not None:
        monkeypatch.setenv("FLOWSERVE_TOKENS", env)
    assert cli.main(["serve", "--model-repository", str(tmp_path), *arguments]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flowserve serve: error: ")
    assert message.format(file=tmp_path / "tokens") in err
    assert TOKEN not in err and "has space" not in err


def test_serve_takes_its_tokens_file_from_the_environment_too(tmp_path, capsys, monkeypatch):
    (tmp_path / "tokens").write_text("# nobody yet\n")
    monkeypatch.setenv("FLOWSERVE_TOKENS_FILE", str(tmp_path / "tokens"))
    assert cli.main(["serve", "--model-repository", str(tmp_path)]) == 1
    assert f"token authentication is asked for, but {tmp_path / 'tokens'} hold no token" in capsys.readouterr().err

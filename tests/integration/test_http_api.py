"""The HTTP/JSON API on the real gateway (aiohttp on loopback, beside gRPC) in front of the
in-memory backend: answers equal to gRPC's, .npy both ways, errors with gRPC's meaning,
limits, tokens, TLS, CORS and metrics labelled by protocol."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import requests
from helpers import fakes
from helpers.fakes import CONDITIONAL, UNCONDITIONAL, InMemoryBackend, fake_answer, npy_bytes, serve_and_call
from helpers.processes import poll_until

from flowserve.contract.spec import ALL_DIRECTIONS, triton_model_name
from flowserve.server.client import FlowClient
from flowserve.server.gateway.app import GatewayConfig
from flowserve.server.gateway.service import GatewayLimits
from flowserve.server.gateway.tls import ServerTLS
from flowserve.server.protocol.errors import BackendUnavailable
from flowserve.server.protocol.tensors import MAX_MESSAGE_BYTES

NPY = "application/x-npy"
TOKEN = "http-t0ken"


@pytest.fixture
def config(tmp_path) -> GatewayConfig:
    fakes.write_metadata(tmp_path, UNCONDITIONAL, family="realnvp", noise_dim=fakes.EVENT_DIM,
                         models={d: triton_model_name(UNCONDITIONAL, d) for d in ALL_DIRECTIONS})
    fakes.write_metadata(tmp_path, CONDITIONAL, family="realnvp", context_shape=[3], noise_dim=fakes.NOISE_DIM)
    return GatewayConfig(tmp_path, triton_url="in-memory", host="127.0.0.1", port=0, metrics_port=None, http_port=0)


def npy_of(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == NPY
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def test_json_and_npy_answers_equal_grpcs_for_the_same_seed_and_rows(config):
    x = np.random.default_rng(0).normal(size=(5, *fakes.EVENT_SHAPE)).astype(np.float32)
    contexts = np.arange(6, dtype=np.float32).reshape(2, 3)
    rows = np.empty(5, [("x", "<f4", fakes.EVENT_SHAPE), ("context", "<f8", (3,))])  # a row's x beside its context
    rows["x"], rows["context"] = x, contexts[0]

    def calls(target: str, http: str) -> dict:
        with FlowClient(target, timeout=10) as client:
            grpc = {"sample": client.sample(UNCONDITIONAL, 7, seed=11),
                    "per_context": client.sample(CONDITIONAL, seed=3, context=contexts, samples_per_context=4),
                    "scores": client.score(UNCONDITIONAL, x, return_bits_per_dim=True),
                    "conditional": client.log_likelihood(CONDITIONAL, x, contexts[0]),
                    "encoded": client.encode(UNCONDITIONAL, x)}
        model = f"{http}/v1/models"
        sample = {"num_samples": 7, "seed": 11, "return_log_prob": True}
        return {
            "grpc": grpc,
            "sample": requests.post(f"{model}/{UNCONDITIONAL}/sample", json=sample, timeout=10).json(),
            "sample_npy": npy_of(requests.post(f"{model}/{UNCONDITIONAL}/sample", params=sample | {
                "return_log_prob": "true"}, headers={"Accept": NPY}, timeout=10)),
            "stream": requests.post(f"{model}/{UNCONDITIONAL}/sample-stream", json=sample, timeout=10).text,
            "per_context": requests.post(f"{model}/{CONDITIONAL}/sample", json={
                "seed": 3, "context": contexts.tolist(), "samples_per_context": 4, "return_log_prob": True},
                timeout=10).json(),
            "per_context_npy": npy_of(requests.post(
                f"{model}/{CONDITIONAL}/sample?seed=3&samples_per_context=4&return_log_prob=true",
                data=npy_bytes(contexts.astype(">f8")), headers={"Content-Type": NPY, "Accept": NPY}, timeout=10)),
            "scores": requests.post(f"{model}/{UNCONDITIONAL}/log-likelihood", json={
                "x": x.tolist(), "return_bits_per_dim": True}, timeout=10).json(),
            "scores_npy": npy_of(requests.post(f"{model}/{UNCONDITIONAL}/log-likelihood", data=npy_bytes(x),
                                               headers={"Content-Type": NPY, "Accept": NPY}, timeout=10)),
            "conditional_npy": npy_of(requests.post(
                f"{model}/{CONDITIONAL}/log-likelihood", headers={"Content-Type": NPY, "Accept": NPY}, timeout=10,
                data=npy_bytes(rows))),
            "encoded": requests.post(f"{model}/{UNCONDITIONAL}/encode", json={"x": x.tolist()}, timeout=10).json(),
        }

    answers, registry = serve_and_call(config, calls)
    grpc = answers["grpc"]
    sample = answers["sample"]
    assert sample["seed"] == 11 and (sample["acceptance_rate"], sample["draws"]) == (0.0, 0)
    np.testing.assert_array_equal(np.float32(sample["samples"]), grpc["sample"].x)  # bit for bit through JSON
    np.testing.assert_array_equal(np.float32(sample["log_prob"]), grpc["sample"].log_prob)
    np.testing.assert_array_equal(answers["sample_npy"]["samples"], grpc["sample"].x)
    np.testing.assert_array_equal(answers["sample_npy"]["log_prob"], grpc["sample"].log_prob)
    lines = [json.loads(line) for line in answers["stream"].splitlines()]
    assert [line["first_row"] for line in lines] == [0, 4]  # chunks of the backend's 4 rows
    np.testing.assert_array_equal(np.concatenate([np.float32(line["samples"]) for line in lines]), grpc["sample"].x)
    for per_context in (answers["per_context"], answers["per_context_npy"]):
        np.testing.assert_array_equal(np.float32(per_context["samples"]), grpc["per_context"].x)  # [2, 4, 1, 2, 2]
        np.testing.assert_array_equal(np.float32(per_context["log_prob"]), grpc["per_context"].log_prob)  # [2, 4]
    np.testing.assert_array_equal(np.float32(answers["scores"]["log_prob"]), grpc["scores"].log_prob)
    np.testing.assert_array_equal(np.float32(answers["scores"]["bits_per_dim"]), grpc["scores"].bits_per_dim)
    np.testing.assert_array_equal(answers["scores_npy"]["log_prob"], grpc["scores"].log_prob)
    assert answers["scores_npy"].dtype.names == ("log_prob",)
    np.testing.assert_array_equal(answers["conditional_npy"]["log_prob"], grpc["conditional"])
    for name in ("z", "log_det", "log_prob"):
        np.testing.assert_array_equal(np.float32(answers["encoded"][name]), getattr(grpc["encoded"], name))
    count = registry.get_sample_value
    ok = {"method": "Sample", "model": UNCONDITIONAL, "code": "OK"}
    assert count("flowserve_requests_total", {**ok, "protocol": "http"}) == 2
    assert count("flowserve_requests_total", {**ok, "protocol": "grpc"}) == 1
    assert count("flowserve_request_rows_sum", {"method": "SampleStream", "model": UNCONDITIONAL,
                                                "protocol": "http"}) == 7


def test_errors_carry_grpcs_meaning_in_json_and_are_counted(config):
    model = f"/v1/models/{UNCONDITIONAL}"

    def calls(target: str, http: str) -> dict:
        post = lambda path, **options: requests.post(f"{http}{path}", timeout=30, **options)  # noqa: E731
        answers = {
            "unknown model": post("/v1/models/" + "n" * 500 + "/sample", json={"num_samples": 1}),
            "no such path": requests.get(f"{http}/v2/whatever", timeout=10),
            "unknown field": post(f"{model}/sample", json={"num_samples": 1, "num_sample": 2}),
            "twice": post(f"{model}/sample?num_samples=2", json={"num_samples": 1}),
            "not json": post(f"{model}/sample", data=b"{", headers={"Content-Type": "application/json"}),
            "nan": post(f"{model}/log-likelihood", data=b'{"x": [[NaN]]}',
                        headers={"Content-Type": "application/json"}),
            "ragged": post(f"{model}/log-likelihood", json={"x": [[1, 2], [3]]}),
            "a string seed": post(f"{model}/sample", json={"num_samples": 1, "seed": "7"}),
            "a boolean count": post(f"{model}/sample", json={"num_samples": True}),
            "wrong shape": post(f"{model}/log-likelihood", json={"x": [[1, 2, 3]]}),
            "form body": post(f"{model}/sample", data={"num_samples": "1"}),
            "csv answer": post(f"{model}/sample", json={"num_samples": 1}, headers={"Accept": "text/csv"}),
            "pickled npy": post(f"{model}/log-likelihood", data=npy_bytes(np.array([{"a": 1}], dtype=object)),
                                headers={"Content-Type": NPY}),
            "too large": post(f"{model}/log-likelihood", data=b"0" * (MAX_MESSAGE_BYTES + 1),
                              headers={"Content-Type": NPY}),
            "bad timeout": post(f"{model}/sample", json={"num_samples": 1}, headers={"Flowserve-Timeout": "-1"}),
        }
        return {label: (r.status_code, r.json()["error"]) for label, r in answers.items()}

    answers, registry = serve_and_call(config, calls)
    assert answers["unknown model"][0] == 404
    assert answers["unknown model"][1]["code"] == "NOT_FOUND"
    assert "... (500 characters)" in answers["unknown model"][1]["message"]  # the name is quoted within bounds
    assert answers["no such path"] == (404, {"code": "NOT_FOUND", "message": "404: Not Found"})
    assert answers["unknown field"] == (400, {"code": "INVALID_ARGUMENT", "message": (
        "unknown field 'num_sample'; this operation takes context, num_samples, seed, temperature, return_log_prob, "
        "samples_per_context, truncate_to_support, max_draws")})
    assert answers["twice"][1]["message"].startswith("num_samples is given more than once")
    assert answers["not json"][1]["message"].startswith("the body is not JSON")
    assert answers["nan"][1]["message"] == "the body is not JSON: NaN is not a JSON number"
    assert answers["ragged"][1]["message"] == "x is not rectangular: its rows differ in length or depth"
    assert answers["a string seed"][1]["message"] == "seed must be an integer, got a string"
    assert answers["a boolean count"][1]["message"] == "num_samples must be an integer, got a boolean"
    assert answers["wrong shape"][0] == 400 and "x.shape" in answers["wrong shape"][1]["message"]
    assert answers["form body"][0] == 415
    assert answers["csv answer"][0] == 406
    assert answers["pickled npy"][1]["message"] == "the .npy array's dtype is |O; send float32 or float64"
    assert answers["too large"][0] == 413 and answers["too large"][1]["code"] == "RESOURCE_EXHAUSTED"
    assert answers["bad timeout"][1]["message"] == "Flowserve-Timeout must be seconds in (0, 86400]"
    statuses = {status for status, _ in answers.values()}
    assert statuses == {400, 404, 406, 413, 415}
    invalid = registry.get_sample_value("flowserve_requests_total", {
        "method": "LogLikelihood", "model": UNCONDITIONAL, "code": "INVALID_ARGUMENT", "protocol": "http"})
    assert invalid == 4  # nan, ragged, wrong shape, pickled npy; the oversized body is RESOURCE_EXHAUSTED


def test_busy_and_slow_calls_get_429_with_retry_after_and_504(config):
    config.max_concurrent_rpcs = 1
    backend = InMemoryBackend(fake_answer)

    def calls(target: str, http: str) -> dict:
        url = f"{http}/v1/models/{UNCONDITIONAL}/sample"
        held = {}
        first = threading.Thread(target=lambda: held.update(r=requests.post(url, json={"num_samples": 1}, timeout=30)))
        backend.delay = 1.0  # the first call holds the only slot for a second
        first.start()
        poll_until(lambda: backend.running == 1, timeout_s=30, what="the first call on the backend")
        busy = requests.post(url, json={"num_samples": 1}, timeout=30)
        first.join()
        backend.delay = 5.0
        slow = requests.post(url, json={"num_samples": 1}, headers={"Flowserve-Timeout": "0.2"}, timeout=30)
        return {"busy": busy, "held": held["r"], "slow": slow}

    answers, registry = serve_and_call(config, calls, backend)
    assert answers["held"].status_code == 200
    assert answers["busy"].status_code == 429 and answers["busy"].headers["Retry-After"] == "1"
    assert answers["busy"].json()["error"]["message"] == ("the gateway is running 1 calls, its limit "
                                                         "(--max-concurrent-rpcs); retry later")
    assert answers["slow"].status_code == 504
    assert answers["slow"].json()["error"]["code"] == "DEADLINE_EXCEEDED"
    for code in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"):
        assert registry.get_sample_value("flowserve_requests_total", {
            "method": "Sample", "model": UNCONDITIONAL, "code": code, "protocol": "http"}) == 1


def test_tokens_guard_the_api_but_not_health_the_page_or_the_description(config):
    config.tokens = frozenset({TOKEN})

    def calls(target: str, http: str) -> dict:
        url = f"{http}/v1/models"
        return {
            "none": requests.get(url, timeout=10),
            "basic": requests.get(url, headers={"Authorization": "Basic eDp5"}, timeout=10),
            "wrong": requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=10),
            "right": requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10),
            **{path: requests.get(f"{http}{path}", timeout=10) for path in ("/livez", "/readyz", "/openapi.json", "/")},
        }

    answers, registry = serve_and_call(config, calls)
    assert {label: r.status_code for label, r in answers.items()} == {
        "none": 401, "basic": 401, "wrong": 403, "right": 200, "/livez": 200, "/readyz": 200, "/openapi.json": 200,
        "/": 200}
    assert answers["none"].headers["WWW-Authenticate"] == "Bearer"
    assert answers["wrong"].json()["error"] == {"code": "PERMISSION_DENIED",
                                                "message": "the token is not accepted by this gateway"}
    assert TOKEN not in "".join(r.text for r in answers.values())
    count = registry.get_sample_value
    labels = {"method": "ListModels", "model": "unknown", "protocol": "http"}
    assert count("flowserve_requests_total", {**labels, "code": "UNAUTHENTICATED"}) == 2
    assert count("flowserve_requests_total", {**labels, "code": "PERMISSION_DENIED"}) == 1


def test_tls_and_mutual_tls_guard_the_http_port_as_they_do_grpc(config, pki):
    config.tls = ServerTLS.from_files(pki.server_cert, pki.server_key, client_ca=pki.ca)

    def calls(target: str, http: str) -> requests.Response:
        assert http.startswith("https://")
        url = f"{http}/v1/models"
        client = (str(pki.client_cert), str(pki.client_key))
        for refused in ({"verify": str(pki.ca)},  # no client certificate
                        {"verify": str(pki.ca), "cert": (str(pki.other_client_cert), str(pki.other_client_key))},
                        {"verify": str(pki.other_ca), "cert": client}):  # the gateway's CA is not trusted
            with pytest.raises(requests.exceptions.ConnectionError):  # an SSLError, or a handshake cut short
                requests.get(url, timeout=10, **refused)
        return requests.get(url, verify=str(pki.ca), cert=client, timeout=10)

    answer, _ = serve_and_call(config, calls)
    assert answer.status_code == 200 and len(answer.json()["models"]) == 2


def test_cors_is_off_by_default_and_answers_the_origins_given(config):
    def calls(target: str, http: str) -> list[requests.Response]:
        origin = {"Origin": "https://app.example"}
        preflight = {**origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"}
        return [requests.get(f"{http}/v1/models", headers=origin, timeout=10),
                requests.options(f"{http}/v1/models/{UNCONDITIONAL}/sample", headers=preflight, timeout=10),
                requests.post(f"{http}/v1/models/{UNCONDITIONAL}/sample", json={"num_samples": 2}, headers=origin,
                              timeout=10)]

    (plain, refused, _), _ = serve_and_call(config, calls)
    assert "Access-Control-Allow-Origin" not in plain.headers and refused.status_code == 405
    config.cors_origins = frozenset({"https://app.example"})
    (allowed, preflight, sampled), _ = serve_and_call(config, calls)
    for answer in (allowed, preflight, sampled):  # a streamed JSON answer too
        assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert sampled.headers["Access-Control-Expose-Headers"] == "Retry-After, Flowserve-Seed"
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Methods"] == "GET, POST"
    assert "Content-Type" in preflight.headers["Access-Control-Allow-Headers"]


def test_readiness_follows_triton_and_a_stream_that_fails_midway_ends_with_an_error_line(config):
    config.limits = GatewayLimits(max_rows_per_request=100, max_rows_in_flight=1000)
    config.health_interval_s = 0.05
    backend = InMemoryBackend(fake_answer)

    async def triton_down() -> bool:
        return False

    def calls(target: str, http: str) -> dict:
        ready = requests.get(f"{http}/readyz", timeout=10)
        backend.is_ready = triton_down
        poll_until(lambda: requests.get(f"{http}/readyz", timeout=10).status_code == 503, timeout_s=30,
                   what="/readyz to answer 503")
        not_ready = requests.get(f"{http}/readyz", timeout=10)
        original = backend.answer
        state = {"calls": 0}

        def failing(spec, inputs):
            state["calls"] += 1
            if state["calls"] > 1:
                raise BackendUnavailable("model digits-plain_generation is not ready")
            return original(spec, inputs)

        backend.answer = failing
        stream = requests.post(f"{http}/v1/models/{UNCONDITIONAL}/sample-stream", json={"num_samples": 10},
                               timeout=10)
        return {"ready": ready, "not ready": not_ready, "stream": stream}

    answers, registry = serve_and_call(config, calls, backend)
    assert answers["ready"].json() == {"status": "SERVING"}
    assert answers["not ready"].json() == {"status": "NOT_SERVING"}
    stream = answers["stream"]
    assert stream.status_code == 200  # sent with the first chunk
    lines = [json.loads(line) for line in stream.text.splitlines()]
    assert len(lines[0]["samples"]) == 4
    assert lines[-1] == {"error": {"code": "UNAVAILABLE", "message": "model digits-plain_generation is not ready"}}
    assert registry.get_sample_value("flowserve_requests_total", {
        "method": "SampleStream", "model": UNCONDITIONAL, "code": "UNAVAILABLE", "protocol": "http"}) == 1

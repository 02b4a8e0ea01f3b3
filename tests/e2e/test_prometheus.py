"""A real Prometheus scrapes the running gateways and Triton, evaluates flowserve's rules,
and answers the dashboard's queries.

Prometheus (the Debian package, installed by ``scripts/setup.sh --test``) listens on
127.0.0.1 only. Static labels stand in for the ``namespace`` and ``pod`` labels that the
Prometheus Operator's PodMonitors add in a cluster. Two gateways share the session's Triton:
``gateway-cpu`` sees the machine as it is (no NVML), ``gateway-gpu`` imports the fake NVML
in tests/helpers/fake_nvml (two 40 GiB GPUs, one nearly full), the one stand-in for hardware this
machine lacks."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2
from helpers.fake_nvml.pynvml import GIB, MEMORY_ENV
from helpers.flows import SMALL_CHUNKS
from helpers.monitoring_files import (
    QUEUE_TIME_RULE,
    dashboard_queries,
    render_adapter_query,
    write_rule_file,
)
from helpers.processes import start_serve, stop_serve, wait_for_health

from flowserve.server.client import FlowClient
from flowserve.server.triton.launcher import free_port

NAMESPACE = "flowserve"
FAKE_NVML = Path(__file__).resolve().parents[1] / "helpers" / "fake_nvml"
SAMPLE_CALLS = 7
SCORE_CALLS = 5
GOOD_REQUESTS = 'flowserve_requests_total{pod="gateway-gpu", code="OK"}'
# The GPU gateway's fake GPUs, (used, total) GiB: GPU 1 is above the 90% of FlowserveGpuMemoryHigh.
GPU_MEMORY_GIB = ((3, 40), (37, 40))


class Prometheus:
    """A Prometheus server's HTTP API."""

    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> dict[tuple, float]:
        """An instant query's vector, as {sorted label items (without __name__): value}."""
        params = {"query": promql, **({"time": at} if at is not None else {})}
        data = self.get("/api/v1/query", **params)
        assert data["resultType"] == "vector", data
        return {
            tuple(sorted((k, v) for k, v in s["metric"].items() if k != "__name__")): float(s["value"][1])
            for s in data["result"]
        }

    def wait_for(self, promql: str, want, timeout: float = 30.0) -> dict[tuple, float]:
        """Poll ``promql`` until ``want(result)`` holds; returns that result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if want(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql} never met the condition; last result {result}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def gpu_gateway(live_server, repository, tmp_path_factory):
    """A second gateway on the session's Triton that reads the fake two-GPU NVML."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(FAKE_NVML), os.environ.get("PYTHONPATH")])),
           MEMORY_ENV: ",".join(f"{used}/{total}" for used, total in GPU_MEMORY_GIB)}
    process, port, metrics_port = start_serve(
        repository, tmp_path_factory.mktemp("gpu-gateway"), "--triton-url", live_server.triton_grpc_url, env=env)
    target = f"127.0.0.1:{port}"
    try:
        wait_for_health(target, process, health_pb2.HealthCheckResponse.SERVING, timeout=60)
        yield target, metrics_port
    finally:
        assert stop_serve(process) == 0


def wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"prometheus exited with {process.returncode}:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"prometheus at {url} was not ready within {timeout} s")


@pytest.fixture(scope="module")
def prometheus(live_server, gpu_gateway, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not on PATH: run scripts/setup.sh --test"
    workdir = tmp_path_factory.mktemp("prometheus")
    rule_file = write_rule_file(workdir)

    def target(address: str, pod: str) -> dict:
        return {"targets": [address], "labels": {"namespace": NAMESPACE, "pod": pod}}

    def netloc(url: str) -> str:
        return urllib.parse.urlsplit(url).netloc

    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rule_file)],
        "scrape_configs": [
            {"job_name": "flowserve-gateway", "static_configs": [
                target(netloc(live_server.metrics_url), "gateway-cpu"),
                target(f"127.0.0.1:{gpu_gateway[1]}", "gateway-gpu")]},
            {"job_name": "triton", "static_configs": [
                target(netloc(live_server.triton_metrics_url), "triton-0")]},
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with open(workdir / "prometheus.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        wait_until_ready(server.url, process, workdir / "prometheus.log")
        server.wait_for("up", lambda r: len(r) == 3 and all(v == 1 for v in r.values()))
        yield server
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def traffic(prometheus, gpu_gateway, moons) -> None:
    """Two rounds of RPCs through the GPU gateway, some good and one bad each. A series is
    born with its first request, and rate() sees only increases after that, so the second
    round starts once Prometheus has scraped the first."""
    good = 0
    with FlowClient(gpu_gateway[0]) as client:
        for _ in range(2):
            for i in range(SAMPLE_CALLS):
                client.sample(SMALL_CHUNKS, 50, seed=i)
            for _ in range(SCORE_CALLS):
                client.log_likelihood(SMALL_CHUNKS, moons["test"][:100])
            with pytest.raises(grpc.RpcError) as info:
                client.sample("no-such-flow", 1)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            good += SAMPLE_CALLS + SCORE_CALLS
            prometheus.wait_for(GOOD_REQUESTS, lambda r, good=good: sum(r.values()) == good)


def labels(**items) -> tuple:
    return tuple(sorted({"namespace": NAMESPACE, **items}.items()))


def test_prometheus_counts_every_gateway_request(prometheus, traffic):
    ok = prometheus.query(GOOD_REQUESTS)
    instance = next(dict(k)["instance"] for k in ok)
    common = dict(pod="gateway-gpu", model=SMALL_CHUNKS, code="OK", job="flowserve-gateway", instance=instance,
                  protocol="grpc")
    assert ok == {labels(method="Sample", **common): 2 * SAMPLE_CALLS,
                  labels(method="LogLikelihood", **common): 2 * SCORE_CALLS}
    not_found = prometheus.query('flowserve_requests_total{pod="gateway-gpu", code="NOT_FOUND"}')
    assert list(not_found.values()) == [2] and dict(next(iter(not_found)))["model"] == "unknown"


def test_prometheus_reads_gpu_memory_and_nvml_availability(prometheus):
    available = prometheus.query("flowserve_nvml_available")
    assert {dict(k)["pod"]: v for k, v in available.items()} == {"gateway-gpu": 1, "gateway-cpu": 0}
    for metric, field in (("used", 0), ("total", 1)):
        memory = prometheus.query(f"flowserve_gpu_memory_{metric}_bytes")
        assert {(dict(k)["pod"], dict(k)["gpu"]): v for k, v in memory.items()} == {
            ("gateway-gpu", str(gpu)): sizes[field] * GIB for gpu, sizes in enumerate(GPU_MEMORY_GIB)}
    ratio = prometheus.wait_for("gpu:flowserve_gpu_memory_used:ratio", lambda r: len(r) == 2)
    assert {dict(k)["gpu"]: v for k, v in ratio.items()} == {"0": 3 / 40, "1": 37 / 40}
    # Above 90%, the alert is pending (it fires after 5 minutes) for GPU 1 alone.
    pending = prometheus.wait_for('ALERTS{alertname="FlowserveGpuMemoryHigh"}', lambda r: len(r) > 0)
    assert [(dict(k)["gpu"], dict(k)["alertstate"]) for k in pending] == [("1", "pending")]


def test_prometheus_scrapes_triton_inference_counts(prometheus, traffic, live_server):
    """Once Prometheus has caught up, its nv_inference_count per model lies between Triton's
    own count after the traffic and its count now: the gateway's health probes add one
    inference per model and second, so the count moves on between scrapes."""
    def triton_counts() -> dict[str, float]:
        text = live_server.scrape(live_server.triton_metrics_url)
        return {line.split('model="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith("nv_inference_count{")}

    def caught_up(result) -> bool:
        scraped, now = {dict(k)["model"]: v for k, v in result.items()}, triton_counts()
        return scraped.keys() == now.keys() == after_traffic.keys() and all(
            after_traffic[model] <= scraped[model] <= now[model] for model in now)

    after_traffic = triton_counts()
    assert sum(after_traffic.values()) > 0
    result = prometheus.wait_for('nv_inference_count{pod="triton-0"}', caught_up)
    assert {dict(k)["model"] for k in result} >= {f"{SMALL_CHUNKS}-density", f"{SMALL_CHUNKS}-generation"}


def test_hpa_signal_is_tritons_queue_time_per_request(prometheus, traffic):
    """The adapter's query, with the label matchers prometheus-adapter adds for one pod, serves
    the seconds Triton's requests waited in its queues over the window, per request: the
    increase of Triton's queue-time counters over the increase of its request counters, summed
    over the pod's models, as read from the raw samples. rate() extrapolates each series by at
    most 1.1 scrape intervals at either end, which bounds how far the two may differ.
    (tests/unit/test_monitoring_files.py shows that the adapter's query is the recording rule's.)"""
    prometheus.wait_for(f'{QUEUE_TIME_RULE}{{pod="triton-0"}}', lambda r: len(r) == 1)
    at = time.time()
    served = prometheus.query(render_adapter_query("namespace, pod", f'namespace="{NAMESPACE}",pod="triton-0"'), at)
    assert set(served) == {labels(pod="triton-0")}

    def increase(metric: str) -> tuple[float, float]:
        """The increase of ``metric`` over the window, summed over models, and the
        extrapolation's relative bound: 2.2 scrape intervals over the sampled span."""
        data = prometheus.get("/api/v1/query", query=f'{metric}{{pod="triton-0"}}[2m]', time=at)
        total, bound = 0.0, 0.0
        for series in data["result"]:
            values = [float(value) for _, value in series["values"]]
            assert values == sorted(values), "a counter reset"
            total += values[-1] - values[0]
            bound = max(bound, 2.2 / (len(values) - 1))
        return total, bound

    (queued_us, queue_bound), (requests, request_bound) = (
        increase("nv_inference_queue_duration_us"), increase("nv_inference_request_success"))
    assert requests > 0
    (value,) = served.values()
    assert value > 0
    assert value == pytest.approx(queued_us / 1e6 / requests, rel=max(queue_bound, request_bound))


def test_every_dashboard_query_returns_data(prometheus, traffic):
    """Each panel's queries return at least one finite value from the live scrape."""
    time.sleep(2)  # let the recording rules evaluate on the latest scrape
    empty = []
    for title, queries in dashboard_queries(NAMESPACE).items():
        for query in queries:
            values = prometheus.query(query).values()
            if not any(math.isfinite(v) for v in values):
                empty.append((title, query, list(values)))
    assert not empty
    errors = prometheus.query(dashboard_queries(NAMESPACE)["Errors by code"][0])
    assert {dict(k)["code"] for k, v in errors.items() if v > 0} == {"NOT_FOUND"}

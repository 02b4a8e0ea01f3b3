"""``flowserve serve --workers N`` live: gateway processes sharing one port, the metrics
port reporting their sums, a killed worker restarted, shutdown and Triton's supervision as
with one gateway."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import grpc
import numpy as np
import requests
from grpc_health.v1 import health_pb2
from helpers.flows import SMALL_CHUNKS
from helpers.processes import (
    connections_accepted,
    metric_value,
    poll_until,
    processes_mentioning,
    start_serve,
    stop_serve,
    wait_for_health,
    worker_processes,
)

from flowserve.server.client import sample_request
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc
from flowserve.server.protocol.tensors import decode
from flowserve.server.triton.launcher import free_port

CHANNELS = 16  # the kernel spreads connections at random: all 16 on one of 2 workers has odds 2**-15
SERVING = health_pb2.HealthCheckResponse.SERVING


def sample_on_channels(target: str, calls_per_channel: int, workers: list[int], port: int):
    """``calls_per_channel`` Sample calls (seed 0) on each of CHANNELS connections of their own;
    returns the samples of each call, and how many connections each of ``workers`` held."""
    # Channels to one target share their connection unless each keeps its own subchannels.
    channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CHANNELS)]
    try:
        request = sample_request(SMALL_CHUNKS, 5, 0, None, False, None)
        samples = [decode(pb_grpc.FlowServiceStub(channel).Sample(request, timeout=30).samples, "samples")
                   for channel in channels for _ in range(calls_per_channel)]
        return samples, {pid: connections_accepted(pid, port) for pid in workers}
    finally:
        for channel in channels:
            channel.close()


def test_workers_share_the_port_the_metrics_port_sums_them_and_a_killed_worker_comes_back(live_server, repository,
                                                                                          tmp_path):
    http_port = free_port()
    process, port, metrics_port = start_serve(repository, tmp_path, "--workers", "2",
                                              "--triton-url", live_server.triton_grpc_url, http_port=http_port)
    target, metrics_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        wait_for_health(target, process, SERVING, timeout=60)
        workers = worker_processes(process.pid)
        assert len(workers) == 2
        samples, connections = sample_on_channels(target, 3, workers, port)
        # Our 16 connections (and perhaps the health check's, while it closes): both workers serve.
        assert sum(connections.values()) >= CHANNELS and all(connections.values()), connections
        assert all(np.array_equal(s, samples[0]) for s in samples)  # and give the same numbers
        text = live_server.scrape(metrics_url)
        grpc_ok = metric_value(text, "flowserve_requests_total", method="Sample", code="OK", protocol="grpc")
        assert grpc_ok == 3 * CHANNELS
        assert metric_value(text, "flowserve_flow_ready", model=SMALL_CHUNKS) == 1
        assert metric_value(text, "flowserve_gateway_worker_restarts_total") == 0
        # The HTTP API too: every worker serves it, on the one HTTP port, with the same numbers.
        sessions = [requests.Session() for _ in range(CHANNELS)]  # each keeps its connection open
        try:
            answers = [session.post(f"http://127.0.0.1:{http_port}/v1/models/{SMALL_CHUNKS}/sample", timeout=30,
                                    json={"num_samples": 5, "seed": 0}).json() for session in sessions]
            held = {pid: connections_accepted(pid, http_port) for pid in workers}
        finally:
            for session in sessions:
                session.close()
        assert sum(held.values()) >= CHANNELS and all(held.values()), held
        assert all(np.array_equal(np.float32(answer["samples"]), samples[0]) for answer in answers)
        text = live_server.scrape(metrics_url)
        assert metric_value(text, "flowserve_requests_total", method="Sample", code="OK", protocol="http") == CHANNELS

        os.kill(workers[1], signal.SIGKILL)
        poll_until(lambda: len(set(worker_processes(process.pid)) - {workers[1]}) == 2, 30, "a new worker")
        wait_for_health(target, process, SERVING, timeout=60)
        workers = worker_processes(process.pid)
        _, connections = sample_on_channels(target, 1, workers, port)
        assert sum(connections.values()) >= CHANNELS, connections  # every new connection reached a live worker
        text = live_server.scrape(metrics_url)
        assert metric_value(text, "flowserve_gateway_worker_restarts_total") == 1
        # The killed worker's count stays in the sum; its gauges went with it.
        grpc_ok = metric_value(text, "flowserve_requests_total", method="Sample", code="OK", protocol="grpc")
        assert grpc_ok == 4 * CHANNELS
        assert metric_value(text, "flowserve_requests_in_flight") == 0
    finally:
        code = stop_serve(process)
    assert code == 0
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    log = (tmp_path / "serve.log").read_text()
    assert f"gateway ready: gRPC 127.0.0.1:{port} (2 workers), HTTP :{http_port}" in log
    assert re.search(r"gateway worker [01] exited with code -9; restarting it", log)


def test_workers_refuse_a_taken_port_at_once(repository, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        process, _, _ = start_serve(repository, tmp_path, "--workers", "2", "--port", str(port))
        assert process.wait(timeout=60) == 1
    assert time.monotonic() - started < 30  # before Triton starts
    assert f"flowserve serve: error: port 127.0.0.1:{port} is taken" in (tmp_path / "serve.log").read_text()


def test_workers_stop_when_their_triton_dies_beyond_its_restarts(repository, tmp_path):
    process, port, _ = start_serve(repository, tmp_path, "--workers", "2", "--triton-max-restarts", "0")
    try:
        wait_for_health(f"127.0.0.1:{port}", process, SERVING)
        workers = worker_processes(process.pid)
        (triton_pid,) = [int(p.split(":")[0]) for p in processes_mentioning(str(repository)) if "bin/tritonserver" in p
                         and str(tmp_path) in p]
        os.kill(triton_pid, signal.SIGKILL)
        assert process.wait(timeout=60) == 1
    finally:
        stop_serve(process)
    assert len(workers) == 2 and not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    assert "was not restarted (--triton-max-restarts 0)" in (tmp_path / "serve.log").read_text()

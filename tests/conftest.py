"""Fixtures every lane may use, and the lanes themselves.

Tests sit in three folders: ``unit`` (no network, no subprocess, no training), ``integration``
(real gRPC on loopback in front of the in-memory backend, small trainings) and ``e2e`` (the real
Triton, Prometheus, linters, kubectl, installs, exports). Everything under ``e2e`` is marked
``e2e``, so ``pytest -m "not e2e"`` runs the other two. Helpers and fakes live in ``helpers``.

The session fixtures: a briefly trained RealNVP, a model repository exported from it, and a
live ``flowserve serve`` (the ``tritonserver`` from the nvidia-pytriton wheel and the asyncio
gateway, on free ports).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from helpers.fakes import (
    CHUNK,
    CONDITIONAL,
    CONTEXT_SHAPE,
    EVENT_SHAPE,
    NOISE_DIM,
    UNCONDITIONAL,
    InMemoryBackend,
    fake_answer,
    write_metadata,
)
from helpers.flows import LARGE_CHUNKS, MAX_ROWS_PER_REQUEST, SMALL_BATCH, SMALL_CHUNKS
from helpers.pki import Pki, make_pki
from helpers.processes import SETTINGS_PREFIX, LiveServer, start_serve, stop_serve, wait_for_health

from flowserve import cli
from flowserve.contract.metadata import SCHEMA_VERSION, metadata_path
from flowserve.contract.spec import DIRECTIONS, triton_model_name
from flowserve.server.gateway.catalog import ModelCatalog
from flowserve.server.gateway.service import FlowService, GatewayLimits
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc
from flowserve.server.triton.launcher import free_port

LANES = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items):
    """Mark every test under tests/e2e ``e2e``; the lanes are the folders, so a test outside
    them, or an ``e2e`` mark outside tests/e2e, is an error."""
    tests = Path(__file__).parent
    for item in items:
        lane = item.path.relative_to(tests).parts[0]
        if lane not in LANES:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit, tests/integration or tests/e2e")
        if lane == "e2e":
            item.add_marker(pytest.mark.e2e)
        elif item.get_closest_marker("e2e"):
            raise pytest.UsageError(f"{item.nodeid} is marked e2e outside tests/e2e: move it there")


@pytest.fixture(scope="session", autouse=True)
def no_flowserve_settings_from_the_environment():
    """The same for code the tests run in this process (the CLI reads its defaults from the
    environment); a test sets what it needs with ``monkeypatch.setenv``."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith(SETTINGS_PREFIX)]:
            patch.delenv(name)
        yield


@pytest.fixture(scope="session")
def moons() -> dict[str, np.ndarray]:
    """The train/test split that ``flowserve train --num-points 2000 --seed 0`` uses."""
    from flowserve.export.data import train_test_split, two_moons

    train, test = train_test_split(two_moons(2000, seed=0), seed=0)
    return {"train": train, "test": test}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A briefly trained RealNVP, made by the real ``flowserve train`` command."""
    path = tmp_path_factory.mktemp("ckpt") / "realnvp-moons.pt"
    code = cli.main(["train", "--num-points", "2000", "--seed", "0", "--steps", "300", "-o", str(path)])
    assert code == 0
    return path


@pytest.fixture(scope="session")
def trained_flow(checkpoint):
    from flowserve.export.training import load_checkpoint

    return load_checkpoint(checkpoint)[0]


@pytest.fixture(scope="session")
def repository(tmp_path_factory, checkpoint) -> Path:
    from flowserve.export.exporter.pipeline import export_flow
    from flowserve.export.exporter.triton_config import ServingConfig

    repo = tmp_path_factory.mktemp("model_repository")
    export_flow(checkpoint, repo, name=SMALL_CHUNKS, progress=False,
                serving=ServingConfig(max_batch_size=SMALL_BATCH, max_queue_delay_us=2000))
    export_flow(checkpoint, repo, name=LARGE_CHUNKS, progress=False,
                serving=ServingConfig(max_batch_size=1024, max_queue_delay_us=500, instance_count=2))
    return repo


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, repository) -> LiveServer:
    workdir = tmp_path_factory.mktemp("triton")
    triton_grpc, triton_metrics, http_port = free_port(), free_port(), free_port()
    process, port, metrics_port = start_serve(
        repository, workdir,
        "--triton-grpc-port", str(triton_grpc), "--triton-metrics-port", str(triton_metrics),
        "--max-rows-per-request", str(MAX_ROWS_PER_REQUEST), http_port=http_port,
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_for_health(target, process, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        stop_serve(process)
        raise
    yield LiveServer(
        process=process,
        target=target,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        triton_grpc_url=f"127.0.0.1:{triton_grpc}",
        triton_metrics_url=f"http://127.0.0.1:{triton_metrics}/metrics",
        workdir=workdir,
        http_url=f"http://127.0.0.1:{http_port}",
    )
    stop_serve(process)


@pytest.fixture(scope="session")
def live_stub(live_server) -> pb_grpc.FlowServiceStub:
    """A FlowService stub on the live gateway."""
    with grpc.insecure_channel(live_server.target) as channel:
        yield pb_grpc.FlowServiceStub(channel)


@pytest.fixture
def conditional_repository(tmp_path) -> Path:
    write_metadata(tmp_path, CONDITIONAL, context_shape=list(CONTEXT_SHAPE), noise_dim=NOISE_DIM,
                   log_likelihood="lower_bound")
    # The smallest file the schema admits, so the catalog must supply every default itself.
    minimal = {"schema": SCHEMA_VERSION, "name": UNCONDITIONAL, "family": "vae", "event_shape": list(EVENT_SHAPE),
               "models": {d: triton_model_name(UNCONDITIONAL, d) for d in DIRECTIONS}}
    metadata_path(tmp_path, UNCONDITIONAL).write_text(json.dumps(minimal))
    return tmp_path


@pytest.fixture
def backend() -> InMemoryBackend:
    versions = {triton_model_name(n, d): ["1"] for n in (CONDITIONAL, UNCONDITIONAL) for d in DIRECTIONS}
    return InMemoryBackend(fake_answer, max_batch_size=CHUNK, versions=versions)


@pytest.fixture
def service(conditional_repository, backend) -> FlowService:
    return FlowService(backend, ModelCatalog(conditional_repository), GatewayLimits())


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))

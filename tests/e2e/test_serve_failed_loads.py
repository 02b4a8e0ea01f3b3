"""``flowserve serve`` over models that fail to load: it names each, with Triton's reason, and
serves the others; with none loaded it exits non-zero with the reasons and leaves no process."""

from __future__ import annotations

import shutil

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.flows import LARGE_CHUNKS, SMALL_CHUNKS
from helpers.processes import processes_mentioning, start_serve, stop_serve, wait_for_health

from flowserve.contract.spec import ALL_DIRECTIONS, triton_model_name
from flowserve.server.protocol.names import flow_health_service


def corrupt(repository, flow: str, direction: str) -> str:
    """Overwrite one model file of ``flow`` with bytes no runtime can read; returns the model's name."""
    model = triton_model_name(flow, direction)
    (repository / model / "1" / "model.onnx").write_bytes(b"not an ONNX file")
    return model


def test_serve_names_the_model_that_failed_to_load_and_serves_the_others(repository, tmp_path):
    private_repo = tmp_path / "repo"
    shutil.copytree(repository, private_repo)
    broken = corrupt(private_repo, LARGE_CHUNKS, "density")
    process, port, _ = start_serve(private_repo, tmp_path / "work")
    try:
        wait_for_health(f"127.0.0.1:{port}", process, health_pb2.HealthCheckResponse.SERVING)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status(flow: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=flow_health_service(flow)), timeout=5).status

            assert status(SMALL_CHUNKS) == health_pb2.HealthCheckResponse.SERVING
            assert status(LARGE_CHUNKS) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        assert stop_serve(process) == 0
    log = (tmp_path / "work" / "serve.log").read_text()
    named = [line for line in log.splitlines() if line.startswith("flowserve serve: model ")]
    assert len(named) == 1 and named[0].startswith(f"flowserve serve: model '{broken}' failed to load and is not "
                                                   "served: ")
    assert "INVALID_PROTOBUF" in named[0] or "ONNXRuntimeError" in named[0], named[0]


def test_serve_exits_nonzero_with_every_reason_when_no_model_loads(repository, tmp_path):
    private_repo = tmp_path / "repo"
    shutil.copytree(repository, private_repo)
    broken = [corrupt(private_repo, flow, d) for flow in (SMALL_CHUNKS, LARGE_CHUNKS) for d in ALL_DIRECTIONS]
    process, _, _ = start_serve(private_repo, tmp_path / "work")
    assert process.wait(120) == 1
    log = (tmp_path / "work" / "serve.log").read_text()
    assert "flowserve serve: error: Triton loaded none of the 6 model(s)" in log
    for model in broken:
        assert f"  {model}: " in log
    assert processes_mentioning(str(private_repo)) == []

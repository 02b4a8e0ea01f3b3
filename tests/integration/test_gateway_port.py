"""Who may share the gateway's gRPC port: a single gateway refuses a taken port, even one
taken with SO_REUSEPORT (gRPC's own default on Linux); gateway workers share theirs."""

from __future__ import annotations

import asyncio
import socket

import pytest
from helpers.fakes import InMemoryBackend, write_flows, zeros

from flowserve.server.gateway.app import Gateway, GatewayConfig
from flowserve.server.gateway.workers import check_port_free
from flowserve.server.triton.launcher import free_port


def reuse_port_listener() -> socket.socket:
    """A socket listening on a free loopback port with SO_REUSEPORT, as a gRPC server binds it."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


def start_gateway(repository, port: int, reuse_port: bool) -> int:
    """Start and stop a gateway on ``port``; returns the port it served."""
    async def scenario():
        config = GatewayConfig(repository, triton_url="in-memory", host="127.0.0.1", port=port, metrics_port=None,
                               reuse_port=reuse_port)
        async with Gateway(config, InMemoryBackend(zeros)) as gateway:
            return gateway.port

    return asyncio.run(scenario())


def test_a_single_gateway_refuses_a_port_another_process_listens_on(tmp_path):
    write_flows(tmp_path)
    with reuse_port_listener() as taken:
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"Failed to bind to address 127.0.0.1:{port}"):
            start_gateway(tmp_path, port, reuse_port=False)
        assert start_gateway(tmp_path, port, reuse_port=True) == port  # a worker joins the port's group
        with pytest.raises(OSError, match=f"port 127.0.0.1:{port} is taken"):
            check_port_free("127.0.0.1", port)


def test_workers_need_a_fixed_port_and_a_free_one_passes():
    with pytest.raises(ValueError, match="--workers needs a fixed --port"):
        check_port_free("127.0.0.1", 0)
    check_port_free("127.0.0.1", free_port())

"""The unit lane runs in this process only: a test here that starts a subprocess or opens a
Python socket fails with the lane it belongs in. (gRPC's own sockets live in its C core, out
of this check's reach: gateway tests on loopback sit in tests/integration by rule.)"""

from __future__ import annotations

import socket
import subprocess

import numpy.testing  # noqa: F401  (on import it runs lscpu once, before the check below)
import pytest


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"a unit test may not {what}: move it to tests/integration or tests/e2e")
    return refuse


@pytest.fixture(autouse=True)
def no_subprocess_or_network(monkeypatch):
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a subprocess"))
    for method in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(socket.socket, method, _refuse("open a network connection"))

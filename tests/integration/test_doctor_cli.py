"""``flowserve doctor`` from the command line, without starting Triton (--skip-triton; the real
stub check is in tests/e2e/test_doctor_live.py): a port in use is a ✗ with its fix and exit
code 1, and ``--json`` carries the same checks."""

from __future__ import annotations

import json
import socket

from flowserve import cli
from flowserve.server.triton.launcher import free_port


def test_a_port_in_use_fails_with_its_fix_and_json_carries_it(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["doctor", "--skip-triton", "--model-repository", str(tmp_path / "none"), "--port", str(port),
                "--metrics-port", str(free_port())]
        code = cli.main(argv)
        out = capsys.readouterr().out
        json_code = cli.main([*argv, "--json"])
        report = json.loads(capsys.readouterr().out)
    assert code == json_code == 1
    lines = out.splitlines()
    failed = lines.index(next(line for line in lines if line.startswith("✗ gateway port")))
    assert f"cannot bind 127.0.0.1:{port}: Address already in use" in lines[failed]
    assert lines[failed + 1].strip() == "fix: stop what holds it, or pass serve (and doctor) another --port"
    assert any(line.startswith("✓ metrics port") for line in lines)
    assert any(line.startswith("– model repository") for line in lines)
    assert lines[-1] == "flowserve doctor: 1 blocking problem(s)"
    assert report["ok"] is False
    assert [c["status"] for c in report["checks"] if c["name"] == "gateway port"] == ["fail"]

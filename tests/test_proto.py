"""The committed gRPC stubs are what scripts/gen_proto.py makes of the .proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_are_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    written = gen_proto.generate(tmp_path)
    assert len(written) == 3
    for fresh in written:
        committed = ROOT / "server" / "proto" / fresh.name
        assert committed.read_text() == fresh.read_text(), f"{committed.name} is stale: run scripts/gen_proto.py"

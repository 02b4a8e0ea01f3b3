#!/usr/bin/env python3
"""Generate the Python gRPC stubs of server/protocol/proto/*.proto in place.

Run after editing a .proto: ``python scripts/gen_proto.py``. The stubs are committed;
tests/unit/test_proto.py fails when they are out of date. Needs grpcio-tools (a test extra).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent.parent / "server" / "protocol" / "proto"


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every .proto in PROTO_DIR into ``out_dir``; return the files written."""
    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc", f"-I{PROTO_DIR}", f"-I{include}",
        f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            path = out_dir / f"{proto.stem}{suffix}"
            # grpc_tools emits absolute imports ("import x_pb2"); the stubs live in a package.
            text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", path.read_text(), flags=re.M)
            path.write_text(text)
            written.append(path)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)

#!/usr/bin/env python3
"""Write docs/openapi.json, the committed copy of the HTTP API's OpenAPI description.

Run after changing the HTTP API's operations or fields: ``python scripts/gen_openapi.py``.
The gateway serves the same text at /openapi.json; tests/integration/test_openapi.py fails
when the copy is out of date.
"""

from __future__ import annotations

from pathlib import Path

from flowserve.server.gateway.rest import openapi

COMMITTED = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"

if __name__ == "__main__":
    COMMITTED.write_text(openapi.text())
    print(f"wrote {COMMITTED}")

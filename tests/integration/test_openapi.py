"""The HTTP API's OpenAPI description: valid, served as committed, and kept by the gateway for
generated requests (schemathesis) on loopback, in front of the in-memory backend."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import requests
import schemathesis
from helpers.fakes import CONDITIONAL, UNCONDITIONAL, InMemoryBackend, fake_answer, serve_and_call, write_metadata
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from flowserve.server.gateway.app import GatewayConfig
from flowserve.server.gateway.rest import openapi
from flowserve.server.gateway.service import GatewayLimits

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
REQUESTS = int(os.environ.get("FLOWSERVE_OPENAPI_EXAMPLES", "1000"))
"""Generated requests in all (at least 1,000), spread over the operations."""


@pytest.fixture
def config(tmp_path) -> GatewayConfig:
    write_metadata(tmp_path, UNCONDITIONAL)
    write_metadata(tmp_path, CONDITIONAL)
    return GatewayConfig(tmp_path, triton_url="in-memory", host="127.0.0.1", port=0, metrics_port=None, http_port=0,
                         limits=GatewayLimits(max_rows_per_request=2048, max_rows_in_flight=1 << 20,
                                                         max_rows_per_stream=2048))


def test_the_description_validates_and_the_gateway_serves_the_committed_copy(config):
    served, _ = serve_and_call(config, lambda target, http: requests.get(f"{http}/openapi.json", timeout=10).content)
    assert served.decode() == COMMITTED.read_text() == openapi.text(), "run scripts/gen_openapi.py"
    validate(json.loads(served))


def test_generated_requests_get_answers_the_description_allows(config):
    """Requests generated from the description, valid and invalid, half of them to a served
    flow: every answer has a documented status, media type, schema and headers; none is a 5xx
    but 503 and 504, which the description allows (504: a Flowserve-Timeout too short)."""
    schema = schemathesis.openapi.from_dict(json.loads(COMMITTED.read_text()))
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: Counter[int] = Counter()

    def calls(target: str, http: str) -> None:
        session = requests.Session()
        # Health has a single request each; the budget left is spread over the others.
        ordered = sorted(operations, key=lambda operation: len(list(operation.iter_parameters())))
        for index, operation in enumerate(ordered):
            strategies = [operation.as_strategy(generation_mode=mode) for mode in GenerationMode]
            if "model" in operation.path_parameters:
                strategies += [operation.as_strategy(generation_mode=mode, path_parameters={"model": model})
                               for mode in GenerationMode for model in (UNCONDITIONAL, CONDITIONAL)]

            @settings(max_examples=max(1, (REQUESTS - statuses.total()) // (len(ordered) - index)), deadline=None,
                      database=None, derandomize=True, suppress_health_check=list(HealthCheck))
            @given(st.one_of(strategies))
            def exchange(case):
                response = case.call(base_url=http, session=session, timeout=30)
                statuses[response.status_code] += 1
                # A request the schema allows may still be refused: the description cannot say that
                # num_samples goes with samples_per_context, or which shapes a flow takes.
                case.validate_response(response, excluded_checks=[positive_data_acceptance, not_a_server_error])
                assert response.status_code < 500 or response.status_code in (503, 504), response.text

            exchange()

    serve_and_call(config, calls, InMemoryBackend(fake_answer, max_batch_size=64))
    assert statuses.total() >= min(REQUESTS, 1000)
    assert statuses[200] >= 100 and statuses[400] >= 100 and statuses[404] >= 10, statuses
    assert not any(status >= 500 and status not in (503, 504) for status in statuses), statuses

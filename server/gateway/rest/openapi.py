"""The HTTP API's OpenAPI 3 description, built from the operations' field table (``fields.py``)
and the error table: the gateway serves it at ``/openapi.json``, and ``docs/openapi.json``
is its committed copy (``scripts/gen_openapi.py`` writes it; a test compares them)."""

from __future__ import annotations

import json

from flowserve.server.protocol.errors import Status
from flowserve.server.protocol.npy import MEDIA_TYPE as NPY
from flowserve.server.protocol.tensors import MAX_DIMS, MAX_MESSAGE_BYTES

from .fields import ARRAY, OPERATIONS, SAMPLE_STREAM, Field, Operation

VERSION = "1.0.0"
_REF = "#/components/schemas/"
_TIMEOUT = {"name": "Flowserve-Timeout", "in": "header", "required": False,
            "description": "seconds the call may take (gRPC's deadline); 504 after them",
            "schema": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 86400}}
_MODEL = {"name": "model", "in": "path", "required": True, "description": "a served flow's name",
          "schema": {"type": "string"}}
_CALL_ERRORS = {
    "400": "a field is missing, malformed or out of range, or the flow cannot do what is asked",
    "401": "no bearer token, on a gateway that needs one",
    "403": "a token the gateway does not accept",
    "404": "no flow of that name is served",
    "406": "the Accept header names no media type this operation answers",
    "413": f"the body is over {MAX_MESSAGE_BYTES >> 20} MiB, the gRPC message limit",
    "415": "the body is neither application/json nor application/x-npy",
    "429": "the gateway or the flow's queue is full: retry after Retry-After seconds",
    "503": "Triton, or the flow's model on it, is not ready: retry after Retry-After seconds",
    "504": "the call did not finish within Flowserve-Timeout",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before a retry", "schema": {"type": "integer"}}}


def _ref(name: str) -> dict:
    return {"$ref": _REF + name}


def _nested(leaf: dict, doc: str, depth: int = MAX_DIMS) -> dict:
    """Arrays of ``leaf`` values nested 1 to ``depth`` deep (any shape up to that rank), unrolled:
    validators of OpenAPI 3.0 do not all follow a schema that refers to itself."""
    schema = {"type": "array", "items": leaf}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": {"oneOf": [leaf, schema]}}
    return {**schema, "description": doc}


def _described(name: str, doc: str) -> dict:
    return {"allOf": [_ref(name)], "description": doc}


def _field_schema(field: Field) -> dict:
    if field.kind == ARRAY:
        return _described("Numbers", field.doc)
    schema = {"type": field.kind, "description": field.doc}
    if field.minimum is not None:
        schema["minimum"] = field.minimum
    if field.maximum is not None:
        schema["maximum"] = field.maximum
    if field.exclusive_minimum is not None:
        schema.update(minimum=field.exclusive_minimum, exclusiveMinimum=True)
    return schema


def _error_responses(codes) -> dict:
    responses = {}
    for code in codes:
        response = {"description": _CALL_ERRORS[code], "content": {"application/json": {"schema": _ref("Error")}}}
        if code in ("429", "503"):
            response["headers"] = _RETRY_AFTER
        responses[code] = response
    return responses


def _operation(operation: Operation) -> dict:
    scalars = [f for f in operation.fields if f.kind != ARRAY]
    arrays = operation.arrays
    body = {
        "type": "object", "additionalProperties": False,
        "properties": {f.name: _field_schema(f) for f in operation.fields},
    }
    if operation is SAMPLE_STREAM:
        answers = {"application/x-ndjson": {"schema": _ref("SampleChunk")}}
    else:
        answers = {"application/json": {"schema": _ref(f"{operation.method}Response")},
                   NPY: {"schema": {"type": "string", "format": "binary"}}}
    return {
        "operationId": operation.method,
        "summary": operation.summary,
        "description": (
            "Fields come in a JSON body, or as query parameters (all but arrays). With an "
            f"{NPY} body, the body is {arrays[0]} (a float32 or float64 array), or a structured array whose "
            f"fields are among {', '.join(arrays)}; the other fields come in the query. "
            + ("The answer is one JSON object per line; a line with `error` ends a stream that failed after "
               "it began." if operation is SAMPLE_STREAM else
               f"Accept {NPY} for the answer as a structured array with one field per output.")),
        "parameters": [_MODEL, _TIMEOUT, *({"name": f.name, "in": "query", "required": False,
                                            "schema": _field_schema(f)} for f in scalars)],
        "requestBody": {"required": False, "content": {
            "application/json": {"schema": body},
            NPY: {"schema": {"type": "string", "format": "binary"}},
        }},
        "responses": {"200": {"description": "the answer", "content": answers},
                      **_error_responses(_CALL_ERRORS)},
    }


def _schemas() -> dict:
    floats = lambda doc: _described("Floats", doc)  # noqa: E731
    tally = {
        "seed": {"type": "integer", "minimum": 0, "description": "the seed the noise came from"},
        "acceptance_rate": {"type": "number", "description": "with truncate_to_support: the share of draws "
                                                            "inside the support box (else 0)"},
        "draws": {"type": "integer", "minimum": 0, "description": "with truncate_to_support: the draws made"},
    }
    error = {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string", "enum": sorted({s.name for s in Status} | {"UNIMPLEMENTED"}),
                 "description": "the gRPC status name of the same failure"},
        "message": {"type": "string"}}}
    sample = {
        "samples": floats("[rows, *event_shape], or [B, N, *event_shape] with samples_per_context"),
        "log_prob": floats("with return_log_prob: log p of each sample, in the samples' leading shape"),
        **tally,
    }
    return {
        # Rows of numbers, or deeper arrays: generators of requests crawl through a schema of 16 levels.
        "Numbers": {"type": "array", "items": {"oneOf": [{"type": "number"}, {
            "type": "array", "items": {"oneOf": [{"type": "number"}, {"type": "array"}]}}]},
                    "description": f"an array of numbers, at most {MAX_DIMS} deep (float32 on the wire)"},
        "Floats": _nested({"oneOf": [{"type": "number"}, {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]},
                          "an array of float32 values; NaN and infinities as strings (protobuf's JSON mapping)"),
        "Error": {"type": "object", "required": ["error"], "properties": {"error": error}},
        "ModelInfo": {"type": "object", "required": ["name", "family", "event_shape", "context_shape", "versions",
                                                     "directions", "ready", "log_likelihood_kind", "metadata"],
                      "properties": {
                          "name": {"type": "string"}, "family": {"type": "string"},
                          "event_shape": {"type": "array", "items": {"type": "integer"}},
                          "context_shape": {"type": "array", "items": {"type": "integer"},
                                            "description": "empty for a flow without context"},
                          "versions": {"type": "array", "items": {"type": "string"}},
                          "directions": {"type": "array", "items": {
                              "type": "string", "enum": ["density", "generation", "encode"]}},
                          "ready": {"type": "boolean"},
                          "log_likelihood_kind": {"type": "string", "enum": ["exact", "lower_bound"]},
                          "metadata": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "ModelList": {"type": "object", "required": ["models"],
                      "properties": {"models": {"type": "array", "items": _ref("ModelInfo")}}},
        "SampleResponse": {"type": "object", "required": ["samples", *tally], "properties": sample},
        "SampleChunk": {"type": "object", "properties": {
            **sample, "first_row": {"type": "integer", "minimum": 0,
                                    "description": "the index of the chunk's first row among the call's rows"},
            "error": error}},
        "LogLikelihoodResponse": {"type": "object", "required": ["log_prob"], "properties": {
            "log_prob": floats("log p(x | context) of each row"),
            "bits_per_dim": floats("with return_bits_per_dim")}},
        "EncodeResponse": {"type": "object", "required": ["z", "log_det", "log_prob"], "properties": {
            "z": floats("the base noise of each row, [N, noise_dim]"),
            "log_det": floats("log|det dz/dx| of each row"),
            "log_prob": floats("log p(x | context) of each row")}},
        "Health": {"type": "object", "required": ["status"],
                   "properties": {"status": {"type": "string", "enum": ["SERVING", "NOT_SERVING"]}}},
    }


def document() -> dict:
    """The OpenAPI 3.0 description of the HTTP API."""
    json_answer = lambda schema: {"application/json": {"schema": _ref(schema)}}  # noqa: E731
    open_ = {"security": []}
    paths = {
        "/livez": {"get": {"operationId": "Live", "summary": "The gateway's process answers", **open_,
                           "responses": {"200": {"description": "serving", "content": json_answer("Health")}}}},
        "/readyz": {"get": {"operationId": "Ready", "summary": "The gateway serves: Triton is ready", **open_,
                            "responses": {"200": {"description": "serving", "content": json_answer("Health")},
                                          "503": {"description": "not serving", "content": json_answer("Health")}}}},
        "/v1/models": {"get": {"operationId": "ListModels", "summary": "Every served flow",
                               "parameters": [_TIMEOUT],
                               "responses": {"200": {"description": "the flows", "content": json_answer("ModelList")},
                                             **_error_responses(["400", "401", "403", "429", "504"])}}},
        "/v1/models/{model}": {"get": {
            "operationId": "GetModel", "summary": "One served flow", "parameters": [_MODEL, _TIMEOUT],
            "responses": {"200": {"description": "the flow", "content": json_answer("ModelInfo")},
                          **_error_responses(["400", "401", "403", "404", "429", "504"])}}},
    }
    for operation in OPERATIONS:
        paths[f"/v1/models/{{model}}/{operation.path}"] = {"post": _operation(operation)}
    return {
        "openapi": "3.0.3",
        "info": {"title": "flowserve", "version": VERSION, "description": (
            "Sample from and score normalizing flows served by flowserve's gateway: the operations of its "
            "gRPC API (flowserve.v1.FlowService), in JSON or .npy. Errors are JSON and carry the gRPC status "
            "name of the same failure.")},
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "on a gateway started with tokens"}},
        },
        "security": [{}, {"bearer": []}],
    }


def text() -> str:
    """The description as the gateway serves it and ``docs/openapi.json`` holds it."""
    return json.dumps(document(), indent=1) + "\n"

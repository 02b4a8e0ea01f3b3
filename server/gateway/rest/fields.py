"""The HTTP API's operations and their fields, one table that both the request parser and the
OpenAPI description read, and the conversions between JSON and arrays.

A field comes in a JSON body, or as a query parameter (not arrays), or, for arrays, in an
``.npy`` body; the same field twice is an error. Absent fields take the gRPC message's
defaults (0, false, unset), so that both transports mean the same by the same request.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from flowserve.server.protocol.errors import InvalidArgument, quoted
from flowserve.server.protocol.tensors import MAX_DIMS, WIRE_DTYPE

INTEGER, NUMBER, BOOLEAN, ARRAY = "integer", "number", "boolean", "array"
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_JSON_PARSE_BYTES = 512 * 1024 * 1024
"""The most memory a JSON body's parse may take, by :func:`json_parse_bytes`'s bound; a
body beyond it is refused before it is parsed (send such arrays as .npy)."""


@dataclass(frozen=True)
class Field:
    """One field of a request: its JSON type, its bounds (``exclusive_minimum``: > that) and
    what it means."""

    name: str
    kind: str
    doc: str
    minimum: int | None = None
    maximum: int | None = None
    exclusive_minimum: float | None = None


@dataclass(frozen=True)
class Operation:
    """A POST operation on one flow: its path under ``/v1/models/{model}``, the method name
    its calls are counted under (the gRPC RPC's), and its fields (arrays first)."""

    method: str
    path: str
    summary: str
    fields: tuple[Field, ...]

    @property
    def arrays(self) -> tuple[str, ...]:
        """Array fields, in order: a plain .npy body is the first."""
        return tuple(f.name for f in self.fields if f.kind == ARRAY)


_CONTEXT = Field("context", ARRAY, "[*context_shape] (one context for every row) or [rows, *context_shape]; "
                                   "with samples_per_context, [B, *context_shape]")
_TRUNCATE = Field("truncate_to_support", BOOLEAN, "keep to the flow's support box")
_SAMPLE_FIELDS = (
    _CONTEXT,
    Field("num_samples", INTEGER, "rows to draw (0 or B x N with samples_per_context)", 0, INT64_MAX),
    Field("seed", INTEGER, "seed of the base noise (PCG64); a fresh one when unset", 0, UINT64_MAX),
    Field("temperature", NUMBER, "scale of the base noise (default 1)", exclusive_minimum=0),
    Field("return_log_prob", BOOLEAN, "also return each sample's log p"),
    Field("samples_per_context", INTEGER, "N samples for each of the B contexts", 1, INT64_MAX),
    _TRUNCATE,
    Field("max_draws", INTEGER, "with truncate_to_support: the most draws this call may make", 1, INT64_MAX),
)
SAMPLE = Operation("Sample", "sample", "Draw samples", _SAMPLE_FIELDS)
SAMPLE_STREAM = Operation("SampleStream", "sample-stream",
                          "Draw samples as a stream of NDJSON chunks (the samples of Sample for the same seed)",
                          _SAMPLE_FIELDS)
_X = Field("x", ARRAY, "the rows, [N, *event_shape]")
LOG_LIKELIHOOD = Operation("LogLikelihood", "log-likelihood", "log p(x | context) of each row", (
    _X, _CONTEXT,
    Field("return_bits_per_dim", BOOLEAN, "also return bits per dimension"),
    Field("truncate_to_support", BOOLEAN, "-inf (\"-Infinity\") for rows outside the flow's support box"),
))
ENCODE = Operation("Encode", "encode", "The base noise z of each row, log|det dz/dx| and log p", (_X, _CONTEXT))
OPERATIONS = (SAMPLE, SAMPLE_STREAM, LOG_LIKELIHOOD, ENCODE)

_INTEGER_TEXT = re.compile(r"-?[0-9]{1,20}")
_NUMBER_TEXT = re.compile(r"-?[0-9]{1,40}(\.[0-9]{0,40})?([eE][-+]?[0-9]{1,4})?")


def read_fields(operation: Operation, body: Mapping[str, object] | None, query: Mapping[str, str],
                arrays: Mapping[str, np.ndarray]) -> dict[str, object]:
    """The values of ``operation``'s fields from a JSON ``body``, the ``query`` parameters and
    the ``arrays`` of an .npy body; absent fields are left out. InvalidArgument names the field."""
    known = {f.name: f for f in operation.fields}
    values: dict[str, object] = dict(arrays)
    for name, text in query.items():
        field = _known(known, name, "query parameter")
        if field.kind == ARRAY:
            raise InvalidArgument(f"{name} is an array: send it in a JSON body or as .npy, not in the query")
        _add(values, name, _from_text(field, text))
    for name, value in (body or {}).items():
        _add(values, name, _from_json(_known(known, name, "field"), value))
    return values


def _known(known: dict[str, Field], name: str, what: str) -> Field:
    if name not in known:
        raise InvalidArgument(f"unknown {what} {quoted(name)}; this operation takes {', '.join(known)}")
    return known[name]


def _add(values: dict[str, object], name: str, value: object) -> None:
    if name in values:
        raise InvalidArgument(f"{name} is given more than once (in the query, the JSON body or the .npy body); "
                              "give it once")
    values[name] = value


def _from_text(field: Field, text: str) -> object:
    """A query parameter's value, by the field's kind."""
    if field.kind == BOOLEAN:
        if text not in ("true", "false"):
            raise InvalidArgument(f"{field.name} must be true or false, got {quoted(text, 16)}")
        return text == "true"
    pattern = _INTEGER_TEXT if field.kind == INTEGER else _NUMBER_TEXT
    if not pattern.fullmatch(text):
        raise InvalidArgument(f"{field.name} must be {_a(field.kind)}, got {quoted(text, 16)}")
    return _checked(field, int(text) if field.kind == INTEGER else float(text))


def _from_json(field: Field, value: object) -> object:
    """A JSON body's value, by the field's kind (a JSON boolean is no number)."""
    if field.kind == ARRAY:
        return array_of(value, field.name)
    if field.kind == BOOLEAN:
        if not isinstance(value, bool):
            raise InvalidArgument(f"{field.name} must be true or false, got {_json_type(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            field.kind == INTEGER and not isinstance(value, int)):
        raise InvalidArgument(f"{field.name} must be {_a(field.kind)}, got {_json_type(value)}")
    return _checked(field, value)


def _checked(field: Field, value: int | float) -> int | float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{field.name} must be a finite number")
    if field.minimum is not None and value < field.minimum or field.maximum is not None and value > field.maximum:
        raise InvalidArgument(f"{field.name} must be in {field.minimum}..{field.maximum}, got "
                              f"{quoted(str(value), 24)}")
    if field.exclusive_minimum is not None and value <= field.exclusive_minimum:
        raise InvalidArgument(f"{field.name} must be > {field.exclusive_minimum}, got {quoted(str(value), 24)}")
    return value


def _a(kind: str) -> str:
    return {INTEGER: "an integer", NUMBER: "a number"}[kind]


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", list: "an array", dict: "an object"}.get(type(value), "a number")


def array_of(value: object, field: str) -> np.ndarray:
    """A JSON value as a float32 array: nested lists of numbers, rectangular, not empty."""
    if not isinstance(value, list):
        raise InvalidArgument(f"{field} must be an array of numbers, got {_json_type(value)}")
    try:
        array = np.array(value)
    except ValueError:  # ragged
        raise InvalidArgument(f"{field} is not rectangular: its rows differ in length or depth") from None
    if array.dtype.kind not in "iuf" or array.dtype == np.bool_:
        raise InvalidArgument(f"{field} must hold numbers only")
    if array.ndim > MAX_DIMS:
        raise InvalidArgument(f"{field} has {array.ndim} dimensions; at most {MAX_DIMS}")
    if array.size == 0:
        raise InvalidArgument(f"{field} is empty: shape {list(array.shape)}")
    if np.abs(array).max() > FLOAT32_MAX:
        raise InvalidArgument(f"{field} has values beyond float32's range (±{FLOAT32_MAX:.4g})")
    return array.astype(WIRE_DTYPE)


def json_parse_bytes(body: bytes) -> int:
    """A bound on the memory that ``json.loads(body)`` takes: the body decoded to text, every
    container an empty list or dict (64 to 72 bytes, and a pointer to hold it), every other
    value a float (24 bytes, a pointer and the list's slack), and the text of its strings."""
    containers = body.count(b"[") + body.count(b"{")
    values = body.count(b",") + body.count(b":") + 1
    return 80 * containers + 40 * values + 2 * len(body) + 4096  # and the parser's own few objects


def parse_json(body: bytes) -> dict[str, object]:
    """A JSON object body, parsed only if its bound fits :data:`MAX_JSON_PARSE_BYTES`; numbers
    only as JSON writes them (no NaN or Infinity)."""
    cost = json_parse_bytes(body)
    if cost > MAX_JSON_PARSE_BYTES:
        raise InvalidArgument(f"this JSON body could take {cost >> 20} MiB to parse, above the gateway's "
                              f"{MAX_JSON_PARSE_BYTES >> 20} MiB: send its arrays as application/x-npy")
    try:
        document = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidArgument("the JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise InvalidArgument(f"the body is not JSON: {str(error)[:120]}") from None
    if not isinstance(document, dict):
        raise InvalidArgument(f"the JSON body must be an object of fields, got {_json_type(document)}")
    return document


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def json_floats(array: np.ndarray) -> list:
    """``array`` as nested lists of floats, with NaN and ±inf as the strings "NaN", "Infinity"
    and "-Infinity" (protobuf's JSON mapping: JSON has no such numbers)."""
    finite = np.isfinite(array)
    if finite.all():
        return array.tolist()
    values = array.astype(object)
    values[~finite] = [("NaN" if math.isnan(v) else _NON_FINITE[v]) for v in array[~finite].tolist()]
    return values.tolist()

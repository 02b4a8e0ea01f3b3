"""The HTTP API's request fields, JSON within a memory bound, and .npy bodies read without pickle."""

from __future__ import annotations

import io
import json
import tracemalloc

import numpy as np
import pytest
from helpers.fakes import npy_bytes

from flowserve.server.gateway.rest import fields, openapi
from flowserve.server.gateway.rest.fields import LOG_LIKELIHOOD, SAMPLE, json_floats, parse_json, read_fields
from flowserve.server.protocol import npy
from flowserve.server.protocol.errors import InvalidArgument


def test_fields_come_from_the_query_or_the_body_typed_and_bounded():
    values = read_fields(SAMPLE, {"num_samples": 5, "context": [[1, 2]]}, {"seed": "18446744073709551615",
                                                                          "return_log_prob": "true"}, {})
    assert values["seed"] == 2**64 - 1 and values["return_log_prob"] is True and values["num_samples"] == 5
    assert values["context"].dtype == np.float32 and values["context"].shape == (1, 2)
    for query, body, message in [
        ({"seed": "18446744073709551616"}, None, "seed must be in 0..18446744073709551615"),
        ({"seed": "1e3"}, None, "seed must be an integer, got '1e3'"),
        ({"temperature": "0"}, None, "temperature must be > 0, got '0.0'"),
        ({"temperature": "nan"}, None, "temperature must be a number, got 'nan'"),
        ({"return_log_prob": "1"}, None, "return_log_prob must be true or false, got '1'"),
        ({"context": "[1]"}, None, "context is an array: send it in a JSON body or as .npy, not in the query"),
        ({}, {"temperature": 1e400}, "temperature must be a finite number"),
        ({}, {"max_draws": 2.0}, "max_draws must be an integer, got a number"),
        ({}, {"context": [[True]]}, "context must hold numbers only"),
        ({}, {"context": [1e39]}, "context has values beyond float32's range"),
        ({}, {"context": []}, "context is empty: shape [0]"),
    ]:
        with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace("[", r"\[")):
            read_fields(SAMPLE, body, query, {})


def test_a_long_unknown_name_is_quoted_within_bounds():
    with pytest.raises(InvalidArgument) as refused:
        read_fields(SAMPLE, {"x" * 10_000: 1}, {}, {})
    assert len(str(refused.value)) < 300 and "(10000 characters)" in str(refused.value)


@pytest.mark.parametrize("body", [
    b"[" + b"0," * 200_000 + b"0]",
    b"[" + b"1e300," * 100_000 + b"1]",
    b"[" + b"[]," * 100_000 + b"[]]",
    b"[" + b"{}," * 100_000 + b"{}]",
    b'{"a": "' + b"z" * 500_000 + b'"}',
    json.dumps({"x": np.random.default_rng(0).normal(size=(2000, 16)).tolist()}).encode(),
], ids=["zeros", "floats", "lists", "objects", "a long string", "rows"])
def test_json_parsing_takes_no_more_memory_than_its_bound(body):
    tracemalloc.start()
    try:
        json.loads(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= fields.json_parse_bytes(body)


def test_json_over_the_bound_is_refused_before_it_is_parsed(monkeypatch):
    monkeypatch.setattr(fields, "MAX_JSON_PARSE_BYTES", 1 << 20)
    with pytest.raises(InvalidArgument, match="could take 2 MiB to parse, above the gateway's 1 MiB: send its "
                                              "arrays as application/x-npy"):
        parse_json(b"[" + b"[]," * 20_000 + b"[]]")
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        parse_json(b"[" * 5_000)
    with pytest.raises(InvalidArgument, match="must be an object of fields, got an array"):
        parse_json(b"[1]")


def test_non_finite_answers_become_protobufs_json_strings():
    values = np.array([[1.5, -np.inf], [np.nan, np.inf]], np.float32)
    assert json_floats(values) == [[1.5, "-Infinity"], ["NaN", "Infinity"]]
    assert json_floats(values[:1, :1]) == [[1.5]]


def test_npy_bodies_plain_or_structured_big_endian_or_double_read_as_float32():
    x = np.arange(12, dtype=">f8").reshape(3, 2, 2)
    (plain,) = npy.read(npy_bytes(x), LOG_LIKELIHOOD.arrays).values()
    assert plain.dtype == np.float32 and np.array_equal(plain, x)
    table = np.zeros(3, [("x", "<f4", (2, 2)), ("context", "<f8", (3,))])
    table["context"] = 7
    read = npy.read(npy_bytes(table), LOG_LIKELIHOOD.arrays)
    assert set(read) == {"x", "context"} and read["context"].dtype == np.float32 and (read["context"] == 7).all()
    answer = np.load(io.BytesIO(npy.write({"samples": np.ones((2, 3, 2)), "log_prob": np.zeros((2, 3))}, (2, 3))))
    assert answer.shape == (2, 3) and answer["samples"].shape == (2, 3, 2) and answer.dtype.names == (
        "samples", "log_prob")


@pytest.mark.parametrize(("body", "message"), [
    (b"not an npy file", "the body is not a readable .npy array"),
    (npy_bytes(np.array([{"a": 1}], dtype=object)), "dtype is |O; send float32 or float64"),
    (npy_bytes(np.arange(4)), "dtype is <i8; send float32 or float64"),
    (npy_bytes(np.zeros(3, [("secret", "<f4")])), "has a field 'secret'; its fields may be x, context"),
    (npy_bytes(np.zeros(3, [("x", "<i4")])), "field 'x' has dtype <i4"),
    (npy_bytes(np.asfortranarray(np.zeros((3, 2), np.float32))), "Fortran order"),
    (npy_bytes(np.zeros((3, 2), np.float32))[:-4], "says 6 items of 4 bytes, but 20 bytes follow it"),
    (npy_bytes(np.zeros((0, 2), np.float32)), "empty: shape [0, 2]"),
    (npy_bytes(np.zeros([1] * 17, np.float32)), "17 dimensions; at most 16"),
])
def test_npy_bodies_that_are_not_float_arrays_are_refused_precisely(body, message):
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("|", r"\|")):
        npy.read(body, LOG_LIKELIHOOD.arrays)


def test_the_description_names_every_field_of_every_operation():
    paths = openapi.document()["paths"]
    for operation in fields.OPERATIONS:
        post = paths[f"/v1/models/{{model}}/{operation.path}"]["post"]
        body = post["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert list(body) == [f.name for f in operation.fields]
        query = [p["name"] for p in post["parameters"] if p["in"] == "query"]
        assert query == [f.name for f in operation.fields if f.kind != fields.ARRAY]

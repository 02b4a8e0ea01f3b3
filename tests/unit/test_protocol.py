"""What both sides of the wire share: every error kind maps to one transport-neutral status,
which names a gRPC status code and carries an HTTP status; and the syntax of bearer tokens."""

from __future__ import annotations

import grpc
import pytest

from flowserve.server.protocol.auth import bearer_metadata, token_of
from flowserve.server.protocol.errors import (
    STATUS_OF_ERROR,
    BackendError,
    BackendUnavailable,
    DeadlineExceeded,
    FailedPrecondition,
    FlowServeError,
    InvalidArgument,
    ModelNotFound,
    PermissionDenied,
    ResourceExhausted,
    Status,
    Unauthenticated,
    status_of,
)


@pytest.mark.parametrize(("error", "code", "http"), [
    (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION, 400),
    (ModelNotFound("x"), grpc.StatusCode.NOT_FOUND, 404),
    (ResourceExhausted("x", retry_after_s=0.1), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (BackendUnavailable("x"), grpc.StatusCode.UNAVAILABLE, 503),
    (DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (BackendError("x"), grpc.StatusCode.INTERNAL, 500),
    (Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED, 401),
    (PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED, 403),
], ids=["invalid-argument", "failed-precondition", "not-found", "resource-exhausted", "unavailable", "deadline-exceeded",
        "internal", "unauthenticated", "permission-denied"])
def test_each_error_has_one_status_for_grpc_and_for_http(error, code, http):
    assert grpc.StatusCode[status_of(error).name] == code
    assert status_of(error).http == http
    assert status_of(error).value[1] == code.value[0]


def test_every_error_kind_is_in_the_table_and_a_new_one_gets_its_parents_status():
    assert set(FlowServeError.__subclasses__()) == set(STATUS_OF_ERROR)

    class EmptyBatch(InvalidArgument):
        pass

    assert status_of(EmptyBatch("x")) is Status.INVALID_ARGUMENT
    assert status_of(FlowServeError("x")) is Status.INTERNAL


def test_a_token_travels_as_bearer_metadata_and_reads_back():
    key, value = bearer_metadata("s3cr3t-Token_for.tests~1+2/3==")
    assert (key, value) == ("authorization", "Bearer s3cr3t-Token_for.tests~1+2/3==")
    assert token_of(value) == token_of("bearer   s3cr3t-Token_for.tests~1+2/3==") == "s3cr3t-Token_for.tests~1+2/3=="
    assert token_of("Basic dXNlcg==") is None and token_of("Bearer a=b") is None
    with pytest.raises(ValueError, match="not a bearer token") as refused:
        bearer_metadata("has space")
    assert "has space" not in str(refused.value)  # never echoed

"""Conversion between numpy arrays and the ``flowserve.v1.Tensor`` message, and the large
responses (Sample, LogLikelihood) written in protobuf's wire format straight from arrays."""

from __future__ import annotations

import math
import struct

import numpy as np

from flowserve.server.protocol.errors import InvalidArgument

from .proto import flowserve_pb2 as pb

WIRE_DTYPE = np.dtype("<f4")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest gRPC message the gateway and its client accept or send."""
MAX_DIMS = 16
"""Most dimensions a request's tensor may have (a batch of images has four)."""


def encode(array: np.ndarray) -> pb.Tensor:
    """A float32, little-endian, row-major Tensor of ``array``."""
    array = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    return pb.Tensor(shape=list(array.shape), data=array.tobytes())


def decode(tensor: pb.Tensor, field: str, expected_shape: str = "[N, *event_shape]") -> np.ndarray:
    """The array a Tensor carries; raises InvalidArgument naming ``field`` if malformed.

    ``expected_shape`` describes the shape to send, for the message when the shape is missing.
    """
    if len(tensor.shape) > MAX_DIMS:
        raise InvalidArgument(f"{field}.shape has {len(tensor.shape)} dimensions; at most {MAX_DIMS}: send {expected_shape}")
    shape = list(tensor.shape)
    if not shape:
        raise InvalidArgument(f"{field}.shape is missing: send {expected_shape}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape {shape} has a negative dimension")
    expected = math.prod(shape) * WIRE_DTYPE.itemsize
    if len(tensor.data) != expected:
        raise InvalidArgument(
            f"{field}.data has {len(tensor.data)} bytes but {field}.shape {shape} of float32 needs {expected}"
        )
    if math.prod(shape) == 0:
        raise InvalidArgument(f"{field} is empty: shape {shape}")
    return np.frombuffer(tensor.data, dtype=WIRE_DTYPE).reshape(shape)


class Serialized:
    """A response message already in protobuf's wire format, built by :func:`sample_response`
    or :func:`log_likelihood_response`; :func:`serializer` passes it through as it is.

    Building a large response as a message costs a copy per step (array to bytes, bytes into
    the Tensor, the Tensor into the response, the response to the wire); joining the arrays'
    buffers into the wire format costs one.
    """

    __slots__ = ("data", "rows")

    def __init__(self, data: bytes, rows: int):
        self.data = data
        self.rows = rows


def serializer(serialize):
    """``serialize`` (a message's SerializeToString) that passes :class:`Serialized` through."""
    return lambda message: message.data if isinstance(message, Serialized) else serialize(message)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(message, field: str, wire_type: int) -> bytes:
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | wire_type)


_LENGTH_DELIMITED, _VARINT, _FIXED64 = 2, 0, 1


def _length_delimited(message, field: str, parts: list) -> list:
    """``parts`` (buffers) as the length-delimited field ``field``; nothing when empty, as proto3 writes it."""
    size = sum(memoryview(part).nbytes for part in parts)
    return [_key(message, field, _LENGTH_DELIMITED), _varint(size), *parts] if size else []


def _tensor(array: np.ndarray) -> list:
    array = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    shape = b"".join(_varint(d) for d in array.shape)
    return (_length_delimited(pb.Tensor, "shape", [shape])
            + _length_delimited(pb.Tensor, "data", [memoryview(array).cast("B")]))


def _floats(array: np.ndarray | None) -> list:
    return [] if array is None else [memoryview(np.ascontiguousarray(array, dtype=WIRE_DTYPE)).cast("B")]


def sample_response(samples: np.ndarray, log_prob: np.ndarray | None, seed: int, first_row: int = 0,
                    rows: int | None = None, acceptance_rate: float = 0.0, draws: int = 0) -> Serialized:
    """A ``SampleResponse`` on the wire, the samples' bytes copied once; ``rows`` (the samples
    it carries, for the metrics) defaults to ``len(samples)``."""
    parts = _length_delimited(pb.SampleResponse, "samples", _tensor(samples))
    parts += _length_delimited(pb.SampleResponse, "log_prob", _floats(log_prob))
    for field, value in (("seed", seed), ("first_row", first_row)):
        if value:
            parts += [_key(pb.SampleResponse, field, _VARINT), _varint(value)]
    if acceptance_rate:
        parts += [_key(pb.SampleResponse, "acceptance_rate", _FIXED64), struct.pack("<d", acceptance_rate)]
    if draws:
        parts += [_key(pb.SampleResponse, "draws", _VARINT), _varint(draws)]
    return Serialized(b"".join(parts), len(samples) if rows is None else rows)


def encode_response(z: np.ndarray, log_det: np.ndarray, log_prob: np.ndarray) -> Serialized:
    """An ``EncodeResponse`` on the wire."""
    parts = _length_delimited(pb.EncodeResponse, "z", _tensor(z))
    parts += _length_delimited(pb.EncodeResponse, "log_det", _floats(log_det))
    parts += _length_delimited(pb.EncodeResponse, "log_prob", _floats(log_prob))
    return Serialized(b"".join(parts), len(z))


def log_likelihood_response(log_prob: np.ndarray, bits_per_dim: np.ndarray | None) -> Serialized:
    """A ``LogLikelihoodResponse`` on the wire."""
    parts = _length_delimited(pb.LogLikelihoodResponse, "log_prob", _floats(log_prob))
    parts += _length_delimited(pb.LogLikelihoodResponse, "bits_per_dim", _floats(bits_per_dim))
    return Serialized(b"".join(parts), len(log_prob))

"""Conversion between numpy arrays and the ``flowserve.v1.Tensor`` message."""

from __future__ import annotations

import math

import numpy as np

from .domain import InvalidArgument
from .proto import flowserve_pb2 as pb

WIRE_DTYPE = np.dtype("<f4")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest gRPC message the gateway and its client accept or send."""


def encode(array: np.ndarray) -> pb.Tensor:
    """A float32, little-endian, row-major Tensor of ``array``."""
    array = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    return pb.Tensor(shape=list(array.shape), data=array.tobytes())


def decode(tensor: pb.Tensor, field: str, expected_shape: str = "[N, *event_shape]") -> np.ndarray:
    """The array a Tensor carries; raises InvalidArgument naming ``field`` if malformed.

    ``expected_shape`` describes the shape to send, for the message when the shape is missing.
    """
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

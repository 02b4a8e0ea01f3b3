"""``.npy`` bodies of the HTTP API (``application/x-npy``), read without pickle.

A request body is one float array (little- or big-endian float32 or float64, C order), or a
structured array whose fields are named arrays of the request; a response is a structured
array with one field per output. Whatever a header says, an array is read only when its
bytes are exactly what its shape and dtype need.
"""

from __future__ import annotations

import io
import math

import numpy as np

from .errors import InvalidArgument, quoted
from .tensors import MAX_DIMS, WIRE_DTYPE

MEDIA_TYPE = "application/x-npy"
MAX_HEADER_BYTES = 10_000
"""The longest .npy header read (numpy's own default bound)."""
_FLOAT_KINDS = {np.dtype(t) for t in ("<f4", ">f4", "<f8", ">f8")}


def read(body: bytes, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of an .npy ``body`` as float32, by name: a plain array is ``fields[0]``; a
    structured array gives each of its fields, which must be among ``fields``.
    InvalidArgument says what is wrong, quoting nothing of the body."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream, MAX_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream, MAX_HEADER_BYTES)
        else:
            raise ValueError(f"version {version[0]}.{version[1]} is not 1.0 or 2.0")
    except (ValueError, SyntaxError, TypeError, EOFError, OverflowError) as error:
        raise InvalidArgument(f"the body is not a readable .npy array ({_cut(error)})") from None
    if fortran_order:
        raise InvalidArgument("the .npy array is in Fortran order; send it in C order (np.ascontiguousarray)")
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"the .npy array has {len(shape)} dimensions; at most {MAX_DIMS}")
    _check_dtype(dtype, fields)
    count = math.prod(shape)
    offset = stream.tell()
    if len(body) - offset != count * dtype.itemsize:
        raise InvalidArgument(f"the .npy header says {count} items of {dtype.itemsize} bytes, but "
                              f"{len(body) - offset} bytes follow it")
    if count == 0:
        raise InvalidArgument(f"the .npy array is empty: shape {list(shape)}")
    array = np.frombuffer(body, dtype, count=count, offset=offset).reshape(shape)
    if dtype.names is None:
        return {fields[0]: array.astype(WIRE_DTYPE, copy=False)}
    return {name: np.ascontiguousarray(array[name], WIRE_DTYPE) for name in dtype.names}


def _check_dtype(dtype: np.dtype, fields: tuple[str, ...]) -> None:
    if dtype.names is None:
        if dtype not in _FLOAT_KINDS:
            raise InvalidArgument(f"the .npy array's dtype is {_cut(dtype.str)}; send float32 or float64")
        return
    for name in dtype.names:
        if name not in fields:
            raise InvalidArgument(f"the .npy array has a field {quoted(name, 32)}; its fields may be "
                                  f"{', '.join(fields)}")
        base = dtype.fields[name][0].base
        if base not in _FLOAT_KINDS:
            raise InvalidArgument(f"the .npy field {name!r} has dtype {_cut(base.str)}; send float32 or float64")


def _cut(value: object, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def write(arrays: dict[str, np.ndarray], rows: tuple[int, ...]) -> bytes:
    """One .npy structured array of shape ``rows``: a float32 field per item of ``arrays``, each
    of shape [*rows, *field_shape]."""
    dtype = np.dtype([(name, WIRE_DTYPE, array.shape[len(rows):]) for name, array in arrays.items()])
    table = np.empty(rows, dtype)
    for name, array in arrays.items():
        table[name] = array
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, table, allow_pickle=False)
    return buffer.getvalue()

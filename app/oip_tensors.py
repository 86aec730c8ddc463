"""Tensor coding of the Open Inference Protocol, shared by every front-end that speaks it: HTTP JSON and
the binary tensor data extension (`app/v2.py`) and gRPC (`app/grpc_server.py`).

Raw (binary / gRPC `raw_*_contents`) layout, as the protocol specifies: little-endian, row-major, no
padding; BOOL one byte; each BYTES element a 4-byte little-endian length followed by its bytes.

Everything a client sends is checked before it is trusted: shapes are non-negative integers whose
element count is bounded, lengths must fit in the bytes that are really there, and the bytes must be
consumed exactly. Violations raise `InvalidInput` (400 over HTTP, INVALID_ARGUMENT over gRPC).
"""
from __future__ import annotations

import struct
from typing import Any, Iterable

import numpy as np

from app.core.errors import InvalidInput

# fixed-size datatypes (little-endian numpy dtypes); BYTES is variable-size
FIXED = {"BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "|i1",
         "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
DATATYPES = (*FIXED, "BYTES")
MAX_DIMS = 8
_LEN = struct.Struct("<I")


def element_count(shape: Any, name: str, limit: int) -> int:
    """Elements of a tensor of `shape` (a list of non-negative ints); refuses more than `limit` elements
    before anything is allocated (shapes like [2**62, 2**62] never reach numpy)."""
    if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InvalidInput(f"input '{name}' has an invalid shape {list(shape) if isinstance(shape, tuple) else shape!r}: "
                           f"expected a list of at most {MAX_DIMS} non-negative integers")
    n = 1
    for d in shape:
        n *= d
        if n > limit:
            raise InvalidInput(f"input '{name}' shape {list(shape)} has more than {limit} elements")
    return n


def serialize_bytes(values: Iterable[bytes]) -> bytes:
    """BYTES elements in the raw layout: length (uint32 LE) + bytes, for each element."""
    parts = []
    for v in values:
        parts.append(_LEN.pack(len(v)))
        parts.append(v)
    return b"".join(parts)


def deserialize_bytes(raw: bytes | memoryview, count: int, name: str) -> list[bytes]:
    """Exactly `count` BYTES elements that use exactly all of `raw`."""
    view = memoryview(raw)
    out: list[bytes] = []
    pos, end = 0, len(view)
    for i in range(count):
        if end - pos < 4:
            raise InvalidInput(f"input '{name}': binary data ends inside the length of element {i} "
                               f"({end - pos} byte(s) left, {count} element(s) expected)")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if n > end - pos:
            raise InvalidInput(f"input '{name}': element {i} claims {n} bytes but only {end - pos} remain")
        out.append(bytes(view[pos:pos + n]))
        pos += n
    if pos != end:
        raise InvalidInput(f"input '{name}': {end - pos} byte(s) left after its {count} element(s)")
    return out


def decode_raw(datatype: Any, shape: Any, raw: bytes | memoryview, name: str, limit: int) -> list[Any]:
    """A tensor's raw bytes -> its flat elements (bytes for BYTES, Python numbers otherwise)."""
    if datatype not in DATATYPES:
        raise InvalidInput(f"input '{name}' has unknown datatype {datatype!r}; expected one of {list(DATATYPES)}")
    count = element_count(shape, name, limit)
    if datatype == "BYTES":
        return deserialize_bytes(raw, count, name)
    dtype = np.dtype(FIXED[datatype])
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"input '{name}': {len(raw)} bytes of binary data, shape {list(shape)} of {datatype} "
                           f"needs {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).tolist()


def encode_raw(datatype: str, data: list[Any]) -> bytes:
    """Flat elements -> raw bytes (str elements of BYTES are UTF-8 encoded)."""
    if datatype == "BYTES":
        return serialize_bytes(v.encode() if isinstance(v, str) else bytes(v) for v in data)
    return np.asarray(data, dtype=np.dtype(FIXED[datatype])).tobytes()


def flatten(data: Any) -> list[Any]:
    """JSON tensor data, flat or nested (row-major) -> flat list."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:  # iterative: a deeply nested body cannot exhaust the recursion limit
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


__all__ = ["DATATYPES", "FIXED", "decode_raw", "deserialize_bytes", "element_count", "encode_raw", "flatten",
           "serialize_bytes"]

"""Messages between the engine and its front-ends (MMSERVE_WORKERS > 1) on a private Unix stream socket.

A frame is pickle protocol 5 with its large buffers out of band, so numpy arrays (features going in, output rows
coming back) travel as their raw bytes after a small header, never copied into the pickle stream:

    !II   length of the pickle, number of buffers
    !Q*   length of each buffer
    the pickle, then each buffer

Pickle is acceptable here: both ends are our own processes and the socket lives in a 0700 directory that only
this server's user can reach. A message is a tuple whose first element names it (`app/core/engine.py` lists them).

Errors cross as (class name, code, message, retry_after, details, request_id) and come back as the same
`ServingError` subclass, so a front-end maps them to the same status and JSON as in one process.
"""
from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

from app.core import errors
from app.core.errors import ServingError

HEAD = struct.Struct("!II")
SIZE = struct.Struct("!Q")
MAX_BUFFERS = 4096  # a bound on one frame's buffers (a frame of ours has a few per item)


def encode(message: Any) -> list[bytes | memoryview]:
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = HEAD.pack(len(body), len(raws)) + b"".join(SIZE.pack(r.nbytes) for r in raws)
    return [head, body, *raws]


def send(writer: asyncio.StreamWriter, message: Any) -> None:
    """Queue `message` on `writer` (no await: the transport buffers it). A closed writer drops it."""
    if not writer.is_closing():
        writer.writelines(encode(message))


async def receive(reader: asyncio.StreamReader) -> Any:
    """The next message; asyncio.IncompleteReadError when the other end has gone."""
    n_body, n_buffers = HEAD.unpack(await reader.readexactly(HEAD.size))
    if n_buffers > MAX_BUFFERS:
        raise ValueError(f"frame with {n_buffers} buffers")
    sizes = struct.unpack(f"!{n_buffers}Q", await reader.readexactly(SIZE.size * n_buffers)) if n_buffers else ()
    body = await reader.readexactly(n_body)
    buffers = [await reader.readexactly(n) for n in sizes]
    return pickle.loads(body, buffers=buffers)


def error_out(err: BaseException) -> tuple:
    if not isinstance(err, ServingError):
        err = errors.InternalError("inference failed")
    return (type(err).__name__, err.code, err.message, err.retry_after, err.details, err.request_id)


def error_in(wire: tuple) -> ServingError:
    """The ServingError `error_out` sent (same class, code, message, retry-after)."""
    name, code, message, retry_after, details, request_id = wire
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ServingError)):
        cls = ServingError
    err = cls.__new__(cls)
    ServingError.__init__(err, message, details=details, retry_after=retry_after, request_id=request_id)
    err.code = code
    return err


__all__ = ["encode", "error_in", "error_out", "receive", "send"]

"""After a burst, hand the heap memory it freed back to the operating system.

Python frees objects to its allocators (pymalloc's arenas, glibc's heap), which keep the pages for reuse: after an
overload (a thousand connections' buffers, requests and responses) the server's RSS stayed at its high-water mark
though nothing leaked (bench/overload.py: +10.6% on the tiny model, flat over further bursts). glibc's
`malloc_trim(0)` returns the heap's free pages. `trim_when_idle` calls it, off the event loop, when the service has
answered requests since the last look and has none in flight, at most once every `interval_s`: at steady load it
runs in the gaps, and it costs a few milliseconds of one thread. Without glibc (musl, macOS) it does nothing.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from typing import Callable

log = logging.getLogger("mmserve.memory")


def malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)` as a function, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


async def trim_when_idle(activity: Callable[[], tuple[int, int]], interval_s: float = 5.0,
                         trim: Callable[[], int] | None = None) -> None:
    """Run until cancelled. `activity()` -> (requests in flight, requests answered so far); `trim`: malloc_trim's."""
    trim = trim or malloc_trim()
    if trim is None:
        return
    seen = activity()[1]
    while True:
        await asyncio.sleep(interval_s)
        inflight, answered = activity()
        if inflight == 0 and answered != seen:
            seen = answered
            await asyncio.to_thread(trim)

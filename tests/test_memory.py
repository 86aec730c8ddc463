"""app/core/memory.py: freed heap pages go back to the OS once the service is idle after serving."""
from __future__ import annotations

import asyncio
import platform

import pytest

from app.core.memory import malloc_trim, trim_when_idle


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_malloc_trim_is_glibcs_and_runs():
    trim = malloc_trim()
    assert trim is not None
    blocks = [bytearray(256 * 1024) for _ in range(64)]  # 16 MiB of heap, then freed: something to give back
    del blocks
    assert trim() in (0, 1)


def test_trims_once_per_idle_gap_after_requests_never_while_in_flight():
    # (in flight, answered) as the service reports them, one per look
    looks = iter([(0, 0), (0, 0), (3, 10), (0, 12), (0, 12), (1, 13), (0, 14), (0, 14)])
    calls: list[tuple[int, int]] = []
    state = {"now": (0, 0)}

    def activity() -> tuple[int, int]:
        state["now"] = next(looks)
        return state["now"]

    def trim() -> int:
        calls.append(state["now"])
        return 1

    async def run() -> None:
        task = asyncio.create_task(trim_when_idle(activity, interval_s=0.001, trim=trim))
        while True:
            await asyncio.sleep(0.005)
            if task.done():
                break
        with pytest.raises(RuntimeError, match="StopIteration"):  # the looks ran out: the loop asked once more
            task.result()

    asyncio.run(run())
    # idle with nothing answered: no trim; busy: no trim; idle after answering: one trim per gap
    assert calls == [(0, 12), (0, 14)]

"""The serving process's own hygiene: freed heap pages back to the OS once idle (app/core/memory.py), numpy's BLAS on one
thread (app/__main__.py)."""
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


def _blas_threads(env_extra: dict[str, str]) -> int:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"} | env_extra
    code = ("import app.__main__, numpy, json; from threadpoolctl import threadpool_info; "
            "print(json.dumps([i['num_threads'] for i in threadpool_info() if i['internal_api'] == 'openblas']))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    counts = json.loads(out)
    if not counts:
        pytest.skip("this numpy is not built on OpenBLAS")
    return counts[0]


def test_the_server_process_runs_numpys_blas_on_one_thread_unless_told_otherwise():
    """`python -m app` (and so every front-end it starts) keeps OpenBLAS to one thread: its busy-waiting pools fought
    the server's own preprocessing threads and processes for the cores. A user's OPENBLAS_NUM_THREADS wins."""
    pytest.importorskip("threadpoolctl")
    assert _blas_threads({}) == 1
    assert _blas_threads({"OPENBLAS_NUM_THREADS": "2"}) == 2

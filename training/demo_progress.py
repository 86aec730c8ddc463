"""Progress lines for a long, staged build (the demo build)."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class Progress:
    """Stage lines with elapsed times: `==> [2/8] train demo-classify ...` / `    done in 12.3 s (total 40.1 s)`."""

    def __init__(self, total: int, out=None):
        self.total, self.index = total, 0
        self.started = time.perf_counter()
        self.out = out or sys.stdout
        self.timings: list[tuple[str, float]] = []

    def say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.index += 1
        self.say(f"==> [{self.index}/{self.total}] {name}  (t={self.elapsed():.0f}s)")
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        self.timings.append((name, seconds))
        self.say(f"    done in {seconds:.1f} s (total {self.elapsed():.1f} s)")

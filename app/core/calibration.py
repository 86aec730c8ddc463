"""Batch sizing at warm-up: MAX_BATCH_SIZE=auto timed on the model's own device, and any worst-case batch that
runs out of memory halved until it fits.

`auto` times real worst-case batches of 1, 2, 4, ... up to the manifest's max_batch_size and keeps the smallest size
whose items/s is within 5% of the best measured. The one rule reads differently per device:
* CPU: big models get slower per item in big batches (caches), so the best is often a middle size.
* GPU: items/s rises with the batch until the device is saturated, then flattens; the rule picks where it
  flattens. Past that point a bigger batch buys no throughput and only makes each batch (the latency of every
  request in it) longer. A size that runs out of device memory ends the sweep: the choice is among sizes that ran.
  The sweep gets a bigger time budget on GPU (GPU_BUDGET_S), since a truncated sweep there would stop on the
  rising part of the curve and under-size the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from app.runtime import is_out_of_memory

CALIBRATION_BUDGET_S = 2.0  # model time per model, about (a bigger next size is skipped when it would overrun)
GPU_BUDGET_S = 4.0  # ... on a GPU (see the module's docstring)
CALIBRATION_REPS = 2  # runs per size at least; the fastest counts (the first run of a new shape may allocate)
# ... and more runs (up to 50) while a size has had less than this: the fastest of two runs of 35 ms on a shared core
# once measured batch 4 of the demo model at 92 items/s against 141 (its usual), which stopped the sweep and chose
# batch 2, 0.66 of the throughput batch 8 gives; over 0.15 s the fastest run is the model's, not the neighbours'
CALIBRATION_MIN_SIZE_S = 0.15
CALIBRATION_STOP = 0.8  # stop trying larger sizes once items/s falls below this share of the best so far
CALIBRATION_TOLERANCE = 0.05  # choose the smallest size within 5% of the best items/s


def calibration_sizes(max_size: int) -> list[int]:
    """1, 2, 4, ... below max_size, then max_size itself."""
    sizes, n = [], 1
    while n < max_size:
        sizes.append(n)
        n *= 2
    return sizes + [max(1, max_size)]


def measure_batch_sizes(run_once: Callable[[int], float], max_size: int, *, budget_s: float = CALIBRATION_BUDGET_S,
                        reps: int = CALIBRATION_REPS, min_size_s: float = CALIBRATION_MIN_SIZE_S,
                        stop_ratio: float = CALIBRATION_STOP, out_of_memory: list[int] | None = None
                        ) -> dict[int, float]:
    """Seconds per batch (fastest of at least `reps` runs, more while the size has had less than `min_size_s`)
    for batch sizes 1, 2, 4, ... up to max_size.

    `run_once(size)` runs one batch and returns its seconds. Bounded: a size is not started when its estimated
    cost (reps x size x the last size's seconds per item) would take the total past `budget_s` (size 1 always
    runs), and the sweep stops once items/s falls below `stop_ratio` of the best so far, or at the first size that
    runs out of memory (`app.runtime.is_out_of_memory`; it is not in the result, it is appended to `out_of_memory`).
    Size 1 running out of memory raises."""
    timings: dict[int, float] = {}
    spent = best = 0.0
    for size in calibration_sizes(max_size):
        if timings:
            last = max(timings)
            if spent + reps * size * timings[last] / last > budget_s:
                break
        runs: list[float] = []
        try:
            while len(runs) < reps or (sum(runs) < min_size_s and len(runs) < 50):
                runs.append(run_once(size))
                spent += runs[-1]
                if spent > budget_s:
                    break
        except Exception as exc:
            if not timings or not is_out_of_memory(exc):
                raise
            if out_of_memory is not None:
                out_of_memory.append(size)
            break
        timings[size] = min(runs)
        rate = size / max(timings[size], 1e-9)
        if rate < stop_ratio * best:
            break
        best = max(best, rate)
    return timings


def choose_batch_size(timings: dict[int, float], tolerance: float = CALIBRATION_TOLERANCE) -> int:
    """The smallest batch size whose items/s is within `tolerance` of the best measured."""
    rates = {size: size / max(seconds, 1e-9) for size, seconds in timings.items()}
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate >= (1.0 - tolerance) * best)


def fit_batch_size(run_batch: Callable[[int], None], size: int) -> tuple[int, int | None]:
    """Run a worst-case batch of `size`; while it runs out of memory, halve it. Returns (the size that ran, the
    first size that ran out of memory or None). A batch of 1 that runs out of memory raises: nothing fits."""
    oom_at = None
    while True:
        try:
            run_batch(size)
            return size, oom_at
        except Exception as exc:
            if size <= 1 or not is_out_of_memory(exc):
                raise
            oom_at = oom_at or size
            size = (size + 1) // 2


@dataclass
class BatchSizing:
    size: int
    source: str  # what /v1/models shows as batch_size_source
    items_per_s: dict[int, float] | None = None  # auto: batch size -> items/s measured


def size_batches(run_batch: Callable[[int], None], max_size: int, *, auto: bool, on_gpu: bool,
                 timer: Callable[[], float]) -> BatchSizing:
    """The warm-up's batch sizing with worst-case batches (`run_batch(size)` runs one, checking its outputs).

    auto: time sizes up to `max_size` on this device and choose (the module's docstring); else run `max_size`
    once, halving it while it runs out of memory. `timer`: time.perf_counter (a parameter for tests)."""
    if auto:
        def run_once(size: int) -> float:
            t0 = timer()
            run_batch(size)
            return timer() - t0

        oom: list[int] = []
        timings = measure_batch_sizes(run_once, max_size, budget_s=GPU_BUDGET_S if on_gpu else CALIBRATION_BUDGET_S,
                                      out_of_memory=oom)
        source = "auto-calibrated" + (f" (a batch of {oom[0]} ran out of memory)" if oom else "")
        return BatchSizing(choose_batch_size(timings), source, {k: k / max(v, 1e-9) for k, v in timings.items()})
    size, oom_at = fit_batch_size(run_batch, max_size)
    return BatchSizing(size, f"lowered after out-of-memory at {oom_at} (warm-up)" if oom_at else "")

"""Batch-size calibration for MAX_BATCH_SIZE=auto on CPU: time real batches after warm-up and keep the
smallest size whose items/s is near the best (big models on CPU get slower per item in big batches)."""
from __future__ import annotations

from typing import Callable

CALIBRATION_BUDGET_S = 2.0  # model time per model, about (a bigger next size is skipped when it would overrun)
CALIBRATION_REPS = 2  # runs per size at least; the fastest counts (the first run of a new shape may allocate)
CALIBRATION_MIN_SIZE_S = 0.05  # ... and more runs (up to 50) while a size has had less than this (fast models: noise)
CALIBRATION_STOP = 0.9  # stop trying larger sizes once items/s falls below this share of the best so far
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
                        stop_ratio: float = CALIBRATION_STOP) -> dict[int, float]:
    """Seconds per batch (fastest of at least `reps` runs, more while the size has had less than `min_size_s`)
    for batch sizes 1, 2, 4, ... up to max_size.

    `run_once(size)` runs one batch and returns its seconds. Bounded: a size is not started when its estimated
    cost (reps x size x the last size's seconds per item) would take the total past `budget_s` (size 1 always
    runs), and the sweep stops once items/s falls below `stop_ratio` of the best so far."""
    timings: dict[int, float] = {}
    spent = best = 0.0
    for size in calibration_sizes(max_size):
        if timings:
            last = max(timings)
            if spent + reps * size * timings[last] / last > budget_s:
                break
        runs: list[float] = []
        while len(runs) < reps or (sum(runs) < min_size_s and len(runs) < 50):
            runs.append(run_once(size))
            spent += runs[-1]
            if spent > budget_s:
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

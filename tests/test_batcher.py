"""Scheduling logic of the dynamic batcher, with a fake model (a plain function) instead of a runtime."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.core.batcher import Batcher, ItemResult
from app.core.calibration import calibration_sizes, choose_batch_size, measure_batch_sizes
from app.core.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull
from app.metrics import Metrics


class FakeModel:
    """Doubles each payload; records every batch it is given; optionally slow or failing on 'bad'."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.batches: list[list] = []
        self.threads: set[str] = set()

    def __call__(self, payloads):
        self.batches.append(list(payloads))
        self.threads.add(threading.current_thread().name)
        if self.seconds:
            time.sleep(self.seconds)
        if "bad" in payloads:
            raise ValueError("poisoned input")
        return [p * 2 for p in payloads]


def make(model, **kw) -> Batcher:
    opts = dict(max_batch_size=8, max_delay_s=0.02, queue_size=64, metrics=Metrics())
    opts.update(kw)
    b = Batcher("m", model, **opts)
    b.start()
    return b


def far() -> float:
    return time.monotonic() + 30


def test_idle_model_runs_a_lone_request_at_once():
    async def main():
        model = FakeModel()
        b = make(model, max_delay_s=5.0)  # a long delay must not apply when the model is idle
        t0 = time.monotonic()
        res: ItemResult = await b.submit(21, far())
        elapsed = time.monotonic() - t0
        await b.drain(5)
        return res, elapsed, model

    res, elapsed, model = asyncio.run(main())
    assert res.output == 42 and res.batch_size == 1
    assert elapsed < 1.0
    assert model.batches == [[21]]


def test_batches_form_while_busy_and_each_caller_gets_its_own_result():
    async def main():
        model = FakeModel(seconds=0.05)
        b = make(model, max_batch_size=8, max_delay_s=1.0)
        futs = [b.submit(i, far()) for i in range(1)]
        await asyncio.sleep(0.01)  # first batch (size 1) is running
        futs += [b.submit(i, far()) for i in range(1, 20)]
        results = await asyncio.gather(*futs)
        await b.drain(5)
        return results, model, b

    results, model, b = asyncio.run(main())
    assert [r.output for r in results] == [2 * i for i in range(20)]
    sizes = [len(x) for x in model.batches]
    assert sizes[0] == 1
    assert max(sizes) == 8 and all(s <= 8 for s in sizes)
    assert sum(sizes) == 20
    assert len(model.threads) == 1  # one dedicated inference thread per model
    assert b.mean_batch_size > 1


def test_max_delay_seals_a_forming_batch_counted_from_its_first_item():
    async def main():
        model = FakeModel(seconds=0.4)
        b = make(model, max_batch_size=100, max_delay_s=0.05)
        fa = b.submit("a", far())  # idle: runs at once
        await asyncio.sleep(0.02)
        fb = b.submit("b", far())  # forms the next batch; sealed 50 ms later
        await asyncio.sleep(0.15)
        fc = b.submit("c", far())  # arrives after b's batch was sealed -> a later batch
        await asyncio.gather(fa, fb, fc)
        await b.drain(5)
        return model

    model = asyncio.run(main())
    assert model.batches == [["a"], ["b"], ["c"]]


def test_without_max_delay_pressure_a_busy_model_fills_the_next_batch():
    async def main():
        model = FakeModel(seconds=0.2)
        b = make(model, max_batch_size=100, max_delay_s=5.0)
        fa = b.submit("a", far())
        await asyncio.sleep(0.02)
        rest = []
        for x in "bcde":
            rest.append(b.submit(x, far()))
            await asyncio.sleep(0.01)
        await asyncio.gather(fa, *rest)
        await b.drain(5)
        return model

    model = asyncio.run(main())
    assert model.batches == [["a"], ["b", "c", "d", "e"]]  # goes as soon as the model is idle


def test_expired_items_are_not_run_and_get_deadline_exceeded():
    async def main():
        model = FakeModel(seconds=0.3)
        metrics = Metrics()
        b = make(model, metrics=metrics, max_delay_s=0.0)
        fa = b.submit("a", far())
        await asyncio.sleep(0.02)
        fb = b.submit("late", time.monotonic() + 0.05)
        fc = b.submit("c", far())
        ra = await fa
        with pytest.raises(DeadlineExceeded):
            await fb
        rc = await fc
        await b.drain(5)
        return model, ra, rc, metrics

    model, ra, rc, metrics = asyncio.run(main())
    assert ra.output == "aa" and rc.output == "cc"
    assert all("late" not in batch for batch in model.batches)
    assert metrics.rejections.labels("m", "timeout")._value.get() == 1


def test_cancelled_items_are_dropped_before_inference():
    async def main():
        model = FakeModel(seconds=0.2)
        b = make(model)
        fa = b.submit("a", far())
        await asyncio.sleep(0.02)
        fgone = b.submit("gone", far())
        fb = b.submit("b", far())
        fgone.cancel()  # what the handler does when its client disconnects
        await asyncio.gather(fa, fb)
        await b.drain(5)
        return model

    model = asyncio.run(main())
    assert all("gone" not in batch for batch in model.batches)
    assert sorted(x for batch in model.batches for x in batch) == ["a", "b"]


def test_queue_full_raises_with_retry_after():
    async def main():
        model = FakeModel(seconds=0.2)
        metrics = Metrics()
        b = make(model, queue_size=3, metrics=metrics)
        futs = [b.submit(1, far())]
        await asyncio.sleep(0.02)  # first one running, queue empty
        futs += [b.submit(i, far()) for i in range(3)]
        with pytest.raises(QueueFull) as info:
            b.submit(99, far())
        await asyncio.gather(*futs)
        await b.drain(5)
        return info.value, metrics

    err, metrics = asyncio.run(main())
    assert err.code == "overloaded" and err.retry_after >= 1
    assert metrics.rejections.labels("m", "queue_full")._value.get() == 1


def test_one_bad_item_never_fails_the_others():
    async def main():
        model = FakeModel(seconds=0.05)
        b = make(model, max_delay_s=1.0)
        f0 = b.submit("x", far())
        await asyncio.sleep(0.01)
        futs = [b.submit(p, far()) for p in ["a", "bad", "c"]]
        results = await asyncio.gather(f0, *futs, return_exceptions=True)
        await b.drain(5)
        return results, model

    results, model = asyncio.run(main())
    assert results[0].output == "xx"
    assert results[1].output == "aa" and results[3].output == "cc"
    assert isinstance(results[2], InferenceFailed)
    assert ["a", "bad", "c"] in model.batches  # tried together first, then one by one


def test_drain_answers_everything_accepted_then_refuses():
    async def main():
        model = FakeModel(seconds=0.05)
        b = make(model, max_batch_size=2, max_delay_s=1.0)
        futs = [b.submit(i, far()) for i in range(7)]
        await b.drain(10)
        done = [f.done() and not f.cancelled() and f.exception() is None for f in futs]
        with pytest.raises(NotReady):
            b.submit(1, far())
        return done, [f.result().output for f in futs]

    done, outs = asyncio.run(main())
    assert all(done) and outs == [2 * i for i in range(7)]


def test_metrics_record_batches_and_queue_depth():
    async def main():
        model = FakeModel(seconds=0.02)
        metrics = Metrics()
        b = make(model, metrics=metrics, max_delay_s=0.5)
        await asyncio.gather(*[b.submit(i, far()) for i in range(10)])
        await b.drain(5)
        return metrics

    metrics = asyncio.run(main())
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    assert 'mmserve_batch_size_count{model="m"}' in text
    assert 'mmserve_batch_size_sum{model="m"} 10.0' in text
    assert 'mmserve_queue_depth{model="m"} 0.0' in text


# ------------------------------------------------------------------------------------ batch-size calibration
def test_choose_batch_size_takes_the_smallest_within_5_percent_of_the_best():
    # seconds per batch -> items/s: b1 100, b2 190, b4 400, b8 410, b16 400
    assert choose_batch_size({1: 0.01, 2: 2 / 190, 4: 0.01, 8: 8 / 410, 16: 0.04}) == 4
    # a big model on CPU: slower per item as batches grow (b1 6.2/s, b2 5.5/s, b8 4.9/s) -> 1
    assert choose_batch_size({1: 1 / 6.2, 2: 2 / 5.5, 4: 4 / 5.2, 8: 8 / 4.9}) == 1
    # a GPU-like curve: throughput keeps growing -> the largest
    assert choose_batch_size({n: 0.01 for n in (1, 2, 4, 8, 16, 32)}) == 32
    assert choose_batch_size({1: 0.5}) == 1


def test_calibration_sweep_is_bounded_and_stops_when_throughput_falls():
    assert calibration_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert calibration_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert calibration_sizes(1) == [1]

    def model(cost):
        calls = []

        def run_once(n):
            calls.append(n)
            return cost(n)
        return run_once, calls

    # flat 10 ms per batch: every size, two runs each (min_size_s 0), 0.12 s in all
    run, calls = model(lambda n: 0.01)
    assert sorted(measure_batch_sizes(run, 32, min_size_s=0)) == [1, 2, 4, 8, 16, 32] and len(calls) == 12
    # fast batches are repeated until each size has had min_size_s (noise), at most 50 runs
    run, calls = model(lambda n: 0.01)
    measure_batch_sizes(run, 2, min_size_s=0.05)
    assert calls == [1] * 5 + [2] * 5
    run, calls = model(lambda n: 0.0)
    measure_batch_sizes(run, 1, min_size_s=0.05)
    assert len(calls) == 50
    # items/s falls below 0.9 of the best at b4: no larger size is tried
    run, calls = model(lambda n: {1: 0.010, 2: 0.019, 4: 0.050}.get(n, 1.0))
    assert sorted(measure_batch_sizes(run, 32)) == [1, 2, 4] and max(calls) == 4
    # 0.16 s per item (the demo model): b4 would take 2 x 0.64 s more, past the 2 s budget -> not started
    run, calls = model(lambda n: 0.16 * n)
    timings = measure_batch_sizes(run, 32, budget_s=2.0)
    assert sorted(timings) == [1, 2] and choose_batch_size(timings) == 1
    # size 1 always runs, even when one run alone is over the budget (and is then not repeated)
    run, calls = model(lambda n: 5.0)
    assert measure_batch_sizes(run, 32, budget_s=2.0) == {1: 5.0} and calls == [1]
    # the fastest of the runs counts (the first run of a new shape may allocate)
    times = iter([0.05, 0.01, 0.02, 0.02])
    assert measure_batch_sizes(lambda n: next(times), 2, min_size_s=0) == {1: 0.01, 2: 0.02}

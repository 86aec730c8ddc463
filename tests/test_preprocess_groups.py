"""Preprocessing in groups: `GroupedWorkers` (what waits is taken together) and `preprocess.prepare_many` (stage by
stage, each item failing alone, the same features as item by item)."""
from __future__ import annotations

import asyncio
import contextvars
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from app.core.errors import MediaRejected
from app.core.items import Item
from app.core.preprocess import prepare, prepare_many
from app.core.workers import GroupedWorkers
from app.tasks import get_task
from tests.fixtures_app import build_model
from tests.media import audio_bytes, image_bytes

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="-")


def _recording(groups: list[list], gate: threading.Event):
    """A run_many that records each group's arguments, holds the group holding "block" until `gate` is set, and
    answers each job with its argument doubled in its submitter's context (and fails the job "bad" alone)."""
    def run_many(jobs):
        groups.append([args[0] for _, args in jobs])
        if any(args[0] == "block" for _, args in jobs):
            gate.wait(10)
        out = []
        for ctx, (value,) in jobs:
            if value == "bad":
                out.append((False, ValueError("bad item")))
            else:
                out.append((True, (value * 2, ctx.run(VAR.get))))
        return out
    return run_many


def test_grouped_workers_take_what_waits_together_up_to_max_group():
    groups: list[list] = []
    gate = threading.Event()
    pool = GroupedWorkers(1, "test-group", _recording(groups, gate), max_group=4)

    async def main():
        loop = asyncio.get_running_loop()
        first = pool.submit(loop, "block")
        while not groups:  # the thread holds the first job: everything after it queues
            await asyncio.sleep(0.01)
        futures = []
        for i in range(6):
            VAR.set(f"request-{i}")
            futures.append(pool.submit(loop, "bad" if i == 2 else f"x{i}"))
        gate.set()
        assert await first == ("blockblock", "-")
        results = await asyncio.gather(*futures, return_exceptions=True)
        return results

    try:
        results = asyncio.run(main())
    finally:
        pool.shutdown()
    assert groups == [["block"], ["x0", "x1", "bad", "x3"], ["x4", "x5"]]
    assert results[0] == ("x0x0", "request-0") and results[5] == ("x5x5", "request-5")
    assert isinstance(results[2], ValueError)  # the failed job alone
    assert results[3] == ("x3x3", "request-3")


def test_grouped_workers_leave_cancelled_jobs_out_and_fail_a_group_whose_runner_raises():
    groups: list[list] = []
    gate = threading.Event()
    recording = _recording(groups, gate)

    def run_many(jobs):
        if any(args[0] == "boom" for _, args in jobs):
            groups.append(["boom"])
            raise RuntimeError("runner failed")
        return recording(jobs)

    pool = GroupedWorkers(1, "test-cancel", run_many, max_group=8)

    async def main():
        loop = asyncio.get_running_loop()
        first = pool.submit(loop, "block")
        while not groups:
            await asyncio.sleep(0.01)
        gone, kept = pool.submit(loop, "gone"), pool.submit(loop, "kept")
        gone.cancel()
        gate.set()
        await first
        assert await kept == ("keptkept", "-")
        boom, other = pool.submit(loop, "boom"), pool.submit(loop, "other")
        return await asyncio.gather(boom, other, return_exceptions=True)

    try:
        boom, other = asyncio.run(main())
    finally:
        pool.shutdown()
    assert ["kept"] in groups and not any("gone" in g for g in groups)
    assert isinstance(boom, RuntimeError)
    assert isinstance(other, RuntimeError) or other == ("otherother", "-")  # in boom's group, or after it


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    from models.manifest import read_manifest
    from models.preprocessing import Preprocessor

    root = tmp_path_factory.mktemp("groups")
    version = build_model(root, "tiny-classify")
    manifest = read_manifest(Path(version))
    return SimpleNamespace(name="tiny-classify", manifest=manifest,
                           preprocessor=Preprocessor(manifest.preprocessing, Path(version)))


def test_prepare_many_gives_each_item_its_features_and_fails_a_bad_item_alone(entry):
    task = get_task("classify")
    items = [Item("a red square", image_bytes((200, 30, 30)), audio_bytes(440.0)),
             Item("broken picture", b"GIF89a not really", audio_bytes(880.0)),
             Item("a green one", image_bytes((30, 200, 30), fmt="JPEG"), None),
             Item("just words", None, audio_bytes(220.0, seconds=0.3))]
    jobs = [(contextvars.copy_context(), (entry, task, item, None)) for item in items]
    results = prepare_many(jobs)
    assert [ok for ok, _ in results] == [True, False, True, True]
    err = results[1][1]
    assert isinstance(err, MediaRejected) and err.code == "undecodable_media"
    for item, (ok, got) in zip(items, results):
        if not ok:
            continue
        want = prepare(entry, task, item)
        assert got.length == want.length and got.meta == want.meta
        for name in ("input_ids", "attention_mask", "pixel_values", "audio_features", "audio_frames"):
            a, b = getattr(got.features, name), getattr(want.features, name)
            assert (a is None) == (b is None), name
            if a is not None:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_preprocess_threads_as_set_or_shared_out_among_front_ends():
    from app.main import preprocess_threads

    assert preprocess_threads(3, 1) == 3 and preprocess_threads(3, 4, cores=2) == 3  # as set, whatever else
    assert preprocess_threads(0, 1, cores=1) == 4  # auto, one process: as before the setting had an auto
    assert [preprocess_threads(0, 2, cores=c) for c in (1, 2, 6, 16)] == [1, 1, 3, 4]  # auto, front-ends
    assert preprocess_threads(0, 8, cores=16) == 2


def test_the_served_pool_has_the_threads_the_setting_resolves_to(tmp_path):
    import os

    from app.main import create_app
    from app.settings import Settings

    def threads(**settings) -> int:
        return create_app(Settings(repository=tmp_path, **settings)).state.service.preprocess_workers

    cores = len(os.sched_getaffinity(0))
    assert threads() == 4 and threads(preprocess_workers=2) == 2
    assert threads(workers=2) == max(1, min(4, cores // 2)) and threads(workers=2, preprocess_workers=3) == 3

"""One item -> the batcher's payload: the model's input checks, then text / image / audio features.

`prepare` (one item: warm-up) and `prepare_many` (a group of items, stage by stage: requests, in the preprocessing
thread pool) are the only places that turn an item into model features; both run the same stages.
"""
from __future__ import annotations

import contextvars
import time
from typing import Any, Callable, Sequence

from app.core.batcher import Prepared
from app.core.errors import InvalidInput, MediaRejected
from app.core.items import Item
from app.tasks import Task


def check_input(entry: Any, task: Task, item: Item) -> None:
    """Raise InvalidInput unless `item` has what the model (and the task) needs and nothing it does not take."""
    assert entry.manifest is not None
    mods = entry.manifest.modality_names
    for m, data in (("image", item.image), ("audio", item.audio)):
        if data is not None and not data:  # sent, but zero bytes: never "as if nothing was sent"
            raise InvalidInput(f"'{task.field_name(m)}' is empty (0 bytes): send a file, or leave the field out")
    given = {"text": item.text is not None, "image": item.image is not None, "audio": item.audio is not None}
    extra = [m for m, g in given.items() if g and m not in mods]
    if extra:
        names = [task.field_name(m) for m in extra]
        raise InvalidInput(f"model '{entry.name}' does not take {', '.join(names)} (it takes {mods})")
    if "text" in mods:
        if item.text is None:
            raise InvalidInput(f"'{task.text_field}' is required by model '{entry.name}'")
        if not item.text.strip():
            raise InvalidInput(f"'{task.text_field}' must not be empty")
    for m in entry.manifest.required_modalities:
        if not given[m]:
            raise InvalidInput(f"'{task.field_name(m)}' is required by model '{entry.name}'")
    task.check(mods, item)
    if not any(given[m] for m in mods):
        raise InvalidInput(f"model '{entry.name}' needs at least one of {mods}")


class _Features:
    """One item on its way through the stages: its features so far and the task's text metadata."""

    __slots__ = ("features", "meta")

    def __init__(self) -> None:
        from models.preprocessing import Features

        self.features = Features()
        self.meta: dict[str, Any] = {}

    def prepared(self) -> Prepared:
        f = self.features
        return Prepared(f, len(f.input_ids) if f.input_ids is not None else None, self.meta)


def _observe(metrics: Any, entry: Any, modality: str, t0: float) -> None:
    if metrics is not None:
        metrics.child(metrics.preprocess, entry.name, modality).observe(time.perf_counter() - t0)


def _begin(entry: Any, task: Task, item: Item, metrics: Any) -> _Features:
    from app.runtime import _fault_hooks, inject_faults

    if _fault_hooks:
        inject_faults("preprocess", entry.name)
    return _Features()


def _text(entry: Any, task: Task, item: Item, metrics: Any, state: _Features) -> None:
    if item.text is not None:
        t0 = time.perf_counter()
        state.features, state.meta = task.encode_text(entry.preprocessor, item.text)
        _observe(metrics, entry, "text", t0)


def _image(entry: Any, task: Task, item: Item, metrics: Any, state: _Features) -> None:
    if item.image is not None:
        t0 = time.perf_counter()
        state.features.pixel_values = entry.preprocessor.image_from_bytes(item.image)
        _observe(metrics, entry, "image", t0)


def _audio(entry: Any, task: Task, item: Item, metrics: Any, state: _Features) -> None:
    if item.audio is not None:
        t0 = time.perf_counter()
        f = state.features
        f.audio_features, f.audio_frames = entry.preprocessor.audio_clip(item.audio)
        _observe(metrics, entry, "audio", t0)


_STAGES = (_text, _image, _audio)


def _media_errors(stage: Callable[..., Any], *args: Any) -> Any:
    """`stage(*args)`, a MediaError (undecodable, too large...) turned into the core's MediaRejected."""
    from models.media import MediaError

    try:
        return stage(*args)
    except MediaError as exc:
        raise MediaRejected(exc.code, exc.message) from None


def prepare(entry: Any, task: Task, item: Item, metrics: Any = None) -> Prepared:
    """Features of one item (MediaError -> MediaRejected); per-modality time to `metrics` when given."""
    state = _begin(entry, task, item, metrics)
    for stage in _STAGES:
        _media_errors(stage, entry, task, item, metrics, state)
    return state.prepared()


Job = tuple[contextvars.Context, tuple[Any, Task, Item, Any]]  # (the submitter's context, prepare's arguments)


def prepare_many(jobs: Sequence[Job]) -> list[tuple[bool, Any]]:
    """`prepare` over a group of items, stage by stage: every item's text, then every image, then every audio clip.

    The same features as item by item, for less CPU: on the bench's tiny model (real JPEGs and 1 s WAVs, one core),
    8 items cost 0.80 ms each this way against 0.99 ms item by item (tokeniser, image decoder and audio front end
    each keep their code and tables in the caches; 0.73 ms for 64). Each item fails alone: its exception (whatever
    it is) is its result, the others go on. Each item runs in its submitter's context (its request id in log lines).
    Returns [(True, Prepared) | (False, exception)] in the order of `jobs`."""
    out: list[tuple[bool, Any] | None] = [None] * len(jobs)
    states: list[Any] = [None] * len(jobs)
    for i, (ctx, args) in enumerate(jobs):
        try:
            states[i] = ctx.run(_begin, *args)
        except BaseException as exc:  # noqa: BLE001 - the item's own failure, handed to its caller
            out[i] = (False, exc)
    for stage in _STAGES:
        for i, (ctx, args) in enumerate(jobs):
            if out[i] is None:
                try:
                    ctx.run(_media_errors, stage, *args, states[i])
                except BaseException as exc:  # noqa: BLE001
                    out[i] = (False, exc)
    return [o if o is not None else (True, states[i].prepared()) for i, o in enumerate(out)]

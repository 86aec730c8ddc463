"""One item -> the batcher's payload: the model's input checks, then text / image / audio features.

`prepare` is the only place that turns an item into model features (requests and warm-up alike); it
runs in the preprocessing thread pool.
"""
from __future__ import annotations

import time
from typing import Any

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


def prepare(entry: Any, task: Task, item: Item, metrics: Any = None) -> Prepared:
    """Features of one item (MediaError -> MediaRejected); per-modality time to `metrics` when given."""
    from models.media import MediaError
    from models.preprocessing import Features

    from app.runtime import _fault_hooks, inject_faults

    if _fault_hooks:
        inject_faults("preprocess", entry.name)
    pre = entry.preprocessor
    meta: dict[str, Any] = {}

    def observe(modality: str, t0: float) -> None:
        if metrics is not None:
            metrics.child(metrics.preprocess, entry.name, modality).observe(time.perf_counter() - t0)

    try:
        f = Features()
        if item.text is not None:
            t0 = time.perf_counter()
            f, meta = task.encode_text(pre, item.text)
            observe("text", t0)
        if item.image is not None:
            t0 = time.perf_counter()
            f.pixel_values = pre.image_from_bytes(item.image)
            observe("image", t0)
        if item.audio is not None:
            t0 = time.perf_counter()
            f.audio_features, f.audio_frames = pre.audio_clip(item.audio)
            observe("audio", t0)
    except MediaError as exc:
        raise MediaRejected(exc.code, exc.message) from None
    length = len(f.input_ids) if f.input_ids is not None else None
    return Prepared(f, length, meta)

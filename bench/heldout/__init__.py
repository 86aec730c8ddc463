"""Held-out tasks for checking that `mmserve train` works with its defaults on data it was not tuned on.

Four generated tasks in the documented JSONL format (README "Data format"), deterministic from a
seed (same seed -> byte-identical files), content and wording unlike the demo data:

  match       classify  text + image  does the caption (colour, shape, side) describe the drawn picture?
  vqa         vqa       text + image  colour / count / side / shape questions about a drawn scene
  speech      classify  text + audio  is the espeak-ng-spoken word the one the text claims?
  ner-visual  ner       text + image  is the name (Jordan, Sydney, ...) a person or a place? the picture says

Every task: train / dev / test (400 / 100 / 100 by default) with disjoint wordings per split (and
disjoint voices for speech), so test measures generalisation to unseen phrasing; each is built so
that every unimodal model stays near chance. `python -m bench.heldout OUT_DIR [--tasks ...] [--seed N]`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from bench.heldout import match, ner_visual, speech, vqa
from bench.heldout.common import DEFAULT_SIZES, SPLITS


@dataclass(frozen=True)
class HeldoutTask:
    name: str
    module: ModuleType
    index: int  # RNG stream of the task

    @property
    def task(self) -> str:  # mmserve --task
        return self.module.TASK

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.module.MODALITIES

    @property
    def baselines(self) -> tuple[str, ...]:  # unimodal baselines that make sense for the task
        return self.module.BASELINES

    @property
    def description(self) -> str:
        return (self.module.__doc__ or "").strip().splitlines()[0]


TASKS: dict[str, HeldoutTask] = {
    "match": HeldoutTask("match", match, 1),
    "vqa": HeldoutTask("vqa", vqa, 2),
    "speech": HeldoutTask("speech", speech, 3),
    "ner-visual": HeldoutTask("ner-visual", ner_visual, 4),
}


def generate(name: str, out_dir: Path, seed: int = 0, sizes: dict[str, int] | None = None) -> Path:
    """Write task `name` into out_dir (train/dev/test.jsonl + media/). Returns out_dir."""
    if name not in TASKS:
        raise ValueError(f"unknown held-out task {name!r} (known: {', '.join(TASKS)})")
    t = TASKS[name]
    sizes = dict(sizes or DEFAULT_SIZES)
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}")
    return t.module.make(Path(out_dir), seed=seed, sizes=sizes, task_index=t.index)


def generate_all(out_dir: Path, tasks=None, seed: int = 0, sizes: dict[str, int] | None = None,
                 log=print) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name in tasks or TASKS:
        t0 = time.perf_counter()
        out[name] = generate(name, Path(out_dir) / name, seed=seed, sizes=sizes)
        log(f"{name}: {Path(out_dir) / name}  ({time.perf_counter() - t0:.1f}s)")
    return out


__all__ = ["TASKS", "HeldoutTask", "generate", "generate_all", "DEFAULT_SIZES", "SPLITS"]

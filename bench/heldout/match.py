"""`match`: does the caption describe the picture? (classification, text + image)

Picture: one coloured shape (square, triangle, star, cross, diamond in red, blue, green, orange or
purple), on the left or the right half of a 128 px cluttered, tinted, grainy canvas (grey scribbles
and specks, sometimes a small grey decoy shape), random size and slight rotation; JPEG.
Caption: the shape's colour, kind and side in one of several paraphrase templates; train, dev
and test use disjoint template sets (test wordings are never seen in training).
Label: `match` (caption of this picture) or `mismatch` (caption of another random picture that
differs in at least one of colour / shape / side), exactly balanced per split. Captions and
pictures are both drawn uniformly whatever the label, so a text-only or image-only model sits at
chance (0.5); only comparing the two tells.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ImageDraw

from bench.heldout.common import (COLOURS, DEFAULT_SIZES, SHAPES, cluttered_canvas, labelled_splits,
                                  draw_shape, finish, jitter_colour, pick, save_image, write_jsonl)

TASK = "classify"
MODALITIES = ("text", "image")
BASELINES = ("text", "image")
SIDE = 128
SIDES = ("left", "right")

# {c} colour, {s} shape, {side} left/right
TEMPLATES = {
    "train": [
        "a {c} {s} on the {side}",
        "There is a {c} {s} on the {side} side.",
        "A {c} {s} sits to the {side}.",
        "{side_cap} half: a {c} {s}.",
        "One {s}, {c}, placed on the {side}.",
        "the {s} on the {side} is {c}",
        "Drawing of a {c} {s} toward the {side} edge.",
        "You can see a {c} {s} at the {side}.",
    ],
    "dev": [
        "Over on the {side} there is a {s} coloured {c}.",
        "{c_cap} {s}, {side}-hand side.",
        "The only shape, a {s}, is {c} and lies {side}.",
    ],
    "test": [
        "On its {side} the image holds a single {c} {s}.",
        "Look {side}: you will find a {s} filled in {c}.",
        "{c_cap} is the colour of the {s} drawn in the {side} part.",
        "Somebody sketched a {s} in {c}, off to the {side}.",
    ],
}
FILLERS = ["", "", "", " Slightly blurry.", " Scanned sketch.", " Taken from a worksheet.", " Faded print."]


def caption(rng: np.random.Generator, split: str, colour: str, shape: str, side: str) -> str:
    template = pick(rng, TEMPLATES[split])
    text = template.format(c=colour, s=shape, side=side, side_cap=side.capitalize(), c_cap=colour.capitalize())
    filler = pick(rng, FILLERS)
    if filler and text[-1] not in ".!?":
        text += "."
    return text + filler


def draw_scene(rng: np.random.Generator, colour: str, shape: str, side: str):
    img = cluttered_canvas(rng, SIDE, marks=int(rng.integers(4, 12)))
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.4:  # a small grey decoy shape anywhere: not the captioned object
        g = int(rng.integers(140, 190))
        draw_shape(draw, pick(rng, SHAPES), float(rng.uniform(15, SIDE - 15)), float(rng.uniform(15, SIDE - 15)),
                   float(rng.uniform(5, 8)), (g, g, g), float(rng.uniform(-0.3, 0.3)))
    r = float(rng.uniform(14, 24))
    margin = r * 1.15 + 2
    lo, hi = (margin, SIDE / 2 - 6) if side == "left" else (SIDE / 2 + 6, SIDE - margin)
    cx = float(rng.uniform(lo, max(lo, hi)))
    cy = float(rng.uniform(margin, SIDE - margin))
    draw_shape(draw, shape, cx, cy, r, jitter_colour(COLOURS[colour], rng), float(rng.uniform(-0.25, 0.25)))
    return finish(img, rng)


def make(out: Path, seed: int = 0, sizes: dict[str, int] | None = None, task_index: int = 1) -> Path:
    out = Path(out)
    sizes = sizes or DEFAULT_SIZES
    colours = list(COLOURS)
    for split, rng, rows in labelled_splits(seed, task_index, sizes):
        records = []
        for rid, is_match in rows:
            attrs = (pick(rng, colours), pick(rng, SHAPES), pick(rng, SIDES))
            img = draw_scene(rng, *attrs)
            rel = f"media/{rid}.jpg"
            save_image(img, out / rel)
            said = attrs
            if not is_match:
                while said == attrs:  # the caption of another picture: uniform over the other 49
                    said = (pick(rng, colours), pick(rng, SHAPES), pick(rng, SIDES))
            records.append({"id": rid, "text": caption(rng, split, *said), "image": rel, "audio": None,
                            "label": "match" if is_match else "mismatch"})
        write_jsonl(out / f"{split}.jsonl", records)
    return out

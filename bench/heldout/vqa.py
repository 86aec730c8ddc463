"""`vqa`: questions about a drawn scene whose answer needs the picture (text + image).

Picture: 128 px cluttered, grainy canvas (PNG) with coloured shapes (square, triangle, star,
cross, diamond; red, blue, green, orange, purple) and grey decoys. Four question kinds, in equal
shares:
  colour  -- one coloured shape: "what colour is the star?"            -> red / blue / ...
  count   -- 1-4 copies of one shape in one colour: "how many crosses?" -> 1 / 2 / 3 / 4
  side    -- one coloured shape in the left or right half: "which side?" -> left / right
  shape   -- one coloured shape: "what shape is the orange object?"   -> square / star / ...
Several phrasings per kind; train, dev and test use disjoint phrasings. 3-5 annotator answers
(mostly agreeing; "violet" for purple, "plus" for cross, number words for counts). Answer
vocabulary: 17 strings after normalisation. Given the question, every answer of its kind is
equally likely, so a text-only model is at 1/5, 1/4, 1/2 and 1/5 per kind (~0.29 overall).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ImageDraw

from bench.heldout.common import (COLOURS, DEFAULT_SIZES, PLURAL, SHAPES, cluttered_canvas, draw_shape,
                                  finish, jitter_colour, pick, rng_for, save_image, write_jsonl)

TASK = "vqa"
MODALITIES = ("text", "image")
BASELINES = ("image",)  # the trainer refuses VQA without the image; the question prior alone is ~0.29
SIDE = 128
KINDS = ("colour", "count", "side", "shape")

# {s} shape, {p} plural shape, {c} colour
QUESTIONS = {
    "colour": {
        "train": ["what colour is the {s}?", "What color is the {s}?", "which colour has the {s}?",
                  "the {s} is painted in what colour?"],
        "dev": ["tell me the colour of the {s}"],
        "test": ["In which hue is the {s} filled?", "name the {s}'s colour"],
    },
    "count": {
        "train": ["how many {p} are there?", "How many {p} can you see?", "count the {p}",
                  "what is the number of {p}?"],
        "dev": ["how many {p} are drawn?"],
        "test": ["Give the total of {p} in the image.", "{p} in the picture: how many?"],
    },
    "side": {
        "train": ["which side is the {s} on?", "Is the {s} on the left or the right?",
                  "on what side of the image is the {s}?", "where is the {s}, left or right?"],
        "dev": ["which half holds the {s}?"],
        "test": ["Left or right: where was the {s} placed?", "the {s} appears on which side?"],
    },
    "shape": {
        "train": ["what shape is the {c} object?", "What is the {c} shape?", "which shape is {c}?",
                  "name the {c} figure"],
        "dev": ["what kind of shape is coloured {c}?"],
        "test": ["Which figure is drawn in {c}?", "the {c} thing has what form?"],
    },
}
ALTERNATIVES = {"purple": ["violet"], "cross": ["plus"], "1": ["one"], "2": ["two"], "3": ["three"], "4": ["four"]}


def annotators(rng: np.random.Generator, main: str) -> list[str]:
    # 3-5 annotators as in VQA's own collection: the VQA metric gives full credit to an answer that
    # three annotators gave, so fewer than three would cap even a perfect model below 1.0
    k = int(rng.integers(3, 6))
    alts = ALTERNATIVES.get(main, [])
    return [pick(rng, alts) if alts and rng.random() < 0.15 else main for _ in range(k)]


def _decoys(rng: np.random.Generator, draw: ImageDraw.ImageDraw, n: int) -> None:
    for _ in range(n):
        g = int(rng.integers(140, 190))
        draw_shape(draw, pick(rng, SHAPES), float(rng.uniform(12, SIDE - 12)), float(rng.uniform(12, SIDE - 12)),
                   float(rng.uniform(4, 7)), (g, g, g), float(rng.uniform(-0.3, 0.3)))


def _free_spot(rng, placed, r, lo_x=None, hi_x=None):
    margin = r * 1.15 + 2
    lo_x = margin if lo_x is None else max(lo_x, margin)
    hi_x = SIDE - margin if hi_x is None else min(hi_x, SIDE - margin)
    for _ in range(200):
        cx, cy = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(margin, SIDE - margin))
        if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 4) ** 2 for x, y, rr in placed):
            return cx, cy
    return cx, cy


def scene(rng: np.random.Generator, kind: str):
    """(image, question fields, answer) for one question kind."""
    colours = list(COLOURS)
    img = cluttered_canvas(rng, SIDE, marks=int(rng.integers(4, 10)))
    draw = ImageDraw.Draw(img)
    _decoys(rng, draw, int(rng.integers(0, 3)))
    colour, shape = pick(rng, colours), pick(rng, SHAPES)
    fill = jitter_colour(COLOURS[colour], rng)
    if kind == "count":
        count = int(rng.integers(1, 5))
        r = float(rng.uniform(10, 15))
        placed = []
        for _ in range(count):
            cx, cy = _free_spot(rng, placed, r)
            placed.append((cx, cy, r))
            draw_shape(draw, shape, cx, cy, r, fill, float(rng.uniform(-0.25, 0.25)))
        answer = str(count)
    else:
        r = float(rng.uniform(13, 22))
        side = pick(rng, ("left", "right"))
        lo, hi = (None, SIDE / 2 - 6) if side == "left" else (SIDE / 2 + 6, None)
        cx, cy = _free_spot(rng, [], r, lo, hi)
        draw_shape(draw, shape, cx, cy, r, fill, float(rng.uniform(-0.25, 0.25)))
        answer = {"colour": colour, "side": side, "shape": shape}[kind]
    return finish(img, rng), {"s": shape, "p": PLURAL[shape], "c": colour}, answer


def make(out: Path, seed: int = 0, sizes: dict[str, int] | None = None, task_index: int = 2) -> Path:
    out = Path(out)
    sizes = sizes or DEFAULT_SIZES
    for split, n in sizes.items():
        rng = rng_for(seed, task_index, split)
        kinds = [KINDS[i % len(KINDS)] for i in range(n)]
        kinds = [kinds[int(j)] for j in rng.permutation(n)]
        records = []
        for i, kind in enumerate(kinds):
            rid = f"{split}-{i:04d}"
            img, fields, answer = scene(rng, kind)
            rel = f"media/{rid}.png"
            save_image(img, out / rel)
            question = pick(rng, QUESTIONS[kind][split]).format(**fields)
            question = question[0].upper() + question[1:] if rng.random() < 0.3 else question
            records.append({"id": rid, "question": question, "image": rel, "audio": None,
                            "answers": annotators(rng, answer)})
        write_jsonl(out / f"{split}.jsonl", records)
    return out

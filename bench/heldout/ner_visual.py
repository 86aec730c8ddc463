"""`ner-visual`: the picture decides whether a name is a person or a place (NER, text + image).

Text: one sentence with one name that is both a given name and a place name (Jordan, Georgia,
Sydney, Austin, Savannah, ...), in templates where both readings make sense ("we met Jordan at
noon."); tokens with BIO tags: the name is B-PER or B-LOC, every other token O. Train, dev and
test use disjoint template sets.
Picture (128 px JPEG, cluttered grainy canvas): for PER a person icon (head and shoulders, or a
stick figure; 1-2 of them, random colours), for LOC a place (a building with windows and a roof,
a map pin on a street grid, or a skyline). The same names and templates appear with both types in
equal shares, so a text-only model finds the entity span but guesses its type (entity F1 ~0.5).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ImageDraw

from bench.heldout.common import (DEFAULT_SIZES, cluttered_canvas, finish, labelled_splits, pick,
                                  save_image, tokenize, write_jsonl)

TASK = "ner"
MODALITIES = ("text", "image")
BASELINES = ("text",)  # a token task needs the tokens: no image-only baseline
SIDE = 128

NAMES = ("Jordan", "Georgia", "Florence", "Sydney", "Victoria", "Austin", "Madison", "Savannah", "Charlotte",
         "Lincoln", "Adelaide", "Dallas", "Orlando", "Denver", "Tyler", "Brooklyn", "Eugene", "Regina",
         "Chester", "Aurora", "Phoenix", "Houston", "Camden", "Kingston")

TEMPLATES = {
    "train": [
        "we met {X} at noon.",
        "Everyone was talking about {X} last week.",
        "I finally visited {X} yesterday.",
        "the letter from {X} arrived late.",
        "They could not stop thinking about {X}.",
        "My cousin spent the summer with {X}.",
        "we took photos of {X} at sunset",
        "A reporter wrote a long piece on {X}.",
    ],
    "dev": [
        "Nobody expected {X} to change so much.",
        "Our trip included {X} again.",
        "{X} surprised us on the first morning.",
    ],
    "test": [
        "After the storm we checked on {X} first.",
        "She described {X} in her diary.",
        "Last spring {X} looked different to us.",
        "The guide kept pointing at {X}.",
    ],
}


def _rand_colour(rng, lo=40, hi=200):
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def draw_person(rng: np.random.Generator, draw: ImageDraw.ImageDraw) -> None:
    n = 1 if rng.random() < 0.7 else 2
    for k in range(n):
        s = float(rng.uniform(0.75, 1.15)) * (0.8 if n == 2 else 1.0)
        cx = SIDE / 2 + (0 if n == 1 else (-26 if k == 0 else 26)) + float(rng.uniform(-10, 10))
        cy = SIDE / 2 + float(rng.uniform(-8, 8))
        colour = _rand_colour(rng)
        if rng.random() < 0.6:  # head and shoulders
            hr = 13 * s
            draw.ellipse([cx - hr, cy - 30 * s - hr, cx + hr, cy - 30 * s + hr], fill=colour)
            draw.pieslice([cx - 30 * s, cy - 12 * s, cx + 30 * s, cy + 48 * s], 180, 360, fill=colour)
        else:  # stick figure
            w = max(2, int(3 * s))
            hr = 9 * s
            draw.ellipse([cx - hr, cy - 38 * s - hr, cx + hr, cy - 38 * s + hr], outline=colour, width=w)
            draw.line([(cx, cy - 29 * s), (cx, cy + 8 * s)], fill=colour, width=w)
            draw.line([(cx - 18 * s, cy - 18 * s), (cx + 18 * s, cy - 18 * s)], fill=colour, width=w)
            draw.line([(cx, cy + 8 * s), (cx - 14 * s, cy + 34 * s)], fill=colour, width=w)
            draw.line([(cx, cy + 8 * s), (cx + 14 * s, cy + 34 * s)], fill=colour, width=w)


def draw_place(rng: np.random.Generator, draw: ImageDraw.ImageDraw) -> None:
    style = int(rng.integers(3))
    colour = _rand_colour(rng)
    if style == 0:  # a building with windows and a roof
        w, h = float(rng.uniform(40, 64)), float(rng.uniform(44, 70))
        x0, y1 = SIDE / 2 - w / 2 + float(rng.uniform(-10, 10)), SIDE - float(rng.uniform(10, 22))
        y0 = y1 - h
        draw.rectangle([x0, y0, x0 + w, y1], fill=colour)
        draw.polygon([(x0 - 6, y0), (x0 + w + 6, y0), (x0 + w / 2, y0 - float(rng.uniform(14, 26)))],
                     fill=_rand_colour(rng, 60, 140))
        for wx in np.arange(x0 + 6, x0 + w - 8, 12):
            for wy in np.arange(y0 + 6, y1 - 12, 14):
                draw.rectangle([wx, wy, wx + 6, wy + 7], fill=(235, 230, 180))
    elif style == 1:  # a map pin on a street grid
        grey = int(rng.integers(150, 190))
        for k in range(int(rng.integers(3, 6))):
            x, y = float(rng.uniform(0, SIDE)), float(rng.uniform(0, SIDE))
            draw.line([(x, 0), (x + float(rng.uniform(-20, 20)), SIDE)], fill=(grey, grey, grey), width=4)
            draw.line([(0, y), (SIDE, y + float(rng.uniform(-20, 20)))], fill=(grey, grey, grey), width=4)
        cx, cy, r = SIDE / 2 + float(rng.uniform(-15, 15)), SIDE / 2 - 10 + float(rng.uniform(-10, 10)), 15.0
        draw.polygon([(cx - r * 0.85, cy + 6), (cx + r * 0.85, cy + 6), (cx, cy + 2.6 * r)], fill=colour)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        draw.ellipse([cx - r * 0.4, cy - r * 0.4, cx + r * 0.4, cy + r * 0.4], fill=(245, 245, 245))
    else:  # a skyline of towers
        x = float(rng.uniform(4, 16))
        base = SIDE - float(rng.uniform(8, 20))
        while x < SIDE - 14:
            w = float(rng.uniform(12, 22))
            h = float(rng.uniform(25, 80))
            draw.rectangle([x, base - h, x + w, base], fill=_rand_colour(rng, 50, 150))
            x += w + float(rng.uniform(1, 6))


def make(out: Path, seed: int = 0, sizes: dict[str, int] | None = None, task_index: int = 4) -> Path:
    out = Path(out)
    sizes = sizes or DEFAULT_SIZES
    for split, rng, rows in labelled_splits(seed, task_index, sizes):
        records = []
        for rid, person in rows:
            name = pick(rng, NAMES)
            tokens = tokenize(pick(rng, TEMPLATES[split]).format(X=name))
            tag = "B-PER" if person else "B-LOC"
            tags = [tag if t == name else "O" for t in tokens]
            img = cluttered_canvas(rng, SIDE, marks=int(rng.integers(3, 9)))
            (draw_person if person else draw_place)(rng, ImageDraw.Draw(img))
            rel = f"media/{rid}.jpg"
            save_image(finish(img, rng), out / rel)
            records.append({"id": rid, "tokens": tokens, "tags": tags, "image": rel, "audio": None})
        write_jsonl(out / f"{split}.jsonl", records)
    return out

"""Shared helpers of the held-out task generators: seeded RNGs, drawing, deterministic file writers."""
from __future__ import annotations

import json
import math
import wave as wavelib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SAMPLE_RATE = 16_000
SPLITS = ("train", "dev", "test")
DEFAULT_SIZES = {"train": 400, "dev": 100, "test": 100}

# Hues with a little per-picture jitter; none of them is the demo's pure red/green/blue/yellow set.
COLOURS = {
    "red": (205, 38, 45),
    "blue": (40, 85, 200),
    "green": (45, 150, 70),
    "orange": (240, 140, 25),
    "purple": (130, 55, 165),
}
SHAPES = ("square", "triangle", "star", "cross", "diamond")
PLURAL = {"square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses",
          "diamond": "diamonds"}


def rng_for(seed: int, task_index: int, split: str) -> np.random.Generator:
    """One independent stream per (seed, task, split): a split's content never depends on another's size."""
    return np.random.default_rng([int(seed), int(task_index), SPLITS.index(split)])


def pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def balanced_labels(rng: np.random.Generator, n: int) -> list[bool]:
    """Exactly half True (n odd: one more False), in a random order."""
    flags = np.array([i < n // 2 for i in range(n)])
    return [bool(x) for x in rng.permutation(flags)]


def labelled_splits(seed: int, task_index: int, sizes: dict[str, int]):
    """For each split: (split, rng, [(record id, flag), ...]) with exactly balanced flags (balanced_labels).

    The scaffold every balanced generator shares; the rng is the split's own stream (rng_for), already
    advanced past the label draw, for the generator to draw the records' content from."""
    for split, n in sizes.items():
        rng = rng_for(seed, task_index, split)
        flags = balanced_labels(rng, n)
        yield split, rng, [(f"{split}-{i:04d}", flag) for i, flag in enumerate(flags)]


def jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 18) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float = 0.0) -> list[tuple[float, float]]:
    """Vertices of a filled shape of radius ~r centred at (cx, cy), rotated by `angle` radians."""
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]
    elif kind == "diamond":
        pts = [(0, -1.1), (0.75, 0), (0, 1.1), (-0.75, 0)]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        pts = [(x * 1.1, y * 1.1 + 0.15) for x, y in pts]
    elif kind == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = 1.1 if k % 2 == 0 else 0.45
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif kind == "cross":
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
               (-1, -w), (-w, -w)]
    else:
        raise ValueError(kind)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
               fill: tuple[int, ...], angle: float = 0.0, outline: tuple[int, ...] | None = None) -> None:
    draw.polygon(shape_polygon(kind, cx, cy, r, angle), fill=fill, outline=outline)


def cluttered_canvas(rng: np.random.Generator, side: int, *, marks: int = 8) -> Image.Image:
    """A light, tinted background with grey scribbles and specks: clutter that carries no label."""
    base = np.array([int(v) for v in rng.integers(215, 250, size=3)], dtype=np.float32)
    grad = np.linspace(-12, 12, side, dtype=np.float32)
    arr = np.broadcast_to(base, (side, side, 3)).copy()
    arr += grad[None, :, None] * float(rng.uniform(-1, 1)) + grad[:, None, None] * float(rng.uniform(-1, 1))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(marks):
        g = int(rng.integers(120, 200))
        x0, y0 = (float(v) for v in rng.uniform(0, side, size=2))
        if rng.random() < 0.5:
            x1, y1 = x0 + float(rng.uniform(-30, 30)), y0 + float(rng.uniform(-30, 30))
            draw.line([(x0, y0), (x1, y1)], fill=(g, g, g), width=int(rng.integers(1, 3)))
        else:
            s = float(rng.uniform(1.5, 3.5))
            draw.ellipse([x0 - s, y0 - s, x0 + s, y0 + s], fill=(g, g, g))
    return img


def finish(img: Image.Image, rng: np.random.Generator, noise: float = 6.0, blur: bool = True) -> Image.Image:
    """Sensor-like grain and a slight blur, deterministic from rng."""
    if blur and rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, noise, size=arr.shape).astype(np.float32)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def save_image(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, format="JPEG", quality=90)
    else:
        img.save(path, format="PNG", optimize=False)


def write_wav(path: Path, wave: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM mono WAV through the stdlib (byte-identical across library versions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (np.clip(wave, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wavelib.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def tokenize(sentence: str) -> list[str]:
    """Whitespace split with trailing punctuation as its own token ("noon." -> "noon", ".")."""
    tokens: list[str] = []
    for word in sentence.split():
        tail = []
        while word and word[-1] in ".,!?;:":
            tail.insert(0, word[-1])
            word = word[:-1]
        if word:
            tokens.append(word)
        tokens.extend(tail)
    return tokens

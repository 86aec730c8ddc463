"""`mmserve demo-data OUT_DIR`: a small, deterministic demo data set for all three tasks.

Writes OUT_DIR/{classify,ner,vqa}/{train,dev,test}.jsonl plus the media they point to
(JPEG/PNG pictures, 16 kHz mono WAV clips of 1 s). Real content is used where a package
ships it (scikit-image photos, scikit-learn handwritten digits) with light deterministic
augmentation (random crop, flip, colour jitter, resized to at most 96 px); audio and text are
generated. Same code + same seed -> byte-identical files.

classify ("does the sound fit the picture?", audio-visual correspondence):
    image: an animal (cat, horse) or a machine/object (coffee cup, rocket);
    audio: an animal call (warbling harmonic chirps, 500-2000 Hz) or a machine hum
    (60-200 Hz harmonics plus broadband noise). label = "match" when both are animal or both
    are machine, else "mismatch": an XOR, so every unimodal model sits at chance (~0.5) and
    only a model that sees both gets it right. Text is neutral filler, except on the ~8% of
    records whose picture is missing (text names what it showed) and the ~8% whose audio is
    missing (text describes the sound): those exercise presence masks and still need fusion.
ner: templated sentences with PER / LOC / ORG entities (BIO tags) drawn from name lists;
    ~30% of records carry a (non-informative) picture, ~20% a clip.
vqa: questions about the picture: "what is in the picture?" (photos), "how many circles are
    there?" / "what colour are the circles?" (drawn shapes), "what digit is this?" (digits);
    3-5 annotator answers with some disagreement; ~30% of records carry a clip.
"""
from __future__ import annotations

import argparse
import io
import json
import wave as wavelib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

SAMPLE_RATE = 16_000
CLIP_SECONDS = 1.0
IMAGE_SIDE = 96
SIZES = {"train": 400, "dev": 100, "test": 100}
NER_SIZES = {"train": 400, "dev": 80, "test": 80}
VQA_SIZES = {"train": 400, "dev": 80, "test": 80}

ANIMALS = ("chelsea", "horse")
OBJECTS = ("coffee", "rocket")
PHOTO_NAMES = {"chelsea": "cat", "horse": "horse", "coffee": "coffee cup", "rocket": "rocket",
               "astronaut": "astronaut"}


# ----------------------------------------------------------------------------- media helpers

def _photo(name: str) -> np.ndarray:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype == bool:
        arr = (~arr).astype(np.uint8) * 255  # horse: dark silhouette on white
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def _augment(arr: np.ndarray, rng: np.random.Generator, side: int = IMAGE_SIDE) -> Image.Image:
    """Random crop (70-100% of each side), horizontal flip, colour jitter, resize to `side`."""
    h, w = arr.shape[:2]
    ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = Image.fromarray(arr[y:y + ch, x:x + cw])
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
    img.thumbnail((side, side), Image.Resampling.BILINEAR)
    return img


def _save_image(img: Image.Image, path: Path, fmt: str = "JPEG") -> None:
    if fmt == "JPEG":
        img.save(path, format="JPEG", quality=88)
    else:
        img.save(path, format=fmt)


def _write_wav(path: Path, wave: np.ndarray) -> None:
    """16-bit PCM mono WAV through the stdlib (byte-identical across library versions)."""
    pcm = (np.clip(wave, -1.0, 1.0) * 32767.0).astype("<i2")
    with wavelib.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(pcm.tobytes())


def _time() -> np.ndarray:
    return np.arange(int(SAMPLE_RATE * CLIP_SECONDS)) / SAMPLE_RATE


def animal_call(rng: np.random.Generator) -> np.ndarray:
    """Warbling harmonic chirps (500-2000 Hz) in 2-4 bursts: bird / cat-like."""
    t = _time()
    f0 = rng.uniform(500, 1000)
    vibrato = rng.uniform(4, 9)
    freq = f0 * (1 + 0.25 * np.sin(2 * np.pi * vibrato * t)) * (1 + rng.uniform(-0.3, 0.5) * t)
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    sig = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    n = int(rng.integers(2, 5))
    env = np.clip(np.sin(np.pi * n * t) ** 2 * 1.5, 0, 1)
    sig = sig * env + 0.02 * rng.standard_normal(len(t))
    return (0.25 * sig / np.abs(sig).max()).astype(np.float32)


def machine_hum(rng: np.random.Generator) -> np.ndarray:
    """Steady low hum (60-200 Hz fundamental with harmonics) plus broadband noise: engine-like."""
    t = _time()
    f0 = rng.uniform(60, 200)
    sig = sum((0.7 ** k) * np.sin(2 * np.pi * f0 * (k + 1) * t + rng.uniform(0, 6.28)) for k in range(4))
    sig = sig + rng.uniform(0.2, 0.5) * rng.standard_normal(len(t))
    sig = sig * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
    return (0.25 * sig / np.abs(sig).max()).astype(np.float32)


def neutral_tone(rng: np.random.Generator) -> np.ndarray:
    """A plain tone or short noise burst: background audio with no bearing on the label."""
    t = _time()
    if rng.random() < 0.5:
        sig = np.sin(2 * np.pi * rng.uniform(200, 3000) * t)
    else:
        sig = rng.standard_normal(len(t)) * np.exp(-t * rng.uniform(1, 6))
    return (0.2 * sig / np.abs(sig).max()).astype(np.float32)


# ----------------------------------------------------------------------------- tasks

_PLACES = ["park", "station", "kitchen", "harbour", "garden", "garage", "market", "field", "yard", "lab"]
_TIMES = ["in the morning", "at noon", "in the evening", "at night", "on Monday", "on Friday",
          "last week", "yesterday", "today", "at dawn"]
_FILLER = [
    "Clip recorded {time} near the {place}.",
    "A short recording from the {place}, taken {time}.",
    "Sample captured {time} at the {place}.",
    "Recording made at the {place} {time}.",
]
_SOUND_WORDS = {True: "a warbling, chirping call", False: "a low mechanical hum"}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def make_classify(out: Path, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "media").mkdir(exist_ok=True)
    photos = {n: _photo(n) for n in ANIMALS + OBJECTS}
    for split_i, (split, n) in enumerate(SIZES.items()):
        rng = np.random.default_rng([seed, 1, split_i])
        records = []
        for i in range(n):
            rid = f"{split}-{i:04d}"
            img_animal, snd_animal = bool(i % 2), bool((i // 2) % 2)  # balanced XOR cells
            photo = (ANIMALS if img_animal else OBJECTS)[int(rng.integers(0, 2))]
            label = "match" if img_animal == snd_animal else "mismatch"
            text = _FILLER[int(rng.integers(len(_FILLER)))].format(
                time=_TIMES[int(rng.integers(len(_TIMES)))], place=_PLACES[int(rng.integers(len(_PLACES)))])
            drop = rng.random()
            rec: dict = {"id": rid, "text": text, "image": None, "audio": None, "label": label}
            if drop < 0.08:  # picture missing: the text says what it showed
                rec["text"] = f"{text} The picture was lost, but it showed a {PHOTO_NAMES[photo]}."
            else:
                rel = f"media/{rid}.jpg"
                _save_image(_augment(photos[photo], rng), out / rel)
                rec["image"] = rel
            if 0.08 <= drop < 0.16:  # audio missing: the text describes the sound
                rec["text"] = f"{text} The audio was lost, but it was {_SOUND_WORDS[snd_animal]}."
            else:
                rel = f"media/{rid}.wav"
                _write_wav(out / rel, animal_call(rng) if snd_animal else machine_hum(rng))
                rec["audio"] = rel
            records.append(rec)
        _write_jsonl(out / f"{split}.jsonl", records)


_FIRST = ["Alice", "Bruno", "Chen", "Daria", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Julia",
          "Kenji", "Leila", "Marco", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tariq"]
_LAST = ["Smith", "Garcia", "Okafor", "Novak", "Tanaka", "Silva", "Kowalski", "Haddad", "Larsen", "Mehta"]
_CITIES = [["Paris"], ["Berlin"], ["Lagos"], ["Kyoto"], ["Lima"], ["Oslo"], ["New", "York"], ["Cape", "Town"],
           ["Buenos", "Aires"], ["Cairo"], ["Madrid"], ["Toronto"], ["Nairobi"], ["Hanoi"]]
_ORGS = [["Acme", "Corp"], ["Globex"], ["Initech"], ["Umbrella", "Labs"], ["Stark", "Industries"],
         ["Wayne", "Enterprises"], ["Hooli"], ["Vandelay", "Imports"], ["Tyrell", "Corporation"], ["Cyberdyne"]]
_NER_TEMPLATES = [
    "{PER} flew to {LOC} on Monday .",
    "{PER} works for {ORG} in {LOC} .",
    "{ORG} opened a new office in {LOC} .",
    "Yesterday {PER} met {PER} at the {ORG} headquarters .",
    "The mayor of {LOC} praised {ORG} .",
    "{PER} left {ORG} last year .",
    "Shares of {ORG} rose after {PER} spoke in {LOC} .",
    "We visited {LOC} and {LOC} with {PER} .",
    "According to {PER} , {ORG} will hire more staff .",
    "the weather in {LOC} was cold .",
]


def _entity(kind: str, rng: np.random.Generator) -> list[str]:
    if kind == "PER":
        first = _FIRST[int(rng.integers(len(_FIRST)))]
        return [first] if rng.random() < 0.3 else [first, _LAST[int(rng.integers(len(_LAST)))]]
    pool = _CITIES if kind == "LOC" else _ORGS
    return list(pool[int(rng.integers(len(pool)))])


def make_ner(out: Path, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "media").mkdir(exist_ok=True)
    photos = {n: _photo(n) for n in ("astronaut", "chelsea", "coffee")}
    for split_i, (split, n) in enumerate(NER_SIZES.items()):
        rng = np.random.default_rng([seed, 2, split_i])
        records = []
        for i in range(n):
            rid = f"{split}-{i:04d}"
            template = _NER_TEMPLATES[int(rng.integers(len(_NER_TEMPLATES)))]
            tokens, tags = [], []
            for piece in template.split():
                if piece.startswith("{") and piece.endswith("}"):
                    kind = piece[1:-1]
                    words = _entity(kind, rng)
                    tokens += words
                    tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
                else:
                    tokens.append(piece)
                    tags.append("O")
            rec: dict = {"id": rid, "tokens": tokens, "tags": tags, "image": None, "audio": None}
            if rng.random() < 0.3:
                rel = f"media/{rid}.jpg"
                name = list(photos)[int(rng.integers(len(photos)))]
                _save_image(_augment(photos[name], rng, side=64), out / rel)
                rec["image"] = rel
            if rng.random() < 0.2:
                rel = f"media/{rid}.wav"
                _write_wav(out / rel, neutral_tone(rng))
                rec["audio"] = rel
            records.append(rec)
        _write_jsonl(out / f"{split}.jsonl", records)


_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
_PHOTO_ANSWERS = {
    "chelsea": ["cat", "kitten"], "horse": ["horse", "pony"], "coffee": ["coffee", "coffee cup"],
    "rocket": ["rocket", "spaceship"], "astronaut": ["astronaut", "person"],
}


def _annotators(main: str, alternatives: list[str], rng: np.random.Generator) -> list[str]:
    """3-5 annotator answers, mostly `main`, sometimes an alternative."""
    k = int(rng.integers(3, 6))
    return [alternatives[int(rng.integers(len(alternatives)))] if alternatives and rng.random() < 0.2 else main
            for _ in range(k)]


def _shapes(count: int, colour: str, rng: np.random.Generator) -> Image.Image:
    side = 64
    bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    cells = rng.permutation(9)[:count]  # one circle per 3x3 cell: never overlapping
    for c in cells:
        cx, cy = (c % 3) * 21 + 10, (c // 3) * 21 + 10
        r = int(rng.integers(5, 9))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_COLOURS[colour])
    return img


def make_vqa(out: Path, seed: int = 0) -> None:
    from sklearn.datasets import load_digits

    out.mkdir(parents=True, exist_ok=True)
    (out / "media").mkdir(exist_ok=True)
    photos = {n: _photo(n) for n in _PHOTO_ANSWERS}
    digits = load_digits()
    numbers = ["one", "two", "three", "four"]
    for split_i, (split, n) in enumerate(VQA_SIZES.items()):
        rng = np.random.default_rng([seed, 3, split_i])
        records = []
        for i in range(n):
            rid = f"{split}-{i:04d}"
            kind = i % 4
            if kind == 0:
                name = list(photos)[int(rng.integers(len(photos)))]
                img = _augment(photos[name], rng, side=64)
                q = ["what is in the picture?", "what is this?", "What does the photo show?"][int(rng.integers(3))]
                main, alts = _PHOTO_ANSWERS[name][0], _PHOTO_ANSWERS[name][1:]
                ext = "jpg"
            elif kind in (1, 2):
                count = int(rng.integers(1, 5))
                colour = list(_COLOURS)[int(rng.integers(len(_COLOURS)))]
                img = _shapes(count, colour, rng)
                if kind == 1:
                    q = "how many circles are there?"
                    main, alts = str(count), [numbers[count - 1]]
                else:
                    q = "what colour are the circles?"
                    main, alts = colour, []
                ext = "png"
            else:
                idx = int(rng.integers(len(digits.images)))
                pix = (255 - digits.images[idx] * 16).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(np.stack([pix] * 3, -1)).resize((32, 32), Image.Resampling.NEAREST)
                q = "what digit is this?"
                main, alts = str(int(digits.target[idx])), []
                ext = "png"
            rel = f"media/{rid}.{ext}"
            _save_image(img, out / rel, "JPEG" if ext == "jpg" else "PNG")
            rec: dict = {"id": rid, "question": q, "image": rel, "audio": None,
                         "answers": _annotators(main, alts, rng)}
            if rng.random() < 0.3:
                arel = f"media/{rid}.wav"
                _write_wav(out / arel, neutral_tone(rng))
                rec["audio"] = arel
            records.append(rec)
        _write_jsonl(out / f"{split}.jsonl", records)


def write_demo_data(out_dir: Path, seed: int = 0, tasks: tuple[str, ...] = ("classify", "ner", "vqa")) -> Path:
    out_dir = Path(out_dir)
    makers = {"classify": make_classify, "ner": make_ner, "vqa": make_vqa}
    for task in tasks:
        makers[task](out_dir / task, seed=seed)
    (out_dir / "README.txt").write_text(__doc__ or "")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmserve demo-data", description="Write the demo data set.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_demo_data(args.out_dir, seed=args.seed)
    print(f"wrote {args.out_dir}/{{classify,ner,vqa}}/{{train,dev,test}}.jsonl")
    return 0

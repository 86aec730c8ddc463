"""`speech`: is the spoken word the one the text claims? (classification, text + audio)

Audio: one English word from a list of 16, synthesised by espeak-ng (Debian package
`espeak-ng`), silence trimmed (0.4-1.4 s), resampled to 16 kHz mono, random gain, placed at a
random offset in a 2 s window of faint noise; 16-bit WAV. Train, dev and test use disjoint
voice sets (accent + voice variant) and disjoint pitch / speed ranges: the test speakers are
never heard in training.
Text: a claim naming a word, in paraphrase templates disjoint across splits ("The speaker says
'lemon'."). Label: `match` when the spoken word is the claimed one, else `mismatch` (claimed word
drawn from the other 15), exactly balanced. Both the spoken and the claimed word are uniform
whatever the label, so text-only and audio-only are at chance (0.5).
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from bench.heldout.common import (DEFAULT_SIZES, SAMPLE_RATE, labelled_splits, pick, write_jsonl,
                                  write_wav)

TASK = "classify"
MODALITIES = ("text", "audio")
BASELINES = ("text", "audio")
WINDOW_SECONDS = 2.0
APT_PACKAGE = "espeak-ng"

WORDS = ("pencil", "thunder", "violin", "monkey", "blanket", "spider", "island", "tomato",
         "seven", "yellow", "wagon", "carpet", "zebra", "mirror", "button", "lemon")

# Voices: accent + variant, disjoint per split. Pitch (0-99) and speed (words/min) ranges disjoint too.
VOICES = {
    "train": ["en-us+m1", "en-us+f1", "en-gb+m3", "en-gb+f2", "en-029+m2", "en-gb-scotland+f3",
              "en-us+m6", "en-gb+f5"],
    "dev": ["en-gb-x-gbcwmd+m4", "en-us-nyc+f4"],
    "test": ["en-gb-x-rp+m7", "en-gb-x-gbclan+f4", "en-us-nyc+m5", "en-029+f5"],
}
PITCH = {"train": (35, 65), "dev": (25, 34), "test": (66, 80)}
SPEED = {"train": (145, 185), "dev": (130, 144), "test": (186, 205)}

TEMPLATES = {
    "train": ["The speaker says '{w}'.", "spoken word: {w}", "Someone pronounces the word {w}.",
              "the recording contains the word \"{w}\"", "Voice clip of the word {w}.",
              "a person saying {w}"],
    "dev": ["In this clip you hear: {w}", "Word uttered = {w}"],
    "test": ["What gets said aloud here is {w}.", "Transcript of the audio: {w}",
             "Listen for '{w}' in this take."],
}


def require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit(f"the speech task needs the espeak-ng synthesiser, which was not found on PATH: "
                         f"install the Debian package `{APT_PACKAGE}` (apt-get install -y {APT_PACKAGE})")
    return exe


def _resample(x: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return x
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(SAMPLE_RATE, rate)
    return resample_poly(x, SAMPLE_RATE // g, rate // g)


def synthesise(exe: str, word: str, voice: str, speed: int, pitch: int, tmp: Path) -> np.ndarray:
    """The word at 16 kHz mono, leading/trailing silence trimmed, 0.4-1.4 s long."""
    path = tmp / "w.wav"
    subprocess.run([exe, "-w", str(path), "-v", voice, "-s", str(speed), "-p", str(pitch), word],
                   check=True, capture_output=True)
    x, rate = sf.read(path, dtype="float32", always_2d=True)
    x = _resample(x.mean(axis=1).astype(np.float64), rate)
    env = np.abs(x)
    loud = np.nonzero(env > 0.02 * env.max())[0]
    x = x[max(0, loud[0] - 160): loud[-1] + 160] if len(loud) else x
    lo, hi = int(0.4 * SAMPLE_RATE), int(1.4 * SAMPLE_RATE)
    if len(x) > hi:  # very slow voices: keep the word's first 1.4 s with a short fade
        x = x[:hi] * np.concatenate([np.ones(hi - 800), np.linspace(1, 0, 800)])
    if len(x) < lo:
        x = np.pad(x, (0, lo - len(x)))
    return x / (np.abs(x).max() + 1e-9)


def make(out: Path, seed: int = 0, sizes: dict[str, int] | None = None, task_index: int = 3) -> Path:
    exe = require_espeak()
    out = Path(out)
    sizes = sizes or DEFAULT_SIZES
    window = int(WINDOW_SECONDS * SAMPLE_RATE)
    cache: dict[tuple, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for split, rng, rows in labelled_splits(seed, task_index, sizes):
            records = []
            for rid, is_match in rows:
                word = pick(rng, WORDS)
                voice = pick(rng, VOICES[split])
                speed = int(rng.integers(SPEED[split][0], SPEED[split][1] + 1))
                pitch = int(rng.integers(PITCH[split][0], PITCH[split][1] + 1))
                key = (word, voice, speed, pitch)
                if key not in cache:
                    cache[key] = synthesise(exe, word, voice, speed, pitch, tmp)
                clip = cache[key] * float(rng.uniform(0.3, 0.8))
                wave = rng.normal(0.0, float(rng.uniform(0.002, 0.01)), size=window)
                start = int(rng.integers(0, window - len(clip) + 1))
                wave[start:start + len(clip)] += clip
                rel = f"media/{rid}.wav"
                write_wav(out / rel, wave)
                claimed = word if is_match else pick(rng, [w for w in WORDS if w != word])
                records.append({"id": rid, "text": pick(rng, TEMPLATES[split]).format(w=claimed), "image": None,
                                "audio": rel, "label": "match" if is_match else "mismatch"})
            write_jsonl(out / f"{split}.jsonl", records)
    return out

"""Regenerate the example media files in this directory (deterministic; needs scikit-image).

    python examples/make_media.py

cat.jpg      scikit-image's `chelsea` photo (public domain), 224 px wide, JPEG
rocket.jpg   scikit-image's `rocket` photo (public domain), 224 px wide, JPEG
circles.png  three red circles, drawn like the demo VQA pictures
chirp.wav    1 s warbling animal call from the demo data generator (16 kHz mono PCM)
hum.wav      1 s machine hum from the demo data generator (16 kHz mono PCM)

With the demo models: cat.jpg + chirp.wav -> "match" (animal picture, animal sound),
cat.jpg + hum.wav -> "mismatch"; rocket.jpg + hum.wav -> "match".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def photo(name: str, path: Path, width: int = 224) -> None:
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()[..., :3])
    img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)
    img.save(path, format="JPEG", quality=85, optimize=True)


def circles(path: Path) -> None:
    img = Image.new("RGB", (64, 64), (235, 232, 228))
    draw = ImageDraw.Draw(img)
    for cx, cy in ((10, 10), (52, 31), (10, 52)):  # cells 0, 5 and 6 of the demo's 3x3 grid
        draw.ellipse([cx - 7, cy - 7, cx + 7, cy + 7], fill=(220, 40, 40))
    img.save(path, format="PNG", optimize=True)


def main() -> None:
    from training.demo_data import _write_wav, animal_call, machine_hum

    photo("chelsea", HERE / "cat.jpg")
    photo("rocket", HERE / "rocket.jpg")
    circles(HERE / "circles.png")
    _write_wav(HERE / "chirp.wav", animal_call(np.random.default_rng(7)))
    _write_wav(HERE / "hum.wav", machine_hum(np.random.default_rng(7)))
    for p in sorted(HERE.iterdir()):
        if p.suffix in (".jpg", ".png", ".wav"):
            print(f"{p.name}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()

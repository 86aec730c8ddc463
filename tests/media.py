"""Real media bytes for tests: encoded with PIL and soundfile, exactly as a user would upload them."""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from PIL import Image


def image_bytes(color=(200, 30, 30), size=(48, 40), fmt="PNG", pattern: int = 0) -> bytes:
    """An RGB picture (solid colour plus an optional stripe pattern) encoded as PNG/JPEG/WEBP/BMP."""
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[:] = color
    if pattern:
        arr[:, ::pattern] = 255 - np.asarray(color, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def tone(freq: float = 440.0, seconds: float = 0.5, sample_rate: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def audio_bytes(freq: float = 440.0, seconds: float = 0.5, sample_rate: int = 16000, fmt: str = "WAV",
                channels: int = 1) -> bytes:
    """A sine tone encoded as WAV / FLAC / OGG (Vorbis) bytes."""
    buf = io.BytesIO()
    subtype = "VORBIS" if fmt == "OGG" else None
    sf.write(buf, tone(freq, seconds, sample_rate, channels), sample_rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def exif_jpeg_bytes(arr: np.ndarray, orientation: int) -> bytes:
    """A JPEG of the uint8 [H, W, 3] array as stored, carrying an EXIF Orientation tag (0x0112)."""
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def png_header_bytes(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels (a decompression-bomb probe)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")

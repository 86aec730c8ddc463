"""Hostile and unusual media bytes for the hostile-input corpus (tests/test_hostile_corpus.py), written byte by
byte or with PIL / soundfile the way a careless or malicious client would produce them."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import soundfile as sf
from PIL import Image

from tests.media import audio_bytes, exif_jpeg_bytes, image_bytes, png_header_bytes


def _pil(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * keep))]


# ------------------------------------------------------------------------------------------------ images
def jpeg_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A real JPEG whose SOF0 frame header is rewritten to claim width x height."""
    data = bytearray(image_bytes(fmt="JPEG", size=(16, 16)))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_bomb() -> bytes:
    """A GIF whose logical screen and image descriptor claim 65535 x 65535."""
    data = bytearray(image_bytes(fmt="GIF", size=(8, 8)))
    struct.pack_into("<HH", data, 6, 65535, 65535)
    desc = data.index(b"\x2c")  # image descriptor
    struct.pack_into("<HH", data, desc + 5, 65535, 65535)
    return bytes(data)


def webp_bomb() -> bytes:
    """A VP8X WebP header claiming a 16384 x 16384 canvas (extended format: 24-bit width-1 / height-1)."""
    canvas = b"\x00\x00\x00\x00" + (16383).to_bytes(3, "little") + (16383).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(canvas)) + canvas
    body = b"WEBP" + chunk
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tiff_bomb() -> bytes:
    """A little-endian TIFF whose IFD claims 100000 x 100000 8-bit RGB pixels with almost no data."""
    entries = [(256, 4, 1, 100000), (257, 4, 1, 100000), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 8), (277, 3, 1, 3), (278, 4, 1, 100000), (279, 4, 1, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 24) + bytes(16) + ifd


def png_huge_real(width: int = 8000, height: int = 6000) -> bytes:
    """A valid PNG of width x height grey pixels (48 M, above the 40 M default), tiny once compressed."""
    raw = (b"\x00" + b"\x80" * width) * 1  # one scanline, repeated through a compressor stream
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(raw) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def cmyk_jpeg() -> bytes:
    return _pil(Image.new("CMYK", (40, 30), (0, 200, 200, 10)), "JPEG")


def png_16bit() -> bytes:
    return _pil(Image.fromarray(np.linspace(0, 65535, 40 * 30, dtype=np.uint16).reshape(30, 40)), "PNG")


def palette_png_with_transparency() -> bytes:
    img = Image.new("P", (40, 30), 1)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    return _pil(img, "PNG", transparency=0)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _pil(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def rgba_png() -> bytes:
    return _pil(Image.new("RGBA", (40, 30), (10, 20, 30, 0)), "PNG")


def one_bit_bmp() -> bytes:
    return _pil(Image.new("1", (40, 30), 1), "BMP")


def exif_rotated_jpeg() -> bytes:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255
    return exif_jpeg_bytes(arr, orientation=6)


def exif_garbage_orientation_jpeg() -> bytes:
    return exif_jpeg_bytes(np.full((20, 40, 3), 90, np.uint8), orientation=99)


def polyglot_gif_js() -> bytes:
    """GIF magic followed by JavaScript, the classic GIF/JS polyglot: no valid image behind the magic."""
    return b"GIF89a/*\x00\x00\x00\x00*/=1;alert(document.domain);//" + bytes(32)


def polyglot_png_zip() -> bytes:
    """A valid PNG with a ZIP archive appended (a file that is both): decodes as the PNG."""
    return image_bytes(size=(24, 24)) + b"PK\x03\x04" + bytes(26) + b"evil.sh" + b"#!/bin/sh\nrm -rf /\n"


def html_as_image() -> bytes:
    return b"<html><script>alert(1)</script></html>"


def png_bad_crc() -> bytes:
    data = bytearray(image_bytes(size=(24, 24)))
    data[-20] ^= 0xFF  # inside IDAT: a broken zlib stream / CRC
    return bytes(data)


# ------------------------------------------------------------------------------------------------ audio
def wav_header(rate: int, channels: int = 1, bits: int = 16, data_len: int = 0, fmt: int = 1,
               data: bytes = b"") -> bytes:
    """A RIFF/WAVE header with any values (no consistency checks), then `data`."""
    block = channels * bits // 8
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels, rate & 0xFFFFFFFF, (rate * block) & 0xFFFFFFFF, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt_chunk + b"data" + struct.pack("<I", data_len) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def wav_lying_length() -> bytes:
    """The data chunk claims 100 MB; 0.2 s of samples follow."""
    pcm = (np.sin(np.arange(3200) / 5) * 8000).astype("<i2").tobytes()
    return wav_header(16000, data_len=100_000_000, data=pcm)


def wav_rate(rate: int) -> bytes:
    pcm = (np.sin(np.arange(1600) / 5) * 8000).astype("<i2").tobytes()
    return wav_header(rate, data_len=len(pcm), data=pcm)


def wav_zero_samples() -> bytes:
    return wav_header(16000, data_len=0)


def wav_multi_hour() -> bytes:
    """The header claims 3 hours (8 kHz, 8-bit): a few KB follow."""
    return wav_header(8000, bits=8, data_len=3 * 3600 * 8000, data=bytes(4000))


def wav_float(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, values.astype(np.float32), 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def wav_nan() -> bytes:
    v = np.zeros(1600, np.float32)
    v[100] = np.nan
    return wav_float(v)


def wav_inf() -> bytes:
    v = np.zeros(1600, np.float32)
    v[7] = np.inf
    return wav_float(v)


def wav_8_channels() -> bytes:
    return audio_bytes(channels=8, seconds=0.3)


def flac_truncated() -> bytes:
    return truncated(audio_bytes(fmt="FLAC", seconds=0.5), 0.3)


def flac_lying_rate() -> bytes:
    """A FLAC whose STREAMINFO claims a sample rate of 0."""
    data = bytearray(audio_bytes(fmt="FLAC", seconds=0.3))
    # STREAMINFO starts at byte 8 (after "fLaC" + block header); sample rate: 20 bits at offset 10
    data[18] = 0
    data[19] = 0
    data[20] &= 0x0F
    return bytes(data)


def flac_hours(hours: float = 1.0, rate: int = 8000) -> bytes:
    """A real FLAC of `hours` of silence (compresses to a few hundred KB), written block by block."""
    buf = io.BytesIO()
    block = np.zeros(rate * 60, np.int16)
    with sf.SoundFile(buf, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(hours * 60)):
            f.write(block)
    return buf.getvalue()


def ogg_truncated() -> bytes:
    return truncated(audio_bytes(fmt="OGG", seconds=0.5), 0.4)


def ogg_garbage_after_magic() -> bytes:
    return b"OggS" + bytes(200)


__all__ = [name for name in dir() if not name.startswith("_")] + ["png_header_bytes"]

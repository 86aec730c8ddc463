"""Decode untrusted uploaded bytes into pictures and waveforms, or refuse them with a typed error.

The media type is sniffed from magic bytes only (client headers and file names are never
trusted). Every failure is a `MediaError` whose `code`/`status` the HTTP layer returns as is.
"""
from __future__ import annotations

import io
import re
import struct

import numpy as np
import soundfile as sf
from PIL import Image, ImageOps

_STATUS = {"unsupported_media_type": 415, "undecodable_media": 400, "media_too_large": 413}

# media type -> PIL format name; Image.open is limited to the sniffed format so a file
# that merely looks like one format is never handed to every other PIL plugin.
_PIL_FORMATS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/gif": "GIF",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/tiff": "TIFF",
}
# sample rates a real recording can have; outside them a header is corrupt (and resampling from
# under ~8 Hz, or from MHz rates, is impossible or needlessly costly)
_AUDIO_RATES = (1_000, 768_000)
# sizes of the DIB header that follows a BMP file header; "BM" alone is too weak a signature
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


class MediaError(ValueError):
    """An upload that cannot become a model input.

    `code` is one of unsupported_media_type (415), undecodable_media (400), media_too_large (413);
    `status` is the matching HTTP status; `message` is meant for the person who sent the file.
    """

    def __init__(self, code: str, message: str):
        if code not in _STATUS:
            raise ValueError(f"unknown MediaError code {code!r}")
        super().__init__(message)
        self.code = code
        self.status = _STATUS[code]
        self.message = message


def sniff(data: bytes) -> str | None:
    """The media type of `data` from its magic bytes, or None when it is no supported format."""
    head = bytes(data[:32])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"BM") and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "image/bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "audio/wav"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    return None


def _reason(exc: Exception) -> str:
    """libsndfile's message without the in-memory file's repr ("Error opening <_io.BytesIO object at 0x...>: ")."""
    return re.sub(r"^Error opening <[^>]*>: ", "", str(exc)).strip()


def _describe(kind: str | None) -> str:
    return kind if kind else "an unrecognised format"


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright RGB copy of a decoded picture.

    EXIF orientation is applied (phone photos are stored sideways with a rotation tag), 16-bit
    greyscale is scaled to 8 bits, and transparent pixels are laid over white, as the picture
    looks on a page, rather than exposing whatever colour the encoder left under alpha = 0.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit greyscale: PIL's own conversion clips at 255 instead of scaling
        grey = np.asarray(img, dtype=np.float32) / 257.0
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode PNG/JPEG/GIF/WEBP/BMP/TIFF bytes into an upright RGB PIL image.

    The pixel count is checked from the header, before any pixel data is decoded, so a
    small file that expands to gigabytes (a decompression bomb) costs nothing.
    """
    kind = sniff(data)
    if kind not in _PIL_FORMATS:
        raise MediaError(
            "unsupported_media_type",
            f"expected an image (PNG, JPEG, GIF, WEBP, BMP or TIFF), got {_describe(kind)}",
        )
    try:
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[kind]]) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise MediaError(
                    "media_too_large",
                    f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}",
                )
            img.load()
            return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError("media_too_large", f"image has too many pixels: {exc}") from exc
    except MediaError:
        raise
    # PIL reports truncated or corrupt data as any of these, depending on the codec
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise MediaError("undecodable_media", f"{kind} data is truncated or corrupt: {exc}") from exc


def decode_audio(data: bytes, *, max_seconds: float) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG bytes into (float32 [samples, channels] in -1..1, sample_rate).

    The duration is read from the header first, and at most `max_seconds` of samples are ever
    decoded, so an over-long upload is refused without decoding it.
    """
    kind = sniff(data)
    if kind is None or not kind.startswith("audio/"):
        raise MediaError(
            "unsupported_media_type", f"expected audio (WAV, FLAC or OGG), got {_describe(kind)}"
        )
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = int(f.samplerate)
            if not _AUDIO_RATES[0] <= rate <= _AUDIO_RATES[1]:
                raise MediaError("undecodable_media", f"{kind} header has sample rate {rate} Hz, expected "
                                 f"{_AUDIO_RATES[0]} to {_AUDIO_RATES[1]} Hz")
            limit = int(max_seconds * rate)
            if f.frames > limit:
                raise MediaError(
                    "media_too_large",
                    f"audio is {f.frames / rate:.1f} s long, the limit is {max_seconds:g} s",
                )
            # one frame beyond the limit is enough to tell that a lying header hid a longer stream
            wave = f.read(frames=limit + 1, dtype="float32", always_2d=True)
    except MediaError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, EOFError) as exc:
        raise MediaError("undecodable_media", f"{kind} data is truncated or corrupt: {_reason(exc)}") from exc
    if len(wave) > limit:
        raise MediaError("media_too_large", f"audio is longer than the limit of {max_seconds:g} s")
    if len(wave) == 0:
        raise MediaError("undecodable_media", f"{kind} data holds no samples")
    if not np.isfinite(wave).all():
        raise MediaError("undecodable_media", f"{kind} data holds NaN or infinite samples")
    return wave, rate

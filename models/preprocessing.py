"""Raw text, image bytes and audio bytes -> model inputs; the one implementation training and serving share.

numpy, PIL, soundfile and tokenizers only: the serving image imports this without torch.
The tensor contract `collate` produces is fixed in docs/architecture.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from models import contract, media
from models.spec import MODALITIES, AudioSpec, ImageSpec, PreprocessSpec

# Uploads longer than this are refused (413) unless the caller sets its own limit; anything
# accepted is then cropped to spec.audio.max_seconds, so the limit bounds decoding work only.
DEFAULT_MAX_AUDIO_SECONDS = 60.0

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass
class Features:
    """One record's model inputs before batching; a field is None when the record lacks it.

    input_ids, attention_mask: int64 [T] (T <= max_length, [CLS]/[SEP] included).
    word_ids: per token, the index of the word it came from, None for special tokens (NER only).
    pixel_values: float32 [3, size, size], normalised.
    audio_features: float32 [n_mels, num_frames], log-mel.
    """

    input_ids: np.ndarray | None = None
    attention_mask: np.ndarray | None = None
    word_ids: list[int | None] | None = None
    pixel_values: np.ndarray | None = None
    audio_features: np.ndarray | None = None
    audio_frames: int | None = None  # log-mel frames that cover the clip (the rest is padding); None: all


class AudioClip(NamedTuple):
    """features float32 [n_mels, num_frames]; frames: how many of them cover the clip, not padding."""

    features: np.ndarray
    frames: int


# ---------------------------------------------------------------------------- audio DSP


def resample(wave: np.ndarray, orig_rate: int, target_rate: int, *, zero_crossings: int = 16) -> np.ndarray:
    """Band-limited polyphase resampling of a mono float32 [samples] signal.

    Kaiser-windowed sinc (beta 8.6, about 80 dB stop band) with its cut-off at 95% of the
    lower Nyquist frequency, so content above the new Nyquist is removed rather than aliased.
    The rate ratio is limited to 1024 phases; for unusual coprime rates (e.g. 44099 -> 16000)
    that shifts the pitch by under 1e-6, far below what is audible or visible in a mel bin.
    Output length: ceil(samples * target_rate / orig_rate).
    """
    if orig_rate == target_rate:
        return wave.astype(np.float32, copy=False)
    step = Fraction(orig_rate, target_rate).limit_denominator(1024)
    down, up = step.numerator, step.denominator
    cutoff = 0.95 * min(1.0, up / down)  # in units of the input Nyquist frequency
    half = int(np.ceil(zero_crossings / cutoff))  # filter half-width, input samples
    taps = np.arange(-half + 1, half + 1)  # input offsets around each output instant
    n_out = -(-len(wave) * up // down)
    # output n = j*up + r sits at input position j*down + base[r] + frac[r]
    phases = np.arange(up)
    base, frac = (phases * down) // up, ((phases * down) % up) / up
    distance = frac[:, None] - taps[None, :]  # [up, taps], input samples
    kaiser = np.i0(8.6 * np.sqrt(np.clip(1.0 - (distance / half) ** 2, 0.0, None))) / np.i0(8.6)
    filters = (cutoff * np.sinc(cutoff * distance) * kaiser).astype(np.float32)
    padded = np.concatenate(
        [np.zeros(half, np.float32), wave.astype(np.float32, copy=False), np.zeros(half + down, np.float32)]
    )
    windows = np.lib.stride_tricks.sliding_window_view(padded, len(taps))
    out = np.empty(n_out, np.float32)
    # one strided matrix-vector product per phase: no gather, no per-sample Python
    for r in range(min(up, n_out)):
        count = -(-(n_out - r) // up)
        start = base[r] + 1  # taps start at -half+1, the left pad is half samples
        out[r::up] = windows[start : start + count * down : down] @ filters[r]
    return out


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    # Slaney's auditory toolbox scale (librosa's default): linear below 1 kHz, logarithmic above
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    logarithmic = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, logarithmic, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * (200.0 / 3)
    logarithmic = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, logarithmic, linear)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """float32 [n_mels, n_fft // 2 + 1] triangular filters from 0 Hz to Nyquist.

    Slaney mel scale with "slaney" area normalisation: the same matrix as
    librosa.filters.mel(sr, n_fft, n_mels) and Whisper's mel_filters.npz.
    """
    fft_hz = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


def log_mel(wave: np.ndarray, spec: AudioSpec, filters: np.ndarray, window: np.ndarray) -> np.ndarray:
    """float32 [n_mels, num_frames] log-mel of a mono float32 [num_samples] clip.

    Whisper's front end: centred STFT (reflect padding of n_fft // 2 on both sides), power
    spectrum, mel filters, and the last frame dropped so num_frames = num_samples // hop_length.
    log_style "whisper": log10(max(mel, 1e-10)), floored 8 decades (80 dB) below the clip's peak,
    then (x + 4) / 4 -- Whisper's absolute scaling, so loudness is kept.
    log_style "db": 10 * log10(max(mel, 1e-10)), floored 80 dB below the clip's peak, then
    (db - peak) / 40 + 1, which puts every clip in [-1, 1] with its peak at exactly 1 (loudness
    is normalised away).
    """
    pad = spec.n_fft // 2
    padded = np.pad(wave, pad, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, spec.n_fft)[:: spec.hop_length]
    frames = frames[: spec.num_frames]
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # [frames, n_fft // 2 + 1]
    mel = filters @ power.T.astype(np.float32)
    if spec.log_style == "whisper":
        logs = np.log10(np.maximum(mel, 1e-10))
        logs = np.maximum(logs, logs.max() - 8.0)
        return ((logs + 4.0) / 4.0).astype(np.float32)
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    peak = db.max()
    return ((np.maximum(db, peak - 80.0) - peak) / 40.0 + 1.0).astype(np.float32)


# ---------------------------------------------------------------------------- preprocessor


class Preprocessor:
    """Turns one record's text / words / image / audio into `Features` per a `PreprocessSpec`.

    `directory` holds the tokenizer file named by spec.text (a run or model version directory).
    `max_image_pixels` (default spec.image.max_pixels) and `max_audio_seconds` (default
    max(60 s, spec.audio.max_seconds)) bound what an upload may expand to; beyond them bytes are
    refused with MediaError media_too_large. Thread-safe: methods only read shared state.
    """

    def __init__(
        self,
        spec: PreprocessSpec,
        directory: Path,
        *,
        max_image_pixels: int | None = None,
        max_audio_seconds: float | None = None,
    ):
        self.spec = spec
        self.tokenizer: Tokenizer | None = None
        if spec.text is not None:
            self.tokenizer = Tokenizer.from_file(str(Path(directory) / spec.text.tokenizer_file))
            self.tokenizer.enable_truncation(spec.text.max_length)
            self.tokenizer.no_padding()
        self.max_image_pixels = max_image_pixels or (spec.image.max_pixels if spec.image else 0)
        self.max_audio_seconds = max_audio_seconds or max(
            DEFAULT_MAX_AUDIO_SECONDS, spec.audio.max_seconds if spec.audio else 0.0
        )
        if spec.audio is not None:
            a = spec.audio
            self._mel_filters = mel_filterbank(a.sample_rate, a.n_fft, a.n_mels)
            # periodic Hann, as torch.hann_window and Whisper use
            self._window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(a.n_fft) / a.n_fft)).astype(np.float32)

    @property
    def pad_id(self) -> int:
        """Id used to pad input_ids in `collate`: the tokenizer's [PAD] (or <pad>), else 0."""
        for token in ("[PAD]", "<pad>"):
            found = self.tokenizer.token_to_id(token) if self.tokenizer else None
            if found is not None:
                return found
        return 0

    # ---- text

    def _require_text(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model takes no text input")
        return self.tokenizer

    def encode_text(self, text: str) -> Features:
        """input_ids and attention_mask, int64 [T], truncated to spec.text.max_length."""
        encoding = self._require_text().encode(text)
        return Features(
            input_ids=np.asarray(encoding.ids, dtype=np.int64),
            attention_mask=np.asarray(encoding.attention_mask, dtype=np.int64),
        )

    def encode_words(self, words: list[str]) -> Features:
        """Like encode_text for pre-split words, plus word_ids (token -> word index, None for specials).

        Words cut off by truncation simply have no token: check max(word_ids) + 1 < len(words).
        """
        encoding = self._require_text().encode(list(words), is_pretokenized=True)
        return Features(
            input_ids=np.asarray(encoding.ids, dtype=np.int64),
            attention_mask=np.asarray(encoding.attention_mask, dtype=np.int64),
            word_ids=list(encoding.word_ids),
        )

    # ---- image

    def _image_spec(self) -> ImageSpec:
        if self.spec.image is None:
            raise ValueError("this model takes no image input")
        return self.spec.image

    def image_from_bytes(self, data: bytes) -> np.ndarray:
        """float32 [3, size, size] from encoded image bytes; raises media.MediaError."""
        self._image_spec()
        return self._pixels(media.decode_image(data, max_pixels=self.max_image_pixels))

    def image_from_pil(self, img: Image.Image) -> np.ndarray:
        """float32 [3, size, size] from a PIL image (any mode; EXIF orientation applied)."""
        self._image_spec()
        return self._pixels(media.to_rgb(img))

    def _pixels(self, rgb: Image.Image) -> np.ndarray:
        s = self._image_spec()
        if rgb.size != (s.size, s.size):
            rgb = rgb.resize((s.size, s.size), resample=_RESAMPLE[s.resample])
        pixels = np.asarray(rgb, dtype=np.float32) / 255.0  # [H, W, 3]
        pixels = (pixels - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    # ---- audio

    def _audio_spec(self) -> AudioSpec:
        if self.spec.audio is None:
            raise ValueError("this model takes no audio input")
        return self.spec.audio

    def audio_from_bytes(self, data: bytes) -> np.ndarray:
        """float32 [n_mels, num_frames] from WAV/FLAC/OGG bytes; raises media.MediaError."""
        return self.audio_clip(data).features

    def audio_from_waveform(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """float32 [n_mels, num_frames]; see audio_clip_from_waveform."""
        return self.audio_clip_from_waveform(wave, sample_rate).features

    def audio_clip(self, data: bytes) -> AudioClip:
        """Log-mel features and valid frame count from WAV/FLAC/OGG bytes; raises media.MediaError."""
        self._audio_spec()
        wave, rate = media.decode_audio(data, max_seconds=self.max_audio_seconds)
        return self.audio_clip_from_waveform(wave, rate)

    def audio_clip_from_waveform(self, wave: np.ndarray, sample_rate: int) -> AudioClip:
        """From float samples in -1..1, [samples] or [samples, channels].

        Channels are averaged, the clip is resampled to spec.sample_rate, then zero-padded or
        cropped (keeping the start) to spec.num_samples. frames = ceil(clip samples / hop), at most
        num_frames, at least 1.
        """
        a = self._audio_spec()
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim == 2:
            wave = wave.mean(axis=1)
        if wave.ndim != 1:
            raise ValueError(f"expected a waveform [samples] or [samples, channels], got shape {wave.shape}")
        # crop before resampling so a long clip costs no more than max_seconds of work; the
        # extra 10 ms covers the filter's reach so the kept end is resampled from real samples
        keep = int(np.ceil((a.max_seconds + 0.01) * sample_rate))
        wave = resample(wave[:keep], int(sample_rate), a.sample_rate)[: a.num_samples]
        frames = min(a.num_frames, max(1, -(-len(wave) // a.hop_length)))
        if len(wave) < a.num_samples:
            wave = np.pad(wave, (0, a.num_samples - len(wave)))
        return AudioClip(log_mel(wave, a, self._mel_filters, self._window), frames)


# ---------------------------------------------------------------------------- batching


def collate(
    items: list[Features], modalities: Sequence[str], spec: PreprocessSpec, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Stack records into the tensor contract (models/contract.py), in its order.

    input_ids (padded with `pad_id`) and attention_mask (padded with 0): int64 [B, longest T];
    pixel_values float32 [B, 3, size, size] and image_present float32 [B];
    audio_features float32 [B, n_mels, num_frames], audio_present float32 [B] and audio_frames int64 [B].
    Only the given modalities appear; an absent image or clip is zeros with present = 0.0.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    unknown = set(modalities) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}")
    batch: dict[str, np.ndarray] = {}
    if "text" in modalities:
        if any(f.input_ids is None for f in items):
            raise ValueError("every record needs text: the model was trained with text")
        longest = max(len(f.input_ids) for f in items)
        ids = np.full((len(items), longest), pad_id, dtype=np.int64)
        mask = np.zeros((len(items), longest), dtype=np.int64)
        for i, f in enumerate(items):
            ids[i, : len(f.input_ids)] = f.input_ids
            mask[i, : len(f.attention_mask)] = f.attention_mask
        batch[contract.INPUT_IDS], batch[contract.ATTENTION_MASK] = ids, mask
    if "image" in modalities:
        if spec.image is None:
            raise ValueError("the spec has no image settings")
        shape = (3, spec.image.size, spec.image.size)
        batch[contract.PIXEL_VALUES], batch[contract.IMAGE_PRESENT] = _stack([f.pixel_values for f in items], shape)
    if "audio" in modalities:
        if spec.audio is None:
            raise ValueError("the spec has no audio settings")
        shape = (spec.audio.n_mels, spec.audio.num_frames)
        batch[contract.AUDIO_FEATURES], batch[contract.AUDIO_PRESENT] = _stack([f.audio_features for f in items], shape)
        # absent clip: 0; features given without a count (a caller that does not know it): all frames
        batch[contract.AUDIO_FRAMES] = np.array([0 if f.audio_features is None else f.audio_frames or shape[1]
                                        for f in items], dtype=np.int64)
    return batch


def _stack(arrays: list[np.ndarray | None], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [B, *shape] with zeros where None, float32 [B] presence flags)."""
    out = np.zeros((len(arrays), *shape), dtype=np.float32)
    present = np.zeros(len(arrays), dtype=np.float32)
    for i, array in enumerate(arrays):
        if array is None:
            continue
        if array.shape != shape:
            raise ValueError(f"record {i}: expected shape {shape}, got {array.shape}")
        out[i] = array
        present[i] = 1.0
    return out, present

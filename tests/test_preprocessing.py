"""Preprocessing as training and serving call it: real encoded bytes in, model inputs or MediaError out."""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from models.media import MediaError, decode_audio, decode_image, sniff
from models.preprocessing import Features, Preprocessor, collate, mel_filterbank, resample
from models.spec import AudioSpec, ImageSpec, PreprocessSpec, TextSpec
from models.tokenizer import train_tiny_tokenizer
from tests.media import audio_bytes, exif_jpeg_bytes, image_bytes, png_header_bytes, tone

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CORPUS = [
    "The cat sat on the mat.",
    "A dog barked at the mailman in New York.",
    "Paris is the capital of France.",
    "Running runners run quickly through the park.",
] * 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    train_tiny_tokenizer(CORPUS, vocab_size=300).save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def spec():
    return PreprocessSpec(
        text=TextSpec(max_length=12),
        image=ImageSpec(size=32, mean=MEAN, std=STD),
        audio=AudioSpec(max_seconds=1.0),
    )


@pytest.fixture(scope="module")
def pre(spec, run_dir):
    return Preprocessor(spec, run_dir)


def unnormalise(pixels: np.ndarray) -> np.ndarray:
    """[3, H, W] normalised -> [3, H, W] 0..255."""
    return (pixels * np.asarray(STD)[:, None, None] + np.asarray(MEAN)[:, None, None]) * 255


def assert_media_error(exc_info, code: str, status: int):
    assert exc_info.value.code == code
    assert exc_info.value.status == status
    assert str(exc_info.value)


# ------------------------------------------------------------------ images


@pytest.mark.parametrize(
    "fmt, tolerance",
    [("PNG", 0.01), ("BMP", 0.01), ("TIFF", 0.01), ("GIF", 0.01), ("JPEG", 4), ("WEBP", 6)],
)
def test_image_formats_decode_resize_and_normalise(pre, fmt, tolerance):
    data = image_bytes(color=(200, 30, 90), size=(48, 40), fmt=fmt)
    assert sniff(data) == f"image/{fmt.lower()}"
    pixels = pre.image_from_bytes(data)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32
    # normalised red channel of a 200 pixel: (200/255 - 0.485) / 0.229
    if fmt in ("PNG", "BMP", "TIFF"):
        assert pixels[0, 5, 5] == pytest.approx((200 / 255 - 0.485) / 0.229, abs=1e-5)
    np.testing.assert_allclose(unnormalise(pixels)[:, 16, 16], [200, 30, 90], atol=tolerance)


def test_exif_orientation_is_applied(pre):
    stored = np.zeros((20, 40, 3), np.uint8)  # wide as stored: red left half, blue right half
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    data = exif_jpeg_bytes(stored, orientation=6)  # "rotate 90 clockwise to display"
    upright = decode_image(data, max_pixels=10_000)
    assert upright.size == (20, 40)  # now tall
    top, bottom = np.asarray(upright)[2, 10], np.asarray(upright)[37, 10]
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60
    pixels = unnormalise(pre.image_from_bytes(data))
    assert pixels[0, 2, 16] > 200 and pixels[2, 29, 16] > 200


def test_rgba_and_greyscale_become_rgb(pre):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (10, 200, 10, 255)  # opaque green
    rgba[:, 8:] = (0, 0, 0, 0)  # fully transparent: shown over white
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    pixels = unnormalise(pre.image_from_bytes(buf.getvalue()))
    np.testing.assert_allclose(pixels[:, 16, 2], [10, 200, 10], atol=0.01)
    np.testing.assert_allclose(pixels[:, 16, 29], [255, 255, 255], atol=0.01)

    buf = io.BytesIO()
    Image.fromarray(np.full((10, 10), 77, np.uint8), "L").save(buf, format="PNG")
    pixels = unnormalise(pre.image_from_bytes(buf.getvalue()))
    np.testing.assert_allclose(pixels[:, 3, 3], [77, 77, 77], atol=0.01)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(pre):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40_000, np.uint16)).save(buf, format="PNG")
    pixels = unnormalise(pre.image_from_bytes(buf.getvalue()))
    np.testing.assert_allclose(pixels[:, 4, 4], [round(40_000 / 257)] * 3, atol=0.01)


def test_image_from_pil_matches_bytes(pre):
    data = image_bytes(size=(50, 30), pattern=3)
    np.testing.assert_array_equal(pre.image_from_pil(Image.open(io.BytesIO(data))), pre.image_from_bytes(data))


@pytest.mark.parametrize(
    "data",
    [b"just some text, not a picture", b"%PDF-1.7\n1 0 obj << >> endobj\n", audio_bytes(), b""],
    ids=["text", "pdf", "wav", "empty"],
)
def test_non_images_are_unsupported_415(pre, data):
    with pytest.raises(MediaError) as exc_info:
        pre.image_from_bytes(data)
    assert_media_error(exc_info, "unsupported_media_type", 415)


def test_truncated_and_corrupt_images_are_400(pre):
    png = image_bytes(size=(64, 64), pattern=3)
    for data in (png[: len(png) // 2], png[:40], png[:8] + b"\x00" * 100, image_bytes(fmt="JPEG")[:200]):
        with pytest.raises(MediaError) as exc_info:
            pre.image_from_bytes(data)
        assert_media_error(exc_info, "undecodable_media", 400)


def test_decompression_bombs_are_413_before_decoding(spec, run_dir):
    pre = Preprocessor(spec, run_dir)
    with pytest.raises(MediaError) as exc_info:  # header claims 10^10 pixels
        pre.image_from_bytes(png_header_bytes(100_000, 100_000))
    assert_media_error(exc_info, "media_too_large", 413)
    with pytest.raises(MediaError) as exc_info:  # past our limit, under PIL's own
        pre.image_from_bytes(png_header_bytes(8_000, 6_000))
    assert_media_error(exc_info, "media_too_large", 413)
    small_limit = Preprocessor(spec, run_dir, max_image_pixels=1_000)
    with pytest.raises(MediaError) as exc_info:  # a real 48x40 image
        small_limit.image_from_bytes(image_bytes(size=(48, 40)))
    assert_media_error(exc_info, "media_too_large", 413)
    assert "1000" in str(exc_info.value)


# ------------------------------------------------------------------ audio

# Slaney mel: 1000 Hz is exactly 15 mel; 80 filters span 0..45.245 mel (8 kHz) with centres
# at k * 45.245 / 81, so filter index 26 (centre 15.08 mel) holds a 1 kHz tone.
TONE_BIN = 26


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
@pytest.mark.parametrize("rate", [16_000, 44_100])
def test_tone_lands_in_its_mel_bin_at_any_rate_and_format(pre, fmt, rate):
    data = audio_bytes(freq=1000.0, seconds=1.0, sample_rate=rate, fmt=fmt)
    assert sniff(data) == {"WAV": "audio/wav", "FLAC": "audio/flac", "OGG": "audio/ogg"}[fmt]
    features = pre.audio_from_bytes(data)
    assert features.shape == (80, 100) and features.dtype == np.float32
    assert int(features[:, 10:90].mean(axis=1).argmax()) == TONE_BIN


def test_resampling_removes_content_above_the_new_nyquist():
    # 12 kHz is representable at 44.1 kHz but not at 16 kHz: it must vanish, not alias to 4 kHz
    high = tone(12_000.0, seconds=1.0, sample_rate=44_100)
    low = tone(1_000.0, seconds=1.0, sample_rate=44_100)
    kept = resample(low, 44_100, 16_000)
    removed = resample(high, 44_100, 16_000)
    assert len(kept) == 16_000
    rms = lambda x: float(np.sqrt(np.mean(x[500:-500] ** 2)))  # noqa: E731
    assert rms(kept) == pytest.approx(0.3 / np.sqrt(2), rel=1e-3)
    assert rms(removed) < 1e-3 * rms(kept)
    expected = 0.3 * np.sin(2 * np.pi * 1000.0 * np.arange(16_000) / 16_000)
    np.testing.assert_allclose(kept[500:-500], expected[500:-500], atol=1e-4)


def test_stereo_is_mixed_down_not_first_channel(pre):
    mono = pre.audio_from_bytes(audio_bytes(freq=700.0, seconds=1.0))
    stereo = pre.audio_from_bytes(audio_bytes(freq=700.0, seconds=1.0, channels=2))
    np.testing.assert_allclose(stereo, mono, atol=1e-4)
    wave = tone(700.0, seconds=1.0)
    opposite = np.stack([wave, -wave], axis=1)  # the channels cancel out
    silent = pre.audio_from_waveform(opposite, 16_000)
    assert silent.max() - silent.min() < 1e-6
    assert mono.max() - mono.min() == pytest.approx(2.0, abs=1e-4)  # Whisper's 8-decade floor, /4


def test_short_clips_are_padded_and_long_ones_cropped(pre):
    short = pre.audio_from_waveform(tone(1000.0, seconds=0.3), 16_000)
    long = pre.audio_from_waveform(tone(1000.0, seconds=5.0), 16_000)
    assert short.shape == long.shape == (80, 100)
    assert short[:, 40:].max() == pytest.approx(short.min())  # padding is silence (the floor)
    np.testing.assert_allclose(long[:, 5:95], pre.audio_from_waveform(tone(1000.0, seconds=1.0), 16_000)[:, 5:95])


def test_db_log_style_is_peak_normalised(run_dir):
    pre = Preprocessor(PreprocessSpec(audio=AudioSpec(max_seconds=1.0, log_style="db", n_mels=64)), run_dir)
    loud = pre.audio_from_waveform(tone(1000.0, seconds=1.0), 16_000)
    quiet = pre.audio_from_waveform(0.1 * tone(1000.0, seconds=1.0), 16_000)
    assert loud.shape == (64, 100) and loud.dtype == np.float32
    assert loud.max() == pytest.approx(1.0) and loud.min() >= -1.0
    np.testing.assert_allclose(loud, quiet, atol=1e-3)


def test_whisper_features_and_filterbank_match_transformers():
    transformers = pytest.importorskip("transformers")
    extractor = transformers.WhisperFeatureExtractor(
        feature_size=80, sampling_rate=16_000, hop_length=160, chunk_length=1, n_fft=400
    )
    rng = np.random.default_rng(0)
    wave = (tone(440.0, seconds=0.75) + 0.01 * rng.standard_normal(12_000)).astype(np.float32)
    expected = extractor(wave, sampling_rate=16_000, return_tensors="np")["input_features"][0]
    pre = Preprocessor(PreprocessSpec(audio=AudioSpec(max_seconds=1.0)), ".")
    np.testing.assert_allclose(pre.audio_from_waveform(wave, 16_000), expected, atol=1e-4)
    reference = transformers.audio_utils.mel_filter_bank(
        num_frequency_bins=201, num_mel_filters=80, min_frequency=0.0, max_frequency=8000.0,
        sampling_rate=16_000, norm="slaney", mel_scale="slaney",
    )
    np.testing.assert_allclose(mel_filterbank(16_000, 400, 80), reference.T, atol=1e-7)


def test_audio_limits_and_errors(spec, run_dir):
    pre = Preprocessor(spec, run_dir, max_audio_seconds=2.0)
    with pytest.raises(MediaError) as exc_info:
        pre.audio_from_bytes(audio_bytes(seconds=3.0, fmt="FLAC"))
    assert_media_error(exc_info, "media_too_large", 413)
    assert "2 s" in str(exc_info.value)
    assert pre.audio_from_bytes(audio_bytes(seconds=1.9)).shape == (80, 100)
    # the default limit is 60 s even though the model only looks at the first second
    assert Preprocessor(spec, run_dir).max_audio_seconds == 60.0
    for data in (image_bytes(), b"RIFF....AVI LIST", b"plain text"):
        with pytest.raises(MediaError) as exc_info:
            pre.audio_from_bytes(data)
        assert_media_error(exc_info, "unsupported_media_type", 415)
    wav = audio_bytes(seconds=1.0)
    buf = io.BytesIO()
    sf.write(buf, np.zeros((0, 1), np.float32), 16_000, format="WAV")
    for data in (wav[:30], b"fLaC" + b"\x00" * 50, buf.getvalue()):
        with pytest.raises(MediaError) as exc_info:
            pre.audio_from_bytes(data)
        assert_media_error(exc_info, "undecodable_media", 400)


def test_decode_audio_returns_samples_by_channels():
    wave, rate = decode_audio(audio_bytes(seconds=0.5, sample_rate=22_050, channels=2), max_seconds=1.0)
    assert rate == 22_050 and wave.shape == (11_025, 2) and wave.dtype == np.float32


# ------------------------------------------------------------------ text and tokenizer


def test_tokenizer_training_is_deterministic(tmp_path):
    first = train_tiny_tokenizer(CORPUS, vocab_size=120).to_str()
    second = train_tiny_tokenizer(list(reversed(CORPUS)), vocab_size=120).to_str()
    assert first == second
    tokenizer = train_tiny_tokenizer(CORPUS, vocab_size=120)
    assert [tokenizer.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokenizer.get_vocab_size() == 104  # every merge of this small corpus, under the cap
    assert train_tiny_tokenizer(CORPUS, vocab_size=80).get_vocab_size() == 80
    encoding = tokenizer.encode("The CAT sat.")
    assert encoding.tokens == ["[CLS]", "the", "cat", "sat", ".", "[SEP]"]
    assert tokenizer.decode(encoding.ids) == "the cat sat."


def test_encode_text_truncates_without_padding(pre):
    short = pre.encode_text("The cat sat on the mat.")
    assert short.input_ids.dtype == short.attention_mask.dtype == np.int64
    assert short.input_ids[0] == 2 and short.input_ids[-1] == 3  # [CLS] ... [SEP]
    assert short.attention_mask.tolist() == [1] * len(short.input_ids)
    long = pre.encode_text(" ".join(["cat"] * 50))
    assert len(long.input_ids) == 12 and long.input_ids[-1] == 3


def test_encode_words_maps_tokens_to_words(pre):
    features = pre.encode_words(["Paris", "zzyzx", "!"])
    assert features.word_ids[0] is None and features.word_ids[-1] is None
    inner = features.word_ids[1:-1]
    assert inner[0] == 0 and inner[-1] == 2 and sorted(set(inner)) == [0, 1, 2]
    assert inner == sorted(inner)  # "zzyzx" becomes several word pieces of word 1
    assert len(features.input_ids) == len(features.word_ids)


# ------------------------------------------------------------------ collate


def test_collate_pads_text_and_flags_missing_media(pre, spec):
    image = pre.image_from_bytes(image_bytes())
    audio, frames = pre.audio_clip(audio_bytes())
    a = pre.encode_text("The cat sat on the mat.")
    a.pixel_values = image
    b = pre.encode_text("Paris")
    b.audio_features, b.audio_frames = audio, frames
    batch = collate([a, b], ["audio", "text", "image"], spec, pad_id=pre.pad_id)
    assert list(batch) == [
        "input_ids", "attention_mask", "pixel_values", "image_present", "audio_features", "audio_present",
        "audio_frames",
    ]
    n = len(a.input_ids)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, n)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int64
    assert batch["input_ids"][1, len(b.input_ids):].tolist() == [0] * (n - len(b.input_ids))
    assert batch["attention_mask"][1].tolist() == [1] * len(b.input_ids) + [0] * (n - len(b.input_ids))
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["pixel_values"].dtype == np.float32
    assert batch["image_present"].tolist() == [1.0, 0.0] and batch["image_present"].dtype == np.float32
    assert not batch["pixel_values"][1].any()
    assert batch["audio_features"].shape == (2, 80, 100)
    assert batch["audio_present"].tolist() == [0.0, 1.0]
    np.testing.assert_array_equal(batch["audio_features"][1], audio)
    assert batch["audio_frames"].tolist() == [0, frames] and batch["audio_frames"].dtype == np.int64


def test_audio_clip_counts_the_frames_that_cover_the_clip(pre, spec):
    half = pre.audio_clip_from_waveform(np.full(8000, 0.1, np.float32), 16_000)  # 0.5 s of a 1 s window
    assert half.frames == 50 and half.features.shape == (80, 100)
    assert pre.audio_clip_from_waveform(np.full(48_000, 0.1, np.float32), 16_000).frames == 100  # cropped
    assert pre.audio_clip_from_waveform(np.full(8000, 0.1, np.float32), 8_000).frames == 100  # resampled


def test_collate_media_only_model_and_errors(spec):
    batch = collate([Features(), Features(audio_features=np.ones((80, 100), np.float32))], ["audio"], spec)
    assert list(batch) == ["audio_features", "audio_present", "audio_frames"]
    assert batch["audio_present"].tolist() == [0.0, 1.0]
    assert batch["audio_frames"].tolist() == [0, 100]  # features without a count: every frame
    with pytest.raises(ValueError, match="text"):
        collate([Features()], ["text"], spec)
    with pytest.raises(ValueError, match="shape"):
        collate([Features(pixel_values=np.zeros((3, 8, 8), np.float32))], ["image"], spec)



def test_absurd_sample_rates_are_undecodable_not_a_crash(pre):
    # a 5 Hz header made resample() divide by zero (a 500); refuse it like a corrupt header
    for rate in (5, 1_000_000):
        buf = io.BytesIO()
        sf.write(buf, np.zeros((10, 1), np.float32), rate, format="WAV", subtype="PCM_16")
        with pytest.raises(MediaError) as exc_info:
            pre.audio_from_bytes(buf.getvalue())
        assert_media_error(exc_info, "undecodable_media", 400)

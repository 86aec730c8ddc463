"""Data loader: formats, each bad-record case (exact FILE:LINE: reason), --skip-bad counts, targets."""
import json
from pathlib import Path

import numpy as np
import pytest

from models.preprocessing import Preprocessor
from models.spec import AudioSpec, ImageSpec, PreprocessSpec, TextSpec
from models.tokenizer import train_tiny_tokenizer
from tests.media import audio_bytes, image_bytes
from training.data import (
    DataError,
    encode_split,
    label_space,
    make_collate_fn,
    read_dataset,
    read_split,
    vqa_soft_scores,
)

MODALITIES = ["text", "image", "audio"]


def write(directory: Path, name: str, rows: list) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def media_dir(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "red.png").write_bytes(image_bytes())
    (tmp_path / "m" / "tone.wav").write_bytes(audio_bytes(seconds=0.3))
    (tmp_path / "m" / "broken.png").write_bytes(b"this is not a picture at all")
    (tmp_path / "m" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    return tmp_path


def preprocessor(tmp_path: Path, texts) -> Preprocessor:
    train_tiny_tokenizer(texts, vocab_size=200).save(str(tmp_path / "tokenizer.json"))
    spec = PreprocessSpec(text=TextSpec(max_length=16), image=ImageSpec(size=16),
                          audio=AudioSpec(max_seconds=0.5, n_mels=16, n_fft=128, hop_length=80))
    return Preprocessor(spec, tmp_path)


def good(i, **kw):
    return {"id": str(i), "text": f"record {i}", "image": "m/red.png", "audio": "m/tone.wav", "label": "a", **kw}


def error_of(path, task="classify", **kw) -> str:
    with pytest.raises(DataError) as info:
        read_split(path, task, MODALITIES, **kw)
    return str(info.value)


@pytest.mark.parametrize(
    "row, reason",
    [
        ('{"id": 1, "text": "x", ', "invalid JSON: Expecting property name enclosed in double quotes (column 24)"),
        ("[1, 2]", "expected a JSON object, got list"),
        ({"id": "1", "image": None, "label": "a"}, "missing field 'text'"),
        ({"id": "1", "text": "   ", "label": "a"}, "empty text"),
        ({"id": "1", "text": "hello"}, "missing field 'label'"),
        ({"id": "1", "text": 5, "label": "a"}, "field 'text' must be a string, got int"),
        ({"id": "1", "text": "hi", "image": "m/nope.png", "label": "a"}, "image file not found: m/nope.png"),
        ({"id": "1", "text": "hi", "audio": "m/nope.wav", "label": "a"}, "audio file not found: m/nope.wav"),
    ],
)
def test_bad_classify_records(media_dir, row, reason):
    path = write(media_dir, "train.jsonl", [good(0), row])
    assert error_of(path) == f"{path}:2: {reason}"


def test_bad_ner_records(tmp_path):
    rows = [
        {"id": "0", "tokens": ["Ann", "sings"], "tags": ["B-PER", "O"]},
        {"id": "1", "tokens": ["Ann", "sings", "."], "tags": ["B-PER", "O"]},
    ]
    path = write(tmp_path, "train.jsonl", rows)
    assert error_of(path, "ner") == f"{path}:2: 2 tags for 3 tokens"
    path = write(tmp_path, "train.jsonl", [rows[0], {"id": "1", "tokens": ["Ann"], "tags": ["X-PER"]}])
    assert error_of(path, "ner") == f"{path}:2: tag 'X-PER' is not BIO: expected 'O', 'B-TYPE' or 'I-TYPE'"
    path = write(tmp_path, "dev.jsonl", [rows[0], {"id": "1", "tokens": ["Rome"], "tags": ["B-LOC"]}])
    assert error_of(path, "ner", known={"O", "B-PER", "I-PER"}) == f"{path}:2: unknown tag 'B-LOC' (not in train.jsonl)"


def test_unknown_label_in_dev(media_dir):
    write(media_dir, "train.jsonl", [good(0), good(1, label="b")])
    dev = write(media_dir, "dev.jsonl", [good(2), good(3, label="zebra")])
    with pytest.raises(DataError) as info:
        read_dataset(media_dir, "classify", MODALITIES)
    assert str(info.value) == f"{dev}:2: unknown label 'zebra' (not in train.jsonl)"


def test_vqa_needs_image_and_accepts_single_answer(media_dir):
    rows = [{"id": "0", "question": "what?", "image": "m/red.png", "answer": "The Cat"},
            {"id": "1", "question": "what?", "answers": ["dog"]}]
    path = write(media_dir, "train.jsonl", rows)
    assert error_of(path, "vqa") == f"{path}:2: missing field 'image' (VQA needs a picture)"
    records = read_split(path, "vqa", MODALITIES, skip_bad=True)
    assert records[0].target == ["cat"]


@pytest.mark.parametrize("kind, file, start", [
    ("image", "m/broken.png", "image m/broken.png: expected an image"),
    ("audio", "m/broken.wav", "audio m/broken.wav: "),
])
def test_undecodable_media_is_a_bad_record(media_dir, kind, file, start):
    path = write(media_dir, "train.jsonl", [good(0), good(1, **{kind: file})])
    records = read_split(path, "classify", MODALITIES)
    pre = preprocessor(media_dir, ["record one"])
    with pytest.raises(DataError) as info:
        encode_split(records, "classify", MODALITIES, pre, ["a"], False)
    assert str(info.value).startswith(f"{path}:2: {start}")


def test_skip_bad_counts_per_reason(media_dir):
    rows = [good(0), good(1, label="b"), "not json", {"id": "x", "text": "", "label": "a"},
            good(4, image="m/nope.png"), good(5, image="m/broken.png"), good(6, audio="m/broken.wav"), good(7)]
    write(media_dir, "train.jsonl", rows)
    write(media_dir, "dev.jsonl", [good(0), good(1, label="zebra")])
    data = read_dataset(media_dir, "classify", MODALITIES, skip_bad=True)
    assert dict(data.bad["train"].counts) == {"invalid JSON": 1, "empty text": 1, "missing file": 1}
    assert dict(data.bad["dev"].counts) == {"unknown label": 1}
    assert [r.id for r in data.splits["train"]] == ["0", "1", "5", "6", "7"]
    pre = preprocessor(media_dir, data.texts())
    examples = encode_split(data.splits["train"], "classify", MODALITIES, pre, data.labels, False,
                            skip_bad=True, bad=data.bad["train"])
    assert [e.record.id for e in examples] == ["0", "1", "7"]
    assert data.bad["train"].counts["undecodable image"] == 1
    assert data.bad["train"].counts["undecodable audio"] == 1
    assert data.bad["train"].total == 5


def test_media_of_unused_modalities_is_not_checked(media_dir):
    path = write(media_dir, "train.jsonl", [good(0, audio="m/nope.wav")])
    assert len(read_split(path, "classify", ["text", "image"])) == 1


def test_label_spaces():
    from training.data import Record

    r = lambda target: Record(path=Path("x"), line=1, id="", target=target)  # noqa: E731
    assert label_space("classify", [r("b"), r("a"), r("b")]) == (["a", "b"], False)
    assert label_space("classify", [r(["b", "c"]), r("a")]) == (["a", "b", "c"], True)
    assert label_space("ner", [r(["B-PER", "O", "I-LOC"])])[0] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    vocab, _ = label_space("vqa", [r(["cat", "cat", "kitten"]), r(["dog"]), r(["cat"])], top_answers=2)
    assert vocab == ["cat", "dog"]  # cat (2 records), then dog/kitten tie broken alphabetically


def test_vqa_soft_scores():
    scores = vqa_soft_scores(["cat", "cat", "kitten", "cat", "cat"], {"cat": 0, "kitten": 1, "dog": 2})
    assert scores.tolist() == pytest.approx([1.0, 1 / 3, 0.0])


def test_collate_targets(media_dir):
    torch = pytest.importorskip("torch")
    # NER: first sub-token labelled, -100 elsewhere and on padding
    rows = [{"id": "0", "tokens": ["Annabelle", "sings"], "tags": ["B-PER", "O"], "image": "m/red.png"},
            {"id": "1", "tokens": ["Rome"], "tags": ["B-LOC"]}]
    write(media_dir, "train.jsonl", rows)
    write(media_dir, "dev.jsonl", rows[:1])
    data = read_dataset(media_dir, "ner", MODALITIES)
    pre = preprocessor(media_dir, ["ann sings rome"])  # "annabelle" splits into several pieces
    examples = encode_split(data.splits["train"], "ner", MODALITIES, pre, data.labels, False)
    batch = make_collate_fn("ner", MODALITIES, pre.spec, pre.pad_id)(examples)
    labels = batch["labels"]
    assert labels.shape == batch["input_ids"].shape and labels.dtype == torch.long
    index = {t: i for i, t in enumerate(data.labels)}
    word_ids = examples[0].features.word_ids
    expected = [-100] + [index["B-PER"]] + [-100] * (word_ids.count(0) - 1) + [index["O"], -100]
    assert labels[0, : len(expected)].tolist() == expected
    assert labels[1].tolist()[:3] == [-100, index["B-LOC"], -100]
    assert (labels[1, 3:] == -100).all()
    assert batch["image_present"].tolist() == [1.0, 0.0]
    assert batch["audio_present"].tolist() == [0.0, 0.0]


def test_collate_multilabel_and_vqa(media_dir):
    pytest.importorskip("torch")
    rows = [good(0, label=["a", "c"]), good(1, label="b")]
    write(media_dir, "train.jsonl", rows)
    write(media_dir, "dev.jsonl", rows)
    data = read_dataset(media_dir, "classify", MODALITIES)
    assert data.multi_label and data.labels == ["a", "b", "c"]
    pre = preprocessor(media_dir, data.texts())
    examples = encode_split(data.splits["train"], "classify", MODALITIES, pre, data.labels, True)
    batch = make_collate_fn("classify", MODALITIES, pre.spec, pre.pad_id, multi_label=True)(examples)
    assert batch["labels"].tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]

    vqa = [{"id": "0", "question": "what colour?", "image": "m/red.png", "answers": ["Red", "red", "crimson"]}]
    write(media_dir, "train.jsonl", vqa)
    write(media_dir, "dev.jsonl", vqa)
    data = read_dataset(media_dir, "vqa", ["text", "image"])
    examples = encode_split(data.splits["train"], "vqa", ["text", "image"], pre, data.labels, False)
    batch = make_collate_fn("vqa", ["text", "image"], pre.spec, pre.pad_id)(examples)
    assert data.labels == ["crimson", "red"]
    assert batch["labels"].numpy() == pytest.approx(np.array([[1 / 3, 2 / 3]], dtype=np.float32))
    assert "audio_features" not in batch

"""The demo data set: formats, determinism, missing modalities, and the XOR construction."""
import hashlib
import json

import pytest

from training.data import read_dataset


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_layout_and_formats(demo_data_dir):
    for task in ("classify", "ner", "vqa"):
        for split in ("train", "dev", "test"):
            assert (demo_data_dir / task / f"{split}.jsonl").is_file()
    # every record parses and every referenced file exists (read_split checks it)
    for task in ("classify", "ner", "vqa"):
        data = read_dataset(demo_data_dir / task, task, ["text", "image", "audio"])
        assert len(data.splits["train"]) >= 300
        assert 60 <= len(data.splits["dev"]) <= 100
        recs = data.splits["train"]
        assert any(r.image is None for r in recs) or task == "vqa"
        assert any(r.audio is None for r in recs) and any(r.audio is not None for r in recs)


def test_classify_label_is_xor_of_image_and_audio(demo_data_dir):
    rows = _rows(demo_data_dir / "classify" / "train.jsonl")
    assert {r["label"] for r in rows} == {"match", "mismatch"}
    both = [r for r in rows if r["image"] and r["audio"]]
    missing = [r for r in rows if not (r["image"] and r["audio"])]
    assert len(both) > 300 and 10 < len(missing) < 100
    # labels are balanced, so a single modality cannot beat chance
    assert abs(sum(r["label"] == "match" for r in rows) / len(rows) - 0.5) < 0.05


def test_vqa_answers_have_annotators(demo_data_dir):
    rows = _rows(demo_data_dir / "vqa" / "train.jsonl")
    assert all(3 <= len(r["answers"]) <= 5 and r["image"] for r in rows)
    assert any(len(set(r["answers"])) > 1 for r in rows)
    assert {r["question"] for r in rows} >= {"how many circles are there?", "what digit is this?"}


def test_ner_tags_are_bio(demo_data_dir):
    rows = _rows(demo_data_dir / "ner" / "train.jsonl")
    tags = {t for r in rows for t in r["tags"]}
    assert tags == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"}


@pytest.mark.slow
def test_deterministic(demo_data_dir, tmp_path):
    from training.cli import main

    assert main(["demo-data", str(tmp_path / "again")]) == 0

    def digest(root):
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
        return h.hexdigest()

    assert digest(tmp_path / "again") == digest(demo_data_dir)

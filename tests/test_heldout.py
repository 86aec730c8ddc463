"""Held-out task generators (bench/heldout) and the training-quality benchmark (bench/training)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.heldout import TASKS, generate
from training.data import read_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train": 24, "dev": 8, "test": 8}


def _needs(name: str) -> None:
    if name == "speech" and shutil.which("espeak-ng") is None:
        pytest.skip("the speech task needs espeak-ng (apt-get install -y espeak-ng)")


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _texts(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out.append(r.get("text") or r.get("question") or " ".join(r["tokens"]))
    return out


@pytest.mark.parametrize("name", list(TASKS))
def test_generator_writes_valid_deterministic_data(name, tmp_path):
    _needs(name)
    t = TASKS[name]
    a = generate(name, tmp_path / "a", seed=3, sizes=SMALL)
    b = generate(name, tmp_path / "b", seed=3, sizes=SMALL)
    assert _digest(a) == _digest(b)  # same seed -> same bytes
    c = generate(name, tmp_path / "c", seed=4, sizes=SMALL)
    assert _digest(a) != _digest(c)

    ds = read_dataset(a, t.task, list(t.modalities))  # the trainer's own reader accepts every record
    assert {s: len(v) for s, v in ds.splits.items()} == SMALL
    if t.task == "classify":
        assert sorted(ds.labels) == ["match", "mismatch"]
        for split in ("train", "dev", "test"):
            labels = [json.loads(x)["label"] for x in (a / f"{split}.jsonl").read_text().splitlines()]
            assert labels.count("match") == labels.count("mismatch")  # balanced
    if t.task == "vqa":
        assert len(ds.labels) < 20
    if t.task == "ner":
        assert {"B-PER", "B-LOC", "O"} <= set(ds.labels)


@pytest.mark.parametrize("name", list(TASKS))
def test_test_wordings_never_seen_in_training(name):
    """Templates / phrasings of the test split are disjoint from train's (checked on the template sets)."""
    mod = TASKS[name].module
    sets = getattr(mod, "TEMPLATES", None)
    groups = [sets] if sets is not None else list(mod.QUESTIONS.values())
    for g in groups:
        assert g["test"] and not set(g["test"]) & set(g["train"]) and not set(g["dev"]) & set(g["train"])
    if name == "speech":
        assert not set(mod.VOICES["test"]) & set(mod.VOICES["train"])


def test_test_sentences_are_new(tmp_path):
    """On generated data: no test text of `match` appears verbatim in its train split."""
    d = generate("match", tmp_path / "m", seed=0, sizes={"train": 60, "dev": 10, "test": 20})
    assert not set(_texts(d / "test.jsonl")) & set(_texts(d / "train.jsonl"))


def test_cli_writes_tasks(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.heldout", str(tmp_path), "--tasks", "match,vqa",
                        "--sizes", "6,4,4", "--seed", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for name in ("match", "vqa"):
        assert len((tmp_path / name / "test.jsonl").read_text().splitlines()) == 4


def test_speech_without_espeak_names_the_package(monkeypatch, tmp_path):
    from bench.heldout import speech

    monkeypatch.setattr(speech.shutil, "which", lambda _: None)
    with pytest.raises(SystemExit, match="apt-get install -y espeak-ng"):
        generate("speech", tmp_path, sizes=SMALL)


def test_training_benchmark_quick_runs_end_to_end(tmp_path):
    """`python -m bench.training --quick --tasks match`: every variant trains, the table and files are written."""
    prefix = tmp_path / "training"
    r = subprocess.run([sys.executable, "-m", "bench.training", "--quick", "--tasks", "match", "--out", str(prefix)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| match | accuracy |" in r.stdout
    report = json.loads(Path(f"{prefix}.json").read_text())
    variants = {run["variant"] for run in report["runs"]}
    assert variants == {"fused", "best", "text-only", "image-only"}
    for run in report["runs"]:
        assert run["rc"] == 0 and run["epochs"] == 1 and run["sec_per_epoch"] is not None
        assert 0.0 <= run["test"] <= 1.0
    assert "| match |" in Path(f"{prefix}.md").read_text()

    # --collect reports the same finished run directories without training, flags read back from them
    again = tmp_path / "collected"
    r = subprocess.run([sys.executable, "-m", "bench.training", "--quick", "--collect", "--tasks", "match",
                        "--out", str(again)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    collected = {run["variant"]: run for run in json.loads(Path(f"{again}.json").read_text())["runs"]}
    assert set(collected) == variants
    for run in report["runs"]:
        assert collected[run["variant"]]["test"] == run["test"]
    assert "--freeze-encoders" in collected["best"]["flags"] and collected["fused"]["flags"] == ["--epochs", "1"]

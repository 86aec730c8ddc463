"""`mmserve demo-model` end to end on tiny encoders: build, skip when valid, rebuild what is broken, serve.

The real demo (pretrained encoders) runs the same code with bigger settings; here every encoder is
the small random-init one and each run sees 64 records, so the whole file takes well under a minute.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from training.demo_model import DEMO_MODELS, METRICS_JSON, METRICS_MD, build_demo, check_repository

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def demo_repo(demo_data_dir, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("demo-repo")
    out = io.StringIO()
    result = build_demo(repo, tmp_path_factory.mktemp("demo-work"), encoders="tiny", max_train_samples=64,
                        data_dir=demo_data_dir, out=out)
    assert result.built == ["classify", "ner", "vqa"], out.getvalue()
    return repo


def _manifest_times(repo: Path) -> dict[str, int]:
    return {name: (repo / name / "1" / "manifest.json").stat().st_mtime_ns for name in DEMO_MODELS.values()}


def test_build_writes_three_valid_models_and_metrics(demo_repo):
    assert check_repository(demo_repo) == {"classify": [], "ner": [], "vqa": []}
    assert sorted(p.name for p in demo_repo.iterdir()) == sorted([*DEMO_MODELS.values(), METRICS_JSON, METRICS_MD])
    metrics = json.loads((demo_repo / METRICS_JSON).read_text())
    assert set(metrics["models"]) == {*DEMO_MODELS.values(), "baseline text-only", "baseline image-only",
                                      "baseline audio-only"}
    for entry in metrics["models"].values():
        assert entry["test"] and entry["metric"] in entry["test"]
    assert "| demo-classify | classify | text+image+audio |" in (demo_repo / METRICS_MD).read_text()


def test_valid_models_are_kept(demo_repo, tmp_path):
    before = _manifest_times(demo_repo)
    out = io.StringIO()
    result = build_demo(demo_repo, tmp_path / "unused-work", encoders="tiny", max_train_samples=64, out=out)
    assert result.built == []
    assert "nothing to build" in out.getvalue()
    assert not (tmp_path / "unused-work").exists()  # no data written, nothing trained
    assert _manifest_times(demo_repo) == before


def test_corrupt_file_rebuilds_only_that_model(demo_repo, demo_data_dir, tmp_path):
    before = _manifest_times(demo_repo)
    onnx_file = demo_repo / "demo-ner" / "1" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    assert any("sha256 mismatch" in p for p in check_repository(demo_repo)["ner"])

    result = build_demo(demo_repo, tmp_path / "work", encoders="tiny", max_train_samples=64,
                        data_dir=demo_data_dir, out=io.StringIO())
    assert result.built == ["ner"]
    assert check_repository(demo_repo) == {"classify": [], "ner": [], "vqa": []}
    after = _manifest_times(demo_repo)
    assert after["demo-classify"] == before["demo-classify"] and after["demo-vqa"] == before["demo-vqa"]
    assert after["demo-ner"] != before["demo-ner"]
    assert not any(p.name.startswith(".") for p in demo_repo.iterdir())  # no staging or old copies left
    # the baselines of the earlier build are still in the table
    assert "baseline audio-only" in json.loads((demo_repo / METRICS_JSON).read_text())["models"]


def test_app_serves_the_demo_models_with_the_example_files(demo_repo):
    from tests.test_app_api import make_client, wait_ready

    cat, chirp = (EXAMPLES / "cat.jpg").read_bytes(), (EXAMPLES / "chirp.wav").read_bytes()
    with make_client(demo_repo, device="cpu") as client:
        body = wait_ready(client, timeout=120)
        assert body["models"] == {name: "ready" for name in DEMO_MODELS.values()}, body
        r = client.post("/v1/classify", data={"text": "Clip recorded in the garden.", "top_k": "2"},
                        files={"image": ("cat.jpg", cat, "image/jpeg"), "audio": ("chirp.wav", chirp, "audio/wav")})
        assert r.status_code == 200, r.text
        assert {x["label"] for x in r.json()["predictions"]} == {"match", "mismatch"}
        r = client.post("/v1/ner", data={"text": "Alice Smith flew to Paris ."})
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["entities"], list)
        r = client.post("/v1/vqa", data={"question": "what is in the picture?"},
                        files={"image": ("cat.jpg", cat, "image/jpeg")})
        assert r.status_code == 200, r.text
        assert r.json()["answers"]


def test_example_media_are_small():
    sizes = {p.name: p.stat().st_size for p in EXAMPLES.iterdir() if p.suffix in (".jpg", ".png", ".wav")}
    assert {"cat.jpg", "chirp.wav"} <= set(sizes)
    for name, size in sizes.items():
        assert size < (64_000 if name.endswith(".wav") else 30_000), (name, size)

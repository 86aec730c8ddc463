"""The front-end ceiling bench (bench/frontend.py) and its no-op model (bench/noop.py).

The no-op model over the app tests' hand-built models (no torch): it passes the loader's checks and answers zeros
of the output's shape for a batch collated from real preprocessing. Then `python -m bench.frontend --quick` end to
end on the bench's tiny model: a row per worker count, requests answered, no errors. Never asserts a timing
(2 shared cores).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.frontend import add_scaling, fitting, what_limits
from bench.noop import noop_graph, write_noop
from models.manifest import hash_directory, read_manifest, verify_files
from models.preprocessing import Preprocessor, collate
from tests.fixtures_app import build_model
from tests.media import audio_bytes, image_bytes

ROOT = Path(__file__).resolve().parent.parent


def features(pre: Preprocessor, text: str, image: bytes | None, audio: bytes | None):
    f = pre.encode_text(text)
    if image is not None:
        f.pixel_values = pre.image_from_bytes(image)
    if audio is not None:
        clip = pre.audio_clip(audio)
        f.audio_features, f.audio_frames = clip.features, clip.frames
    return f


@pytest.mark.parametrize("name, shape", [("tiny-classify", (3, 3)), ("tiny-ner", (3, "sequence", 5))])
def test_the_noop_model_loads_and_answers_zeros_of_the_output_shape(tmp_path, name, shape):
    from app.runtime import create_runtime

    source = build_model(tmp_path / "src", name)
    target = write_noop(source, tmp_path / "repo")
    assert target == tmp_path / "repo" / f"noop-{read_manifest(source).task}" / "1"
    manifest = read_manifest(target)
    src = read_manifest(source)
    assert verify_files(target, manifest) == []  # every file hashed, as the loader checks
    assert manifest.inputs == src.inputs and manifest.outputs == src.outputs and manifest.labels == src.labels
    assert manifest.preprocessing == src.preprocessing and set(manifest.files) == set(src.files)
    assert manifest.formats["onnx"].size_bytes == (target / "model.onnx").stat().st_size < 2000
    assert manifest.parity == []

    runtime = create_runtime("onnx", target, manifest, "cpu", 1, 1, False)
    assert sorted(runtime.input_names) == sorted(t.name for t in manifest.inputs)
    pre = Preprocessor(manifest.preprocessing, target)
    media = "image" in manifest.modality_names, "audio" in manifest.modality_names
    items = [features(pre, "alice flew from paris to berlin and back again", image_bytes() if media[0] else None,
                      audio_bytes() if media[1] else None),
             features(pre, "bob", None, None),
             features(pre, "a red square", image_bytes(fmt="JPEG") if media[0] else None, None)]
    feeds = collate(items, manifest.modality_names, manifest.preprocessing, pad_id=pre.pad_id)
    logits = runtime.run(feeds)
    expected = tuple(feeds["input_ids"].shape[1] if d == "sequence" else d for d in shape)
    assert logits.dtype == np.float32 and logits.shape == expected and not logits.any()


def test_a_torchscript_only_source_gives_an_onnx_noop_model_without_its_model_pt(tmp_path):
    """The offline device image exports the tiny model to TorchScript alone: the no-op model is ONNX all the same."""
    source = build_model(tmp_path / "src", "tiny-classify")
    (source / "model.onnx").rename(source / "model.pt")
    src = read_manifest(source)
    fmt = src.formats["onnx"].model_copy(update={"file": "model.pt", "opset": None})
    src.model_copy(update={"formats": {"torchscript": fmt}, "files": hash_directory(source)}).dump(source)
    target = write_noop(source, tmp_path / "repo")
    manifest = read_manifest(target)
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "model.onnx", "tokenizer.json"]
    assert list(manifest.formats) == ["onnx"] and verify_files(target, manifest) == []


def test_the_noop_graph_refuses_an_output_axis_no_input_has(tmp_path):
    manifest = read_manifest(build_model(tmp_path, "tiny-classify"))
    manifest.outputs[0].shape = ["batch", "words"]
    with pytest.raises(ValueError, match="'words'"):
        noop_graph(manifest)


def test_worker_counts_above_the_server_cores_are_skipped_with_the_reason():
    keep, skipped = fitting([1, 2, 4, 8], {4, 5, 6, 7})
    assert keep == [1, 2, 4] and len(skipped) == 1 and skipped[0].startswith("8 workers: only 4 server core(s)")


def test_scaling_is_against_one_worker_and_the_limit_names_the_saturated_side():
    base = dict(error_kinds={}, p50_ms=1.0, p99_ms=2.0, server_cpu_ms_per_req=2.0, engine_cpu_pct=None, connections=64,
                client_cpu_pct_busiest=20.0, connections_per_frontend=[16])
    points = [{**base, "workers": 1, "throughput": 400.0, "server_cpu_pct": 99.0, "frontend_cpu_pct_mean": 99.0,
               "frontend_cpu_pct_max": 99.0},
              {**base, "workers": 4, "throughput": 1200.0, "server_cpu_pct": 250.0, "engine_cpu_pct": 40.0,
               "frontend_cpu_pct_mean": 50.0, "frontend_cpu_pct_max": 97.0, "connections_per_frontend": [0, 2, 4, 58]},
              {"workers": 8, "error": "RuntimeError: boom"}]
    add_scaling(points)
    assert (points[1]["per_worker"], points[1]["scaling"], points[1]["efficiency"]) == (300.0, 3.0, 0.75)
    assert "error" in points[2] and "scaling" not in points[2]
    assert what_limits(points[0], 12).startswith("the front-ends' CPU")
    uneven = what_limits(points[1], 12)
    assert uneven.startswith("the busiest front-end") and "(0, 2, 4, 58)" in uneven
    assert what_limits({**points[1], "server_cpu_pct": 1150.0}, 12).startswith("the server's 12 core(s)")
    assert what_limits({**points[1], "client_cpu_pct_busiest": 95.0}, 12).startswith("the load generator")
    assert what_limits({**points[1], "engine_cpu_pct": 92.0}, 12).startswith("the engine process")
    assert what_limits({**points[1], "frontend_cpu_pct_max": 60.0}, 12).startswith("no process saturated")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two workers need two server cores")
def test_bench_frontend_quick_end_to_end(tmp_path):
    for mod in ("psutil", "torch"):  # torch: building the bench's tiny model trains and exports it
        pytest.importorskip(mod)
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))[:2]))
    cmd = [sys.executable, "-m", "bench.frontend", "--quick", "--name", "f", "--out-dir", str(tmp_path),
           "--server-cpus", cores, "--client-cpus", cores]  # on 2 cores: the server gets both, the client shares them
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["meta"]["model"] == "noop-classify" and report["skipped"] == []
    assert [p["workers"] for p in report["points"]] == [1, 2]
    for p in report["points"]:
        assert "error" not in p, p
        assert p["ok"] > 0 and p["throughput"] > 0 and p["errors"] == 0, p
        assert p["p99_ms"] >= p["p50_ms"] > 0 and p["server_cpu_ms_per_req"] > 0 and p["limit"]
        assert len(p["connections_per_frontend"]) == p["workers"]  # sampled half-way: every front-end counted
        assert 0 < sum(p["connections_per_frontend"]) <= p["connections"]
    assert report["points"][1]["engine_cpu_pct"] is not None and report["points"][0]["scaling"] == 1.0
    md = (tmp_path / "f.md").read_text()
    assert "| 1 | 8 |" in md and "| 2 | 16 |" in md and report["summary"] in md

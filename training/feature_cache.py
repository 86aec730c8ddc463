"""Frozen encoders run once: their outputs for a split, cached on disk and reused across epochs and runs.

A frozen encoder in eval mode is a pure function of its weights and its inputs, so its outputs for
the training set are the same every epoch. Computing them once turns an epoch of a frozen
EfficientNet or Whisper encoder (most of the work on a CPU) into a few matrix products.

Key: sha256 of the encoder's weights, the modality's preprocessing spec and the preprocessed input
arrays of the split (which follow from the data files and the spec): any change to the weights,
the spec or a record's file gives a new key; a stale entry is never read. Entries are directories
`CACHE_DIR/features/<key>/` with `sequence.npy` float32 [N, T, D], `mask.npy` bool [N, T] and
`pooled.npy` float32 [N, D], written to a temporary directory and renamed into place, read back
memory-mapped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

FILES = ("sequence", "mask", "pooled")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MMSERVE_CACHE_DIR") or Path.home() / ".cache" / "mmserve")


def weights_digest(module) -> str:
    """sha256 over the module's state dict (names, shapes, dtypes and bytes)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def inputs_digest(batches: Sequence[dict[str, np.ndarray]], names: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for name in names:
            array = np.ascontiguousarray(batch[name])
            digest.update(f"{name}:{array.shape}:{array.dtype}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass
class CachedFeatures:
    """One split's encoder outputs, row i = example i of the split."""

    sequence: np.ndarray  # float32 [N, T, D]
    mask: np.ndarray  # bool [N, T]
    pooled: np.ndarray  # float32 [N, D]

    def rows(self, index: Sequence[int], length: int | None = None):
        """EncoderOutput of torch tensors for the given rows; `length` cuts the token axis (text padding)."""
        import torch

        from models.encoders import EncoderOutput

        index = np.asarray(index)
        sequence, mask = self.sequence[index], self.mask[index]
        if length is not None:
            sequence, mask = sequence[:, :length], mask[:, :length]
        return EncoderOutput(torch.from_numpy(np.ascontiguousarray(sequence)),
                             torch.from_numpy(np.ascontiguousarray(mask)),
                             torch.from_numpy(np.ascontiguousarray(self.pooled[index])))


def _load(directory: Path) -> CachedFeatures:
    return CachedFeatures(*(np.load(directory / f"{name}.npy", mmap_mode="r") for name in FILES))


def encoder_features(
    encoder,
    batches: Sequence[dict[str, np.ndarray]],
    input_names: Sequence[str],
    call: Callable[[dict[str, np.ndarray]], object],
    *,
    key_parts: dict,
    cache_dir: Path | None,
) -> tuple[CachedFeatures, bool]:
    """Outputs of `encoder` over `batches` (the split in order), from the cache when present.

    call(batch) -> EncoderOutput runs the encoder on one batch (no grad, eval mode).
    Returns (features, hit). cache_dir None: computed in memory, nothing written.
    """
    key = hashlib.sha256(json.dumps({**key_parts, "weights": weights_digest(encoder),
                                     "inputs": inputs_digest(batches, input_names)},
                                    sort_keys=True).encode()).hexdigest()[:32]
    final = Path(cache_dir) / "features" / key if cache_dir else None
    if final is not None and all((final / f"{n}.npy").is_file() for n in FILES):
        return _load(final), True
    parts = [call(batch) for batch in batches]
    longest = max(p.sequence.shape[1] for p in parts)

    def padded(tensors, fill):
        out = []
        for t in tensors:
            a = t.detach().float().cpu().numpy() if t.dtype.is_floating_point else t.detach().cpu().numpy()
            pad = [(0, 0)] * a.ndim
            pad[1] = (0, longest - a.shape[1])
            out.append(np.pad(a, pad, constant_values=fill))
        return np.concatenate(out)

    features = CachedFeatures(padded([p.sequence for p in parts], 0.0), padded([p.mask for p in parts], False),
                              np.concatenate([p.pooled.detach().float().cpu().numpy() for p in parts]))
    if final is None:
        return features, False
    tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        for name in FILES:
            np.save(tmp / f"{name}.npy", getattr(features, name))
        if final.exists():  # another run wrote the same entry meanwhile: identical content
            shutil.rmtree(tmp)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load(final), False

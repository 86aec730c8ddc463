"""The tensor contract: the exported graph's inputs and output, named once (docs/architecture.md).

Training (`models/fused.py`), preprocessing (`models/preprocessing.collate`), export, parity and
`mmserve validate` all take the names, order, dtypes and dynamic axes from here. No torch, no numpy.

Adding an input is one line in `INPUTS` (at its place in the contract order); then the code that
produces it (`collate`) and consumes it (`FusedModel.forward`, a keyword argument of the same
name). Export, the manifest's tensor specs, parity masking and validation follow from the table:
an input of a media modality is zeroed when that modality is absent, an input with `sequence` has
the dynamic axes [batch, sequence], every other input [batch, ...fixed].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from models.spec import MODALITIES

DType = Literal["int64", "float32"]

# The names, for code that builds or reads one particular tensor.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
PIXEL_VALUES = "pixel_values"
IMAGE_PRESENT = "image_present"
AUDIO_FEATURES = "audio_features"
AUDIO_PRESENT = "audio_present"
AUDIO_FRAMES = "audio_frames"
LOGITS = "logits"

BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"


@dataclass(frozen=True)
class ContractInput:
    name: str
    modality: str  # one of models.spec.MODALITIES
    dtype: DType
    sequence: bool = False  # axis 1 is the dynamic "sequence" axis (text tokens)
    presence: bool = False  # the float32 [batch] flag saying whether the record has this modality


# Grouped by modality; the contract order is by modality (models.spec.MODALITIES), then as listed.
INPUTS: tuple[ContractInput, ...] = (
    ContractInput(INPUT_IDS, "text", "int64", sequence=True),  # [B, T] token ids, padded
    ContractInput(ATTENTION_MASK, "text", "int64", sequence=True),  # [B, T] 1 real token, 0 padding
    ContractInput(PIXEL_VALUES, "image", "float32"),  # [B, 3, H, W] normalised, zeros when absent
    ContractInput(IMAGE_PRESENT, "image", "float32", presence=True),  # [B] 1.0 / 0.0
    ContractInput(AUDIO_FEATURES, "audio", "float32"),  # [B, n_mels, frames] log-mel, zeros when absent
    ContractInput(AUDIO_PRESENT, "audio", "float32", presence=True),  # [B] 1.0 / 0.0
    ContractInput(AUDIO_FRAMES, "audio", "int64"),  # [B] log-mel frames covering the clip (the rest is padding)
)

BY_NAME: dict[str, ContractInput] = {i.name: i for i in INPUTS}
SEQUENCE_INPUTS: frozenset[str] = frozenset(i.name for i in INPUTS if i.sequence)
# media modalities (those with a presence flag; text is always present when the model uses it)
PRESENCE: dict[str, str] = {i.modality: i.name for i in INPUTS if i.presence}


def inputs_of(modality: str) -> tuple[str, ...]:
    """The input names of one modality, in contract order."""
    return tuple(i.name for i in INPUTS if i.modality == modality)


def input_names(modalities: Sequence[str]) -> list[str]:
    """The graph inputs of a model using `modalities` (any order), in contract order."""
    return [name for m in MODALITIES if m in modalities for name in inputs_of(m)]


def dynamic_axes(name: str) -> dict[int, str]:
    """{axis: axis name} of an input's dynamic axes (the other axes are fixed by the spec)."""
    return {0: BATCH_AXIS, 1: SEQUENCE_AXIS} if name in SEQUENCE_INPUTS else {0: BATCH_AXIS}


def output_axes(task: str) -> dict[int, str]:
    """Dynamic axes of `logits`: [batch, num_labels], or [batch, sequence, num_labels] for NER."""
    return {0: BATCH_AXIS, 1: SEQUENCE_AXIS} if task == "ner" else {0: BATCH_AXIS}


def batch_size(batch: dict) -> int:
    """Rows in a contract batch (any mapping of name -> array)."""
    return int(next(iter(batch.values())).shape[0])


def sequence_length(batch: dict) -> int | None:
    """Padded token length of a contract batch, None when it has no sequence input."""
    name = next((n for n in batch if n in SEQUENCE_INPUTS), None)
    return None if name is None else int(batch[name].shape[1])

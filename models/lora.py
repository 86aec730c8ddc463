"""LoRA on the text encoder of a fused model (peft), and merging it back for export."""
from __future__ import annotations

from torch import nn

from models.fused import FusedModel
from models.spec import LoraSpec

TRAINABLE_WITH_LORA = ("fusion", "head")


def apply_lora(model: FusedModel, spec: LoraSpec) -> nn.Module:
    """A peft `PeftModel`: LoRA adapters on the modules matching `spec.target_modules` (a regex over
    module names, by default the text encoder's query/value). Adapters, fusion and head train;
    everything else is frozen.

    Fusion and head are un-frozen in place rather than listed in `modules_to_save`: that keeps one
    copy of them and plain state-dict keys. Forward takes the contract keyword args; state-dict
    keys gain the prefix `base_model.model.`.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules)
    peft_model = get_peft_model(model, config)
    for name in TRAINABLE_WITH_LORA:
        getattr(model, name).requires_grad_(True)
    return peft_model


def merge_lora(model: nn.Module) -> FusedModel:
    """Fold the adapters into the base weights; returns the plain FusedModel (exportable)."""
    return model.merge_and_unload()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

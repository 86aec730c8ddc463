"""What trains, at which learning rate: the fine-tuning recipe, decided once per run and printed.

A user who changes nothing should get close to the best this model family can do on their task,
so the defaults depend on what each encoder is and how much data there is:

  encoder            strategy full (default)                          LoRA          --freeze-encoders
  tiny (random init) trains at `lr` (frozen random features are useless) trains at lr  frozen
  pretrained text    trains at 3e-5 (BERT fine-tuning range 2e-5..5e-5)   adapters only frozen
  pretrained image   trains at 1e-4 with BatchNorm statistics frozen      frozen        frozen
  pretrained audio   small data: frozen (features cached);               frozen        frozen
                     else trains at 3e-5

Why: a pretrained encoder trained at the head's learning rate (1e-3) forgets what it knew
within an epoch (measured: chance-level accuracy on a new task, where a frozen encoder gets
0.99). An image encoder trains: pooled ImageNet features keep little of the colour, count and
position that users' questions are about (a linear probe on frozen EfficientNet features read a
shape's colour at 0.24-0.64 depending on depth), and fine-tuning it at 1e-4 recovered them. On a
few thousand clips a frozen pretrained speech encoder generalises well (0.82 on a held-out spoken-
word task once padding is masked) and makes epochs ~10x cheaper (its features are computed once);
`--media-encoders train|freeze` overrides both. A pretrained CNN that trains keeps its BatchNorm
running statistics (eval mode): batches of 8-32 with zero images for absent media would
otherwise replace ImageNet statistics with noisy ones.

`--encoder-lr` sets one learning rate for every trained pretrained encoder instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from training.config import TrainConfig

ENCODERS = ("text", "image", "audio")
# pretrained-encoder learning rates per modality (full fine-tuning)
FAMILY_LR = {"text": 3e-5, "image": 1e-4, "audio": 3e-5}
# below this many training records a pretrained audio encoder stays frozen under "auto"
SMALL_DATA = 5000
# the default schedule: about this many optimiser steps, within these epochs
TARGET_STEPS, MIN_EPOCHS, MAX_EPOCHS = 300, 10, 40


@dataclass(frozen=True)
class EncoderPlan:
    trains: bool  # its own weights
    lr: float | None  # learning rate of its weights when it trains
    why: str
    adapters: bool = False  # LoRA adapters inside it train (at `lr`) while its weights stay frozen


@dataclass(frozen=True)
class Recipe:
    encoders: dict[str, EncoderPlan]  # for the modalities the model uses
    epochs: int = 10
    patience: int = 3  # 0: no early stopping
    schedule_why: str = ""

    def frozen(self) -> list[str]:
        """Modalities whose encoder is fixed during training (outputs cacheable)."""
        return [m for m, plan in self.encoders.items() if not plan.trains and not plan.adapters]

    def describe(self) -> list[str]:
        lines = []
        for m, plan in self.encoders.items():
            state = f"trains at lr {plan.lr:g}" if plan.trains else "frozen, LoRA adapters train" if plan.adapters else "frozen"
            lines.append(f"{m} encoder: {state} ({plan.why})")
        lines.append(f"schedule: up to {self.epochs} epochs, early stopping after {self.patience or 'no'} epochs "
                     f"without dev improvement ({self.schedule_why})")
        return lines


def encoder_name(config: TrainConfig, modality: str) -> str:
    return {"text": config.text_encoder, "image": config.image_encoder, "audio": config.audio_encoder}[modality]


def choose_recipe(config: TrainConfig, num_train: int) -> Recipe:
    plans = {}
    for m in config.modalities:
        name = encoder_name(config, m)
        pretrained = name != "tiny"
        slow_lr = config.encoder_lr if config.encoder_lr is not None else FAMILY_LR[m]
        if config.freeze_encoders:
            plans[m] = EncoderPlan(False, None, "--freeze-encoders")
        elif m == "text" and config.peft == "lora":
            plans[m] = EncoderPlan(False, None, "--peft lora", adapters=True)
        elif not pretrained:
            plans[m] = EncoderPlan(True, config.lr, "randomly initialised: must learn")
        elif m == "text":
            why = "--encoder-lr" if config.encoder_lr is not None else "pretrained BERT-family fine-tuning rate"
            plans[m] = EncoderPlan(True, slow_lr, why)
        elif config.peft == "lora":
            plans[m] = EncoderPlan(False, None, "LoRA run: pretrained media encoders stay frozen")
        elif config.media_encoders == "freeze":
            plans[m] = EncoderPlan(False, None, "--media-encoders freeze")
        elif config.media_encoders == "train":
            plans[m] = EncoderPlan(True, slow_lr, "--media-encoders train")
        elif m == "image":
            plans[m] = EncoderPlan(True, slow_lr, "pooled ImageNet features keep little of colour, count and place "
                                                  "(measured: a linear probe reads colour at 0.52); fine-tuning at a "
                                                  "low rate recovers them; --media-encoders freeze for speed")
        elif num_train < SMALL_DATA:
            plans[m] = EncoderPlan(False, None, f"{num_train} training records < {SMALL_DATA}: pretrained speech "
                                                "features generalise better frozen on small data (features cached); "
                                                "--media-encoders train overrides")
        else:
            plans[m] = EncoderPlan(True, slow_lr, f"{num_train} training records >= {SMALL_DATA}")
    epochs, patience, why = schedule(config, num_train)
    return Recipe(plans, epochs, patience, why)


def schedule(config: TrainConfig, num_train: int) -> tuple[int, int, str]:
    """(epochs, patience, why). Small data sets give few steps per epoch: a fixed 10 epochs of 400 records
    at batch 32 is 130 steps, which stopped every model on the held-out tasks while still improving."""
    steps_per_epoch = max(1, -(-num_train // config.batch_size))
    if config.epochs is not None:
        epochs, why = config.epochs, "--epochs"
    else:
        epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, -(-TARGET_STEPS // steps_per_epoch)))
        why = f"{steps_per_epoch} steps per epoch: {epochs} epochs for about {TARGET_STEPS} steps"
    patience = config.patience if config.patience is not None else max(3, epochs // 4)
    return epochs, patience, why


def encoder_of(parameter_name: str) -> str | None:
    for kind in ENCODERS:
        if f"{kind}_encoder" in parameter_name:
            return kind
    return None


def apply_recipe(model, recipe: Recipe) -> None:
    """requires_grad per the recipe (after apply_lora, if any: adapters always train)."""
    for name, param in model.named_parameters():
        kind = encoder_of(name)
        if kind is None or kind not in recipe.encoders:
            continue
        param.requires_grad_(recipe.encoders[kind].trains or "lora_" in name)


def parameter_groups(model, recipe: Recipe, config: TrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on biases / norm weights (1-d tensors); each trained encoder at its
    recipe's learning rate, LoRA adapters, fusion and head at `lr`."""
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = encoder_of(name)
        lr = config.lr
        if kind is not None and "lora_" not in name and recipe.encoders[kind].lr is not None:
            lr = recipe.encoders[kind].lr
        decay = param.ndim > 1 and "norm" not in name.lower() and "embeddings.LayerNorm" not in name
        groups.setdefault((decay, lr), []).append(param)
    return [{"params": params, "weight_decay": config.weight_decay if decay else 0.0, "lr": lr}
            for (decay, lr), params in sorted(groups.items())]


def set_train_mode(model) -> None:
    """model.train(), except what must keep inference behaviour while the rest trains:
    a fully frozen encoder stays in eval mode (its dropout off, its features cacheable, its
    BatchNorm on the pretrained running statistics that eval and export use), and every
    BatchNorm of a pretrained CNN that trains keeps its running statistics too (see module doc)."""
    from torch import nn

    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("text_encoder", "image_encoder", "audio_encoder"):
        encoder = getattr(base, name, None)
        if encoder is None:
            continue
        if not any(p.requires_grad for p in encoder.parameters()):
            encoder.eval()
            continue
        for module in encoder.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

"""`mmserve train`: fine-tune a fused text + image + audio model, top to bottom.

    1. seed everything (Python, numpy, torch, DataLoader shuffling); deterministic algorithms
    2. read and check the data (bad records fail fast as FILE:LINE: reason, or --skip-bad)
    3. label space from train.jsonl; tokenizer over the training texts; preprocessing spec
    4. preprocess every record once (tokenise, decode + resize images, log-mel audio) in memory
    5. build the model; LoRA or freezing; print trainable vs total parameters
    6. AdamW (no weight decay on biases and norm weights), linear warm-up then linear decay,
       gradient clipping; one progress bar per epoch on stderr with the live loss
    7. after each epoch: dev metrics, metrics.jsonl line, checkpoint/ for --resume, best weights
       kept in model.safetensors; early stopping after `patience` epochs without improvement
    8. best weights reloaded: eval_dev.json and eval_test.json (when test.jsonl exists)

Fine-tuning strategies (what trains):
  full (default)          everything
  --freeze-encoders       linear probing: all three encoders frozen; projections, fusion, head train
  --peft lora             LoRA adapters on the modules matching --lora-targets (BERT query/value
                          of the text encoder by default), every other text-encoder weight frozen;
                          a *pretrained* image/audio encoder stays frozen (speed; EfficientNet's
                          conv layers take no LoRA), a *tiny* one (random init) trains fully,
                          since frozen random features would be useless; fusion and head train.
  --encoder-lr            a separate (usually lower) learning rate for pretrained encoders.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.config import ConfigError, TrainConfig
from training.data import BadRecords, DataError, encode_split, make_collate_fn, read_dataset

ENCODERS = ("text", "image", "audio")


@dataclass
class RunResult:
    run_dir: Path
    metric_name: str
    best_metric: float
    best_epoch: int
    epochs_run: int
    dev: dict[str, float]
    test: dict[str, float] | None
    trainable_params: int
    total_params: int
    seconds: float
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def _encoder_of(name: str) -> str | None:
    for kind in ENCODERS:
        if f"{kind}_encoder" in name:
            return kind
    return None


def configure_trainable(model, config: TrainConfig) -> None:
    """Apply the fine-tuning strategy in the module docstring (after apply_lora, if any)."""
    encoder_names = {"text": config.text_encoder, "image": config.image_encoder, "audio": config.audio_encoder}
    for name, param in model.named_parameters():
        kind = _encoder_of(name)
        if kind is None:
            continue
        if config.freeze_encoders:
            param.requires_grad_(False)
        elif config.peft == "lora" and kind in ("image", "audio") and "lora_" not in name:
            # tiny (random-init) encoders train fully, pretrained ones stay frozen
            param.requires_grad_(encoder_names[kind] == "tiny")


def keep_frozen_encoders_in_eval(model) -> None:
    """A fully frozen encoder stays in eval mode while the rest trains: its BatchNorm keeps the
    pretrained running statistics that eval and export use (batch statistics would also mix in the
    all-zero media of records without that modality), and its dropout stays off."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("text_encoder", "image_encoder", "audio_encoder"):
        encoder = getattr(base, name, None)
        if encoder is not None and not any(p.requires_grad for p in encoder.parameters()):
            encoder.eval()


def parameter_groups(model, config: TrainConfig) -> list[dict]:
    """AdamW groups: no decay on biases / norm weights (1-d tensors); encoder_lr for pretrained encoders."""
    pretrained = {"text": config.text_encoder != "tiny", "image": config.image_encoder != "tiny",
                  "audio": config.audio_encoder != "tiny"}
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = _encoder_of(name)
        slow = config.encoder_lr is not None and kind is not None and pretrained[kind] and "lora_" not in name
        decay = param.ndim > 1 and "norm" not in name.lower() and "embeddings.LayerNorm" not in name
        groups.setdefault((decay, slow), []).append(param)
    return [
        {"params": params, "weight_decay": config.weight_decay if decay else 0.0,
         "lr": config.encoder_lr if slow else config.lr}
        for (decay, slow), params in sorted(groups.items())
    ]


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    import torch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def compute_loss(task: str, multi_label: bool, logits, labels):
    from models.heads import classification_loss, token_loss, vqa_loss

    if task == "classify":
        return classification_loss(logits, labels, multi_label)
    if task == "ner":
        return token_loss(logits, labels)
    return vqa_loss(logits, labels)


def _log(message: str) -> None:
    print(message, flush=True)


def _report_skipped(bad: dict[str, BadRecords]) -> dict[str, dict[str, int]]:
    out = {}
    for split, b in bad.items():
        if b.total:
            _log(f"skipped {b.total} bad record(s) in {split}.jsonl: {b.summary()}")
            for message in b.examples.values():
                _log(f"  e.g. {message}")
            out[split] = dict(b.counts)
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def train(config: TrainConfig, *, resume: bool = False, stop_after: int | None = None) -> RunResult:
    """Train per `config`; `resume` continues from RUN_DIR/checkpoint; `stop_after` ends the
    process after that many epochs in total, as an interruption would (for tests of --resume)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from models.preprocessing import Preprocessor
    from training import checkpoint as ckpt
    from training.evaluate import evaluate_examples, format_metrics, write_eval
    from training.metrics import primary_metric

    started = time.perf_counter()
    run_dir = Path(config.output)
    if resume and not (run_dir / ckpt.CHECKPOINT_DIR / ckpt.STATE).is_file():
        raise ConfigError(f"{run_dir}: nothing to resume ({ckpt.CHECKPOINT_DIR}/{ckpt.STATE} missing)")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:  # a fresh run replaces an earlier run's outputs in the same directory
        import shutil

        for stale in ("metrics.jsonl", ckpt.WEIGHTS, "eval_dev.json", "eval_test.json"):
            (run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(run_dir / ckpt.CHECKPOINT_DIR, ignore_errors=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)

    # ---- data and label space
    data = read_dataset(Path(config.data), config.task, config.modalities, skip_bad=config.skip_bad,
                        multi_label=config.multi_label, top_answers=config.vqa_top_answers,
                        max_train_samples=config.max_train_samples)
    labels, multi_label = data.labels, data.multi_label
    if config.task == "ner" and "text" not in config.modalities:
        raise ConfigError("NER needs the text modality (tags are per word)")
    if config.task == "vqa" and "image" not in config.modalities:
        raise ConfigError("VQA needs the image modality")
    if len(labels) < 2 and not multi_label:
        raise DataError(f"{config.data}/train.jsonl: need at least 2 distinct labels, found {labels}")
    metric_name = primary_metric(config.task, multi_label)

    # ---- tokenizer, model config, preprocessing spec: the run directory's contract files
    from models.build import default_preprocess_spec, write_tokenizer

    model_config = config.model_config_for(labels, multi_label, None)
    if "text" in config.modalities:
        _, vocab_size = write_tokenizer(model_config, run_dir, data.texts())
        model_config = model_config.model_copy(update={"text_vocab_size": vocab_size})
    spec = default_preprocess_spec(model_config)
    if spec.text and config.max_length:
        spec.text.max_length = config.max_length
    if spec.image and config.image_size:
        spec.image.size = config.image_size
    if spec.audio and config.audio_seconds:
        if config.audio_encoder != "tiny":
            raise ConfigError("--audio-seconds applies to the tiny audio encoder only (a pretrained one fixes its frames)")
        spec.audio.max_seconds = config.audio_seconds
    config.save(run_dir / "config.yaml")
    _write_json(run_dir / "model_config.json", model_config.model_dump(mode="json"))
    _write_json(run_dir / "preprocess.json", spec.model_dump(mode="json"))

    # ---- preprocess every record once
    t0 = time.perf_counter()
    pre = Preprocessor(spec, run_dir)
    examples = {}
    for split, records in data.splits.items():
        if split != "train" and config.max_eval_samples:
            records = records[: config.max_eval_samples]
        examples[split] = encode_split(records, config.task, config.modalities, pre, labels, multi_label,
                                       skip_bad=config.skip_bad, bad=data.bad[split])
    skipped = _report_skipped(data.bad)
    if not examples["train"]:
        raise DataError(f"{config.data}/train.jsonl: no usable records")
    _log(f"data: {', '.join(f'{s} {len(e)}' for s, e in examples.items())} records, "
         f"{len(labels)} labels, preprocessed in {time.perf_counter() - t0:.1f}s")

    # ---- model
    model = ckpt.build_for_run(model_config, pretrained=True)
    configure_trainable(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    _log(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(1, total):.2f}%)")

    collate_fn = make_collate_fn(config.task, config.modalities, spec, pre.pad_id, multi_label)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(examples["train"], batch_size=config.batch_size, shuffle=True, collate_fn=collate_fn,
                        generator=generator, num_workers=config.num_workers,
                        worker_init_fn=(lambda wid: np.random.seed(config.seed + wid)) if config.num_workers else None)
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.lr)
    total_steps = config.epochs * len(loader)
    scheduler = linear_schedule(optimizer, int(config.warmup_ratio * total_steps), total_steps)

    def dev_metrics() -> dict[str, float]:
        return evaluate_examples(model, examples["dev"], task=config.task, labels=labels, multi_label=multi_label,
                                 modalities=config.modalities, spec=spec, pad_id=pre.pad_id)

    # ---- state (fresh or resumed)
    start_epoch, best, best_epoch, bad_epochs, history = 0, -float("inf"), 0, 0, []
    if resume:
        state = ckpt.load_checkpoint(run_dir, model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, best_epoch = state["epoch"], state["best"], state["best_epoch"]
        bad_epochs, history = state["bad_epochs"], state["history"]
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["loader"])
        _log(f"resumed from {run_dir / ckpt.CHECKPOINT_DIR} after epoch {start_epoch} (best {metric_name} {best:.4f})")
        if bad_epochs > config.patience > 0:
            start_epoch = config.epochs  # it had already stopped early

    show_bar = config.progress if config.progress is not None else sys.stderr.isatty()
    stopped_early = False
    for epoch in range(start_epoch, config.epochs):
        if stop_after is not None and epoch >= stop_after:
            break
        t_epoch = time.perf_counter()
        model.train()
        keep_frozen_encoders_in_eval(model)
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", file=sys.stderr, disable=not show_bar,
                   leave=False, dynamic_ncols=True)
        for batch in bar:
            targets = batch.pop("labels")
            logits = model(**batch)
            logits = getattr(logits, "logits", logits)
            loss = compute_loss(config.task, multi_label, logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", best=f"{max(best, 0):.3f}")
        bar.close()
        dev = dev_metrics()
        value = dev[metric_name]
        improved = value > best
        if improved:
            best, best_epoch, bad_epochs = value, epoch + 1, 0
            ckpt.save_weights(model, run_dir / ckpt.WEIGHTS)
        else:
            bad_epochs += 1
        seconds = time.perf_counter() - t_epoch
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else None, "dev": dev,
                 "seconds": round(seconds, 3), "lr": scheduler.get_last_lr()[0]}
        history.append(entry)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        _log(f"epoch {epoch + 1}/{config.epochs}  train_loss {entry['train_loss']:.4f}  dev {metric_name} "
             f"{value:.4f}{'  (best)' if improved else ''}  {seconds:.1f}s")
        ckpt.save_checkpoint(run_dir, model, {
            "epoch": epoch + 1, "best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
            "history": history, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(), "loader": generator.get_state()},
        })
        if config.patience and bad_epochs >= config.patience:
            _log(f"early stopping: no dev improvement for {bad_epochs} epoch(s); best epoch {best_epoch}")
            stopped_early = True
            break

    # ---- final evaluation of the best weights
    if not (run_dir / ckpt.WEIGHTS).is_file():
        raise ConfigError(f"{run_dir}: no epoch finished, no weights to evaluate")
    ckpt.load_weights(model, run_dir / ckpt.WEIGHTS)
    dev = dev_metrics()
    write_eval(run_dir / "eval_dev.json", "dev", config.task, config.data, metric_name, dev)
    _log(f"best epoch {best_epoch}  dev  {format_metrics(dev)}")
    test = None
    if "test" in examples:
        test = evaluate_examples(model, examples["test"], task=config.task, labels=labels, multi_label=multi_label,
                                 modalities=config.modalities, spec=spec, pad_id=pre.pad_id)
        write_eval(run_dir / "eval_test.json", "test", config.task, config.data, metric_name, test)
        _log(f"best epoch {best_epoch}  test {format_metrics(test)}")
    seconds = time.perf_counter() - started
    _log(f"run directory: {run_dir}  ({seconds:.1f}s{', stopped early' if stopped_early else ''})")
    return RunResult(run_dir=run_dir, metric_name=metric_name, best_metric=best, best_epoch=best_epoch,
                     epochs_run=len(history), dev=dev, test=test, trainable_params=trainable, total_params=total,
                     seconds=seconds, skipped=skipped, history=history)

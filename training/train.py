"""`mmserve train`: fine-tune a fused text + image + audio model, top to bottom.

    1. devices and processes: CUDA when present, one process per GPU under torchrun (DDP)
    2. seed everything (Python, numpy, torch, sampler order); deterministic algorithms
    3. read and check the data (bad records fail fast as FILE:LINE: reason, or --skip-bad)
    4. rank 0 writes the run's contract files: tokenizer, model config, preprocessing spec
    5. preprocess every record once (tokenise, decode + resize images, log-mel audio), in memory
    6. build the model; choose and print the recipe (training/recipe.py: what trains at which lr)
    7. frozen encoders run once per split (training/feature_cache.py), not once per epoch
    8. AdamW (no weight decay on biases and norm weights), linear warm-up then linear decay,
       gradient clipping, autocast on CUDA; a progress bar with items/s and the epoch's ETA
    9. after each epoch: dev metrics (gathered across ranks: every rank takes the same early
       stopping decision), metrics.jsonl, learning_curve.png, checkpoint/ for --resume, best
       weights in model.safetensors; early stopping after `patience` epochs without improvement
   10. best weights reloaded: eval_dev.json and eval_test.json (when test.jsonl exists)

Fine-tuning strategies (what trains; training/recipe.py has the per-encoder defaults and why):
  full (default)          pretrained text encoder at a BERT fine-tuning rate; pretrained image /
                          audio encoders frozen on small data, else at their family's rate;
                          randomly initialised (tiny) encoders, fusion and head at --lr
  --freeze-encoders       linear probing: all encoders frozen; projections, fusion, head train
  --peft lora             LoRA adapters on the modules matching --lora-targets (the text encoder's
                          query/value by default); pretrained image/audio encoders frozen, tiny
                          ones train; fusion and head train

--batch-size is the global batch: under torchrun each of N processes takes batch_size / N, so
the optimisation (steps, learning-rate schedule, gradients) is the same as in one process.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from training.config import ConfigError, TrainConfig
from training.data import BadRecords, DataError, encode_split, make_collate_fn, read_dataset


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


@dataclass
class Progress:
    """What early stopping and --resume need to know about the epochs so far."""

    epoch: int = 0  # epochs finished
    best: float = -float("inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    import os

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


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


def choose_device(config: TrainConfig, local_rank: int):
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def autocast_dtype(config: TrainConfig, device):
    """None (fp32) on CPU; on CUDA bf16 where the GPU supports it, else fp16 (with a loss scaler)."""
    import torch

    if device.type != "cuda" or config.precision == "fp32":
        return None
    if config.precision == "fp16" or (config.precision == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def to_device(batch, device):
    """Tensors (also inside dicts and EncoderOutput tuples) moved to `device`."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return type(batch)(*(to_device(v, device) for v in batch))
    return batch


def _log(world, message: str) -> None:
    if world.main:
        print(message, flush=True)


def _report_skipped(world, bad: dict[str, BadRecords]) -> dict[str, dict[str, int]]:
    out = {}
    for split, b in bad.items():
        if b.total:
            _log(world, f"skipped {b.total} bad record(s) in {split}.jsonl: {b.summary()}")
            for message in b.examples.values():
                _log(world, f"  e.g. {message}")
            out[split] = dict(b.counts)
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def prepare_run_dir(config: TrainConfig, data, run_dir: Path, resume: bool) -> None:
    """Rank 0: clear a fresh run's stale outputs; write config.yaml, tokenizer.json, model_config.json
    and preprocess.json, the files export and serving rebuild the model from."""
    from models.build import default_preprocess_spec, write_tokenizer
    from training import checkpoint as ckpt

    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:  # a fresh run replaces an earlier run's outputs in the same directory
        for stale in ("metrics.jsonl", ckpt.WEIGHTS, "eval_dev.json", "eval_test.json", "learning_curve.png"):
            (run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(run_dir / ckpt.CHECKPOINT_DIR, ignore_errors=True)
    model_config = config.model_config_for(data.labels, data.multi_label, None)
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


def cache_frozen_encoders(model, recipe, examples, collate_fn, *, batch_size, device, cache_dir, world, log):
    """{modality: {split: CachedFeatures}} for every frozen encoder: computed once (rank 0 writes the
    cache, the other ranks read it), so no epoch runs a frozen encoder again."""
    import torch

    from models import contract
    from training.feature_cache import encoder_features

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: dict[str, dict] = {}
    for modality in recipe.encoders:
        encoder = getattr(base, f"{modality}_encoder")
        if any(p.requires_grad for p in encoder.parameters()):  # trains, or holds training LoRA adapters
            continue
        names = [n for n in contract.inputs_of(modality) if n not in contract.PRESENCE.values()]
        if modality == "audio" and contract.AUDIO_FRAMES not in names:
            names.append(contract.AUDIO_FRAMES)
        encoder.eval()
        out[modality] = {}
        for split, split_examples in examples.items():
            t0 = time.perf_counter()
            batches = [{n: v.numpy() for n, v in collate_fn(split_examples[i:i + batch_size]).items() if n in names}
                       for i in range(0, len(split_examples), batch_size)]

            def call(batch):
                with torch.inference_mode():
                    return encoder(*(torch.from_numpy(batch[n]).to(device) for n in names))

            key = {"modality": modality, "split": split}
            for rank_turn in (True, False):  # rank 0 computes and writes first; then the others read
                if world.main == rank_turn:
                    features, hit = encoder_features(encoder, batches, names, call, key_parts=key,
                                                     cache_dir=cache_dir)
                world.barrier()
            out[modality][split] = features
            log(f"feature cache: {modality} encoder on {split} ({len(split_examples)} records) "
                f"{'read from cache' if hit else 'computed'} in {time.perf_counter() - t0:.1f}s")
    return out


def train(config: TrainConfig, *, resume: bool = False, stop_after: int | None = None) -> RunResult:
    """Train per `config`; `resume` continues from RUN_DIR/checkpoint; `stop_after` ends the
    process after that many epochs in total, as an interruption would (for tests of --resume)."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm import tqdm

    from models.lora import count_parameters
    from models.preprocessing import Preprocessor
    from models.spec import ModelConfig, PreprocessSpec
    from training import checkpoint as ckpt
    from training import distributed
    from training.evaluate import format_metrics, score, write_eval
    from training.feature_cache import default_cache_dir
    from training.learning_curve import plot_learning_curve
    from training.metrics import primary_metric
    from training.recipe import apply_recipe, choose_recipe, parameter_groups, set_train_mode

    started = time.perf_counter()
    run_dir = Path(config.output)
    if resume and not (run_dir / ckpt.CHECKPOINT_DIR / ckpt.STATE).is_file():
        raise ConfigError(f"{run_dir}: nothing to resume ({ckpt.CHECKPOINT_DIR}/{ckpt.STATE} missing)")

    # ---- 1. devices and processes
    import os

    device = choose_device(config, int(os.environ.get("LOCAL_RANK", "0")))
    world = distributed.join(device.type)
    log = lambda message: _log(world, message)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    if world.distributed and config.batch_size % world.size:
        raise ConfigError(f"--batch-size {config.batch_size} is the global batch: it must divide by the "
                          f"{world.size} processes")
    local_batch = config.batch_size // world.size
    amp_dtype = autocast_dtype(config, device)

    # ---- 2. seed
    seed_everything(config.seed)

    # ---- 3. data and label space
    data = read_dataset(Path(config.data), config.task, config.modalities, skip_bad=config.skip_bad,
                        multi_label=config.multi_label, top_answers=config.vqa_top_answers,
                        max_train_samples=config.max_train_samples)
    labels, multi_label = data.labels, data.multi_label
    if len(labels) < 2 and not multi_label:
        raise DataError(f"{config.data}/train.jsonl: need at least 2 distinct labels, found {labels}")
    metric_name = primary_metric(config.task, multi_label)

    # ---- 4. the run directory's contract files (rank 0), read back by every rank
    if world.main:
        prepare_run_dir(config, data, run_dir, resume)
    world.barrier()
    model_config = ModelConfig.model_validate_json((run_dir / "model_config.json").read_text())
    spec = PreprocessSpec.model_validate_json((run_dir / "preprocess.json").read_text())

    # ---- 5. preprocess every record once
    t0 = time.perf_counter()
    pre = Preprocessor(spec, run_dir)
    examples = {}
    for split, records in data.splits.items():
        if split != "train" and config.max_eval_samples:
            records = records[: config.max_eval_samples]
        examples[split] = encode_split(records, config.task, config.modalities, pre, labels, multi_label,
                                       skip_bad=config.skip_bad, bad=data.bad[split])
    skipped = _report_skipped(world, data.bad)
    if not examples["train"]:
        raise DataError(f"{config.data}/train.jsonl: no usable records")
    log(f"data: {', '.join(f'{s} {len(e)}' for s, e in examples.items())} records, "
        f"{len(labels)} labels, preprocessed in {time.perf_counter() - t0:.1f}s")

    # ---- 6. model and recipe (seeded again: the same initial weights whatever the data reading consumed)
    torch.manual_seed(config.seed)
    model = ckpt.build_for_run(model_config, pretrained=True)
    recipe = choose_recipe(config, len(examples["train"]))
    apply_recipe(model, recipe)
    for line in recipe.describe():
        log(f"recipe: {line}")
    trainable, total = count_parameters(model)
    log(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(1, total):.2f}%)")
    model.to(device)

    # ---- 7. frozen encoders: outputs computed once per split
    collate_fn = make_collate_fn(config.task, config.modalities, spec, pre.pad_id, multi_label)
    cached: dict[str, dict] = {}
    if config.feature_cache and recipe.frozen():
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        cached = cache_frozen_encoders(model, recipe, examples, collate_fn, batch_size=64, device=device,
                                       cache_dir=cache_dir, world=world, log=log)

    def batch_of(split: str):
        """collate for (index, example) pairs of `split`: contract tensors + labels + cached encoder outputs."""
        def collate_indexed(items):
            batch = collate_fn([e for _, e in items])
            if cached:
                index = [i for i, _ in items]
                length = batch["input_ids"].shape[1] if "input_ids" in batch else None
                batch["encoded"] = {m: by_split[split].rows(index, length if m == "text" else None)
                                    for m, by_split in cached.items()}
            return batch
        return collate_indexed

    train_items = list(enumerate(examples["train"]))
    sampler = DistributedSampler(train_items, num_replicas=world.size, rank=world.rank, shuffle=True,
                                 seed=config.seed) if world.distributed else None
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(train_items, batch_size=local_batch, shuffle=sampler is None, sampler=sampler,
                        collate_fn=batch_of("train"), generator=generator, num_workers=config.num_workers,
                        pin_memory=device.type == "cuda",
                        worker_init_fn=(lambda wid: np.random.seed(config.seed + wid)) if config.num_workers else None)
    net = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # unused parameters exist by design: a classification head ignores fusion's per-token outputs
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True)

    # ---- 8. optimiser and schedule
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe, config), lr=config.lr)
    total_steps = recipe.epochs * len(loader)
    scheduler = linear_schedule(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def predict(split: str) -> list[np.ndarray]:
        """Logits of every example of `split`, in order; each rank runs a strided shard, all ranks get all."""
        items = list(enumerate(examples[split]))[world.rank::world.size]
        collate_split = batch_of(split)
        was_training = model.training
        model.eval()
        mine = []
        with torch.inference_mode(), torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
            for start in range(0, len(items), 64):
                chunk = items[start:start + 64]
                batch = to_device(collate_split(chunk), device)
                batch.pop("labels")
                logits = model(**batch).float().cpu().numpy()
                mine.extend((i, x) for (i, _), x in zip(chunk, logits))
        model.train(was_training)
        ordered = sorted((pair for part in world.gather(mine) for pair in part), key=lambda p: p[0])
        return [x for _, x in ordered]

    def metrics_of(split: str) -> dict[str, float]:
        return score(config.task, examples[split], predict(split), labels, multi_label)

    # ---- state (fresh or resumed)
    progress = Progress()
    if resume:
        progress = Progress(**ckpt.restore_training_state(run_dir, model, optimizer, scheduler, generator))
        log(f"resumed from {run_dir / ckpt.CHECKPOINT_DIR} after epoch {progress.epoch} "
            f"(best {metric_name} {progress.best:.4f})")

    show_bar = world.main and (config.progress if config.progress is not None else sys.stderr.isatty())
    stopped_early = bool(recipe.patience) and progress.bad_epochs >= recipe.patience
    for epoch in range(progress.epoch, recipe.epochs):
        if stopped_early or (stop_after is not None and epoch >= stop_after):
            break
        t_epoch = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        set_train_mode(model)
        losses = []
        bar = tqdm(total=len(train_items), desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="item",
                   file=sys.stderr, disable=not show_bar, leave=False, dynamic_ncols=True)
        for batch in loader:
            targets = batch.pop("labels").to(device)
            batch = to_device(batch, device)
            with torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
                logits = net(**batch)
            loss = compute_loss(config.task, multi_label, logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.update(len(targets) * world.size)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", best=f"{max(progress.best, 0):.3f}")
        bar.close()

        # ---- 9. dev metrics, early stopping, checkpoints (identical decision on every rank)
        dev = metrics_of("dev")
        value = dev[metric_name]
        improved = value > progress.best
        if improved:
            progress.best, progress.best_epoch, progress.bad_epochs = value, epoch + 1, 0
            if world.main:
                ckpt.save_weights(model, run_dir / ckpt.WEIGHTS)
        else:
            progress.bad_epochs += 1
        progress.epoch = epoch + 1
        seconds = time.perf_counter() - t_epoch
        entry = {"epoch": epoch + 1, "train_loss": world.mean(float(np.mean(losses))) if losses else None,
                 "dev": dev, "seconds": round(seconds, 3), "lr": scheduler.get_last_lr()[0]}
        progress.history.append(entry)
        log(f"epoch {epoch + 1}/{recipe.epochs}  train_loss {entry['train_loss']:.4f}  dev {metric_name} "
            f"{value:.4f}{'  (best)' if improved else ''}  {seconds:.1f}s")
        if world.main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            plot_learning_curve(progress.history, metric_name, run_dir / "learning_curve.png")
            ckpt.save_training_state(run_dir, model, asdict(progress), optimizer, scheduler, generator)
        world.barrier()
        if recipe.patience and progress.bad_epochs >= recipe.patience:
            log(f"early stopping: no dev improvement for {progress.bad_epochs} epoch(s); best epoch {progress.best_epoch}")
            stopped_early = True

    # ---- 10. final evaluation of the best weights
    if not (run_dir / ckpt.WEIGHTS).is_file():
        raise ConfigError(f"{run_dir}: no epoch finished, no weights to evaluate")
    ckpt.load_weights(model, run_dir / ckpt.WEIGHTS)
    model.to(device)
    results = {}
    for split in ("dev", "test"):
        if split in examples:
            results[split] = metrics_of(split)
            if world.main:
                write_eval(run_dir / f"eval_{split}.json", split, config.task, config.data, metric_name, results[split])
            log(f"best epoch {progress.best_epoch}  {split:<4} {format_metrics(results[split])}")
    seconds = time.perf_counter() - started
    log(f"run directory: {run_dir}  ({seconds:.1f}s{', stopped early' if stopped_early else ''})")
    distributed.leave(world)
    return RunResult(run_dir=run_dir, metric_name=metric_name, best_metric=progress.best,
                     best_epoch=progress.best_epoch, epochs_run=len(progress.history), dev=results["dev"],
                     test=results.get("test"), trainable_params=trainable, total_params=total, seconds=seconds,
                     skipped=skipped, history=progress.history)

"""`python -m bench.training`: does `mmserve train` work with its defaults on tasks it was not tuned on?

For each held-out task (bench/heldout: match, vqa, speech, ner-visual) it generates the data once
(cached under .cache/heldout/), then runs `mmserve train` as a user would -- a subprocess
`python -m training.cli train` with the DEFAULTS, only task / data / output / modalities and the
encoders a user would pick (text minilm, image efficientnet-lite0, audio whisper-tiny) given --
for:
  fused      every modality of the task
  text       the same command with --modalities text             (unimodal baseline)
  image      ... --modalities image   (or audio for the speech task; NER has no image-only baseline)
  best       the fused command plus the flags of BEST_RECIPES below (the best recipe found so far)
and reads the test metric from the run directory's eval_test.json (accuracy, entity F1, VQA
accuracy), the epochs run and the seconds per epoch from metrics.jsonl. Writes OUT.json and OUT.md
(default bench/results/training.{json,md}) and prints the table.

  --tasks match,vqa       which tasks (default: all four)
  --epochs N              pass --epochs N to every run (default: the trainer's own default)
  --only fused|baselines|best   run one kind of variant (repeatable; default: fused + baselines + best)
  --quick                 smoke run: tiny encoders, 24/8/8 records, 1 epoch, writes under .cache/
  --at REV                measure the trainer of git revision REV (exported with `git archive` into
                          .cache/heldout-code/) instead of this working tree; the commit is recorded
  --out PREFIX            output files PREFIX.json / PREFIX.md
  --collect               run nothing: report every finished run directory under
                          .cache/bench-training-runs/full/TASK/VARIANT (runs made by earlier invocations
                          or by hand); each run's flags are read back from its config.yaml and
                          model_config.json, "fused" is the defaults run, "best" the other all-modality
                          run with the best DEV metric
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.heldout import DEFAULT_SIZES, TASKS, generate

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
RESULTS = ROOT / "bench" / "results"

# The encoders a user would pick (README); "tiny" for --quick.
ENCODERS = {"text": "minilm", "image": "efficientnet-lite0", "audio": "whisper-tiny"}
QUICK_ENCODERS = {"text": "tiny", "image": "tiny", "audio": "tiny"}
QUICK_SIZES = {"train": 24, "dev": 8, "test": 8}

# Extra "best recipe" variants: flags added to the fused defaults command, per task: the strongest
# alternatives to the defaults tried so far (a linear probe of every encoder; on vqa with cross-attention).
# In bench/results/training.md (assembled with --collect) "best" is whichever alternative run scored the
# best DEV metric, e.g. the previous defaults (--fusion-revision 2); the defaults themselves have scored
# highest on match, vqa and speech, the frozen recipe tied them on ner-visual.
BEST_RECIPES: dict[str, list[str]] = {
    "match": ["--freeze-encoders"],
    "vqa": ["--freeze-encoders", "--fusion", "cross_attention"],
    "speech": ["--freeze-encoders"],
    "ner-visual": ["--freeze-encoders"],
}
VARIANT_KINDS = ("fused", "baselines", "best")
METRIC_NAMES = {"classify": "accuracy", "ner": "entity F1", "vqa": "VQA accuracy"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- data


def _generator_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "bench" / "heldout").glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def ensure_data(name: str, seed: int, sizes: dict[str, int], cache: Path = CACHE / "heldout") -> Path:
    """The task's data set under cache/, generated once per (task, seed, sizes, generator source)."""
    tag = f"{name}-seed{seed}-{sizes['train']}-{sizes['dev']}-{sizes['test']}"
    out = cache / tag
    stamp = out / ".generator"
    digest = _generator_digest()
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=cache))
    t0 = time.perf_counter()
    generate(name, tmp, seed=seed, sizes=sizes)
    (tmp / ".generator").write_text(digest + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"[data] {name}: generated {out} in {time.perf_counter() - t0:.1f}s")
    return out


# ---------------------------------------------------------------------------- code under test


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def code_tree(at: str | None) -> tuple[Path, dict]:
    """(directory to run the trainer from, description). --at REV: a clean `git archive` export of REV."""
    if at is None:
        try:
            commit = _git("rev-parse", "HEAD")
            dirty = bool(_git("status", "--porcelain", "--", "training", "models"))
        except (subprocess.CalledProcessError, FileNotFoundError):
            commit, dirty = None, None
        return ROOT, {"source": "working tree", "commit": commit, "trainer_dirty": dirty}
    commit = _git("rev-parse", "--verify", f"{at}^{{commit}}")
    out = CACHE / "heldout-code" / commit[:12]
    if not (out / ".complete").is_file():
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
        (out / ".complete").write_text(commit + "\n")
    return out, {"source": f"git archive of {at}", "commit": commit, "trainer_dirty": False}


def python_exe() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


# ---------------------------------------------------------------------------- runs


def variants(name: str, only: list[str], quick: bool) -> list[tuple[str, list[str], list[str]]]:
    """(variant, modalities, extra flags) to run for task `name`."""
    t = TASKS[name]
    out = []
    if "fused" in only:
        out.append(("fused", list(t.modalities), []))
    if "best" in only and BEST_RECIPES.get(name):
        out.append(("best", list(t.modalities), list(BEST_RECIPES[name])))
    if "baselines" in only:
        for m in t.baselines:
            out.append((f"{m}-only", [m], []))
    return out


def train_command(name: str, data: Path, run_dir: Path, modalities: list[str], extra: list[str],
                  epochs: int | None, quick: bool) -> list[str]:
    t = TASKS[name]
    encoders = QUICK_ENCODERS if quick else ENCODERS
    cmd = [python_exe(), "-m", "training.cli", "train", "--task", t.task, "--data", str(data),
           "--output", str(run_dir), "--modalities", ",".join(modalities)]
    for m in modalities:
        cmd += [f"--{m}-encoder", encoders[m]]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    return cmd + extra


def read_run(run_dir: Path) -> dict:
    """Test / dev metric, epochs and seconds per epoch of a finished run directory."""
    out: dict = {}
    for split in ("test", "dev"):
        path = run_dir / f"eval_{split}.json"
        if path.is_file():
            ev = json.loads(path.read_text())
            out["metric_key"] = ev.get("primary_metric")
            out[split] = ev["metrics"].get(ev.get("primary_metric"))
            out[f"{split}_metrics"] = ev["metrics"]
    history = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        history = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    out["epochs"] = len(history)
    secs = [h["seconds"] for h in history if h.get("seconds") is not None]
    out["sec_per_epoch"] = round(sum(secs) / len(secs), 2) if secs else None
    key = out.get("metric_key")
    out["curve"] = [{"epoch": h.get("epoch"), "train_loss": h.get("train_loss"),
                     "dev": (h.get("dev") or {}).get(key) if key else None, "seconds": h.get("seconds")}
                    for h in history]
    return out


def run_one(name: str, variant: str, modalities: list[str], extra: list[str], data: Path, runs: Path,
            code: Path, epochs: int | None, quick: bool) -> dict:
    run_dir = runs / name / variant
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = train_command(name, data, run_dir, modalities, extra, epochs, quick)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(code),
               PYTHONUNBUFFERED="1")
    log_path = runs / name / f"{variant}.log"
    shown = " ".join(["mmserve", *cmd[3:]])
    log(f"[run] {name} / {variant}: {shown}")
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, cwd=code, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    result = {"task": name, "variant": variant, "modalities": modalities, "flags": extra, "command": shown,
              "rc": rc, "wall_s": round(wall, 1), "run_dir": str(run_dir), "log": str(log_path)}
    result.update(read_run(run_dir))
    if rc != 0:
        tail = log_path.read_text().strip().splitlines()[-3:]
        result["error"] = " | ".join(tail)
    log(f"[run] {name} / {variant}: rc {rc}, test {_fmt(result.get('test'))}, dev {_fmt(result.get('dev'))}, "
        f"{result['epochs']} epoch(s), {_fmt(result.get('sec_per_epoch'), 1)} s/epoch, {wall:.0f}s wall")
    return result


# ---------------------------------------------------------------------------- collecting finished runs

# TrainConfig fields that every command sets (shown as the command's fixed part, not as flags)
_FIXED = {"task", "data", "output", "modalities", "text_encoder", "image_encoder", "audio_encoder"}


def run_flags(run_dir: Path) -> list[str]:
    """The non-default flags a finished run was trained with, read back from its config.yaml; the fusion
    revision from model_config.json (runs from before the TrainConfig field existed have none in their
    config.yaml, and they were trained with the default of their time)."""
    import yaml

    from training.config import TrainConfig

    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    model = json.loads((run_dir / "model_config.json").read_text())
    saved["fusion_revision"] = model.get("fusion_revision", 1)
    defaults = TrainConfig.model_fields
    flags = []
    for key, value in saved.items():
        field = defaults.get(key)
        if key in _FIXED or field is None or value == field.get_default(call_default_factory=True):
            continue
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [f"--no-{key.replace('_', '-')}"] if value is False else [flag, str(value)]
    return flags


def collect(tasks: list[str], runs: Path) -> list[dict]:
    """Results of every finished run directory runs/TASK/VARIANT (eval_test.json present)."""
    import yaml

    results = []
    for name in tasks:
        t = TASKS[name]
        for run_dir in sorted(p for p in (runs / name).glob("*") if (p / "eval_test.json").is_file()):
            saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
            modalities = list(saved.get("modalities") or [])
            flags = run_flags(run_dir)
            shown = " ".join(["mmserve train --task", t.task, "--data", str(saved.get("data")), "--modalities",
                              ",".join(modalities), *(f"--{m}-encoder {saved.get(f'{m}_encoder')}" for m in modalities),
                              *flags])
            r = {"task": name, "variant": run_dir.name, "modalities": modalities, "flags": flags, "command": shown,
                 "rc": 0, "wall_s": 0.0, "run_dir": str(run_dir)}
            r.update(read_run(run_dir))
            r["wall_s"] = round(sum(c["seconds"] or 0 for c in r["curve"]), 1)
            results.append(r)
        alternatives = [r for r in results if r["task"] == name and r["variant"] != "fused" and r["flags"]
                        and set(r["modalities"]) == set(t.modalities) and r.get("dev") is not None]
        if alternatives:  # the best alternative recipe, chosen on dev (never on test)
            best = max(alternatives, key=lambda r: r["dev"])
            if best["variant"] != "best":  # a directory named "best" that lost is reported under its flags only
                results = [r for r in results if (r["task"], r["variant"]) != (name, "best")]
                results.append(dict(best, variant="best", chosen_from=best["variant"]))
    return results


# ---------------------------------------------------------------------------- report


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(r: dict | None) -> str:
    if r is None:
        return "n/a"
    if r["rc"] != 0 and r.get("test") is None:
        return f"failed (rc {r['rc']})"
    return f"{_fmt(r.get('test'))} ({r['epochs']} ep, {_fmt(r.get('sec_per_epoch'), 0)} s/ep)"


def table(results: list[dict], tasks: list[str]) -> str:
    by = {(r["task"], r["variant"]): r for r in results}
    lines = ["| task | test metric | fused, defaults | best recipe | text only | image / audio only |",
             "|---|---|---|---|---|---|"]
    for name in tasks:
        t = TASKS[name]
        other = next((m for m in t.modalities if m != "text"), None)
        other_r = by.get((name, f"{other}-only")) if other else None
        best = by.get((name, "best"))
        best_cell = _cell(best)
        if best is not None:
            best_cell += f" `{' '.join(best['flags'])}`"
        other_cell = _cell(other_r) if other in t.baselines else f"n/a ({other}-only: {t.task} needs the tokens)"
        if other_r is not None:
            other_cell += f" [{other}]"
        lines.append(f"| {name} | {METRIC_NAMES[t.task]} | {_cell(by.get((name, 'fused')))} | {best_cell} | "
                     f"{_cell(by.get((name, 'text-only')))} | {other_cell} |")
    return "\n".join(lines)


def details(results: list[dict]) -> str:
    lines = ["| task | variant | rc | dev | test | epochs | s/epoch | wall s | train loss by epoch | dev by epoch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        loss = " ".join(_fmt(c["train_loss"], 2) for c in r.get("curve", []))
        dev = " ".join(_fmt(c["dev"], 2) for c in r.get("curve", []))
        lines.append(f"| {r['task']} | {r['variant']} | {r['rc']} | {_fmt(r.get('dev'))} | {_fmt(r.get('test'))} | "
                     f"{r.get('epochs')} | {_fmt(r.get('sec_per_epoch'), 1)} | {r['wall_s']:.0f} | {loss} | {dev} |")
    return "\n".join(lines)


def markdown(meta: dict, results: list[dict], tasks: list[str]) -> str:
    code = meta["code"]
    dirty = " (trainer files modified in the working tree)" if code.get("trainer_dirty") else ""
    cmds = "\n".join(f"    {r['command']}" for r in results)
    return f"""# Training quality on held-out tasks

`python -m bench.training {' '.join(meta['argv'])}` -- {meta['started']}, {meta['machine']}.
Trainer: {code['source']}, commit `{code.get('commit')}`{dirty}. Encoders: {meta['encoders']}.
Data: bench/heldout, seed {meta['seed']}, {meta['sizes']['train']} / {meta['sizes']['dev']} / {meta['sizes']['test']} records (train / dev / test).
Every run uses the trainer's defaults except task, data, output, modalities, encoders{', epochs' if meta['epochs'] else ''} and, for "best", the flags shown.
{chr(10) + meta['note'] + chr(10) if meta.get('note') else ''}
Test metric of the best dev epoch (epochs run, mean seconds per epoch incl. dev evaluation):

{table(results, tasks)}

Per run:

{details(results)}

Commands (`mmserve` = `python -m training.cli`):

{cmds}
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated held-out tasks")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--only", action="append", choices=VARIANT_KINDS, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--at", default=None, metavar="REV")
    p.add_argument("--out", type=Path, default=None, metavar="PREFIX")
    p.add_argument("--collect", action="store_true")
    p.add_argument("--note", default=None, help="a sentence for the report (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        p.error(f"unknown task(s) {', '.join(bad)} (known: {', '.join(TASKS)})")
    only = args.only or list(VARIANT_KINDS)
    sizes = QUICK_SIZES if args.quick else dict(DEFAULT_SIZES)
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else None)
    base = CACHE / "bench-training-quick" if args.quick else RESULTS
    prefix = args.out or base / "training"
    runs = CACHE / "bench-training-runs" / ("quick" if args.quick else "full")

    code, code_meta = code_tree(args.at)
    meta = {"argv": argv, "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "code": code_meta, "seed": args.seed, "sizes": sizes, "epochs": epochs,
            "encoders": ", ".join(f"{k} {v}" for k, v in (QUICK_ENCODERS if args.quick else ENCODERS).items()),
            "best_recipes": BEST_RECIPES, "note": args.note}
    log(f"[bench.training] trainer: {code_meta['source']} {code_meta.get('commit')}"
        f"{' (trainer modified in working tree)' if code_meta.get('trainer_dirty') else ''}")

    results: list[dict] = []
    t_all = time.perf_counter()
    if args.collect:
        results = collect(tasks, runs)
        meta["code"] = {"source": "finished run directories", "commit": code_meta.get("commit")}
        meta["total_s"] = round(sum(r["wall_s"] for r in results if r["variant"] != "best"), 1)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{prefix}.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=2) + "\n")
        Path(f"{prefix}.md").write_text(markdown(meta, results, tasks))
        print(table(results, tasks))
        print(f"\nwrote {prefix}.json and {prefix}.md")
        return 0

    def write() -> None:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        meta["total_s"] = round(time.perf_counter() - t_all, 1)
        Path(f"{prefix}.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=2) + "\n")
        Path(f"{prefix}.md").write_text(markdown(meta, results, tasks))

    for name in tasks:
        data = ensure_data(name, args.seed, sizes)
        for variant, modalities, extra in variants(name, only, args.quick):
            results.append(run_one(name, variant, modalities, extra, data, runs, code, epochs, args.quick))
            write()  # partial results survive an interrupted benchmark
    write()
    print(table(results, tasks))
    print(f"\nwrote {prefix}.json and {prefix}.md ({time.perf_counter() - t_all:.0f}s)")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Building the demo models: check what is valid, write the data, train, export + validate into a
staging directory, install, write the metrics. `training.demo_model` is its command line."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from training.demo_metrics import METRICS_JSON, METRICS_MD, format_table, read_metrics, run_summary, write_metrics
from training.demo_progress import Progress
from training.demo_recipe import BASELINES, DEMO_MODELS, TASK_SETTINGS, TASKS, encoder_names, run_settings
from training.model_repository import existing_versions, swap_in

STAGING = ".demo-staging"
DATA_MARKER = ".complete"


class DemoBuildError(RuntimeError):
    """A built model failed validation or installation (one line, exit status 1)."""


@dataclass
class BuildResult:
    repository: Path
    built: list[str]  # tasks (re)built this time; empty when everything was valid
    metrics: dict[str, Any] | None
    seconds: float
    timings: list[tuple[str, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------- checking


def check_model(repository: Path, task: str) -> list[str]:
    """Problems with the latest version of the demo model for `task` (empty: valid). Fast: no model is loaded."""
    from pydantic import ValidationError

    from models.manifest import read_manifest, verify_files

    name = DEMO_MODELS[task]
    model_dir = Path(repository) / name
    versions = existing_versions(model_dir)
    if not versions:
        return [f"{model_dir}: no version"]
    directory = model_dir / str(versions[-1])
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError, ValidationError) as exc:
        return [f"{directory}/manifest.json: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"]
    problems = []
    if manifest.name != name or manifest.task != task or str(manifest.version) != directory.name:
        problems.append(f"{directory}: manifest says {manifest.name}/{manifest.version} ({manifest.task})")
    for fmt in ("onnx", "torchscript"):
        if fmt not in manifest.formats:
            problems.append(f"{directory}: no {fmt} model")
    return problems + verify_files(directory, manifest)


def check_repository(repository: Path) -> dict[str, list[str]]:
    """{task: problems} for the three demo models."""
    return {task: check_model(repository, task) for task in TASKS}


# ----------------------------------------------------------------------------- steps


def _pick_threads() -> int:
    """Torch threads: the cores not already busy. With more threads than free cores, every
    parallel region waits on a descheduled thread (measured: 3-4x slower under a busy neighbour)."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def _source_hash() -> str:
    import training.demo_data as demo_data

    return hashlib.sha256(Path(demo_data.__file__).read_bytes()).hexdigest()[:16]


def ensure_demo_data(data_dir: Path, tasks: Sequence[str]) -> bool:
    """Write the demo data set unless a complete copy from the same generator is there. True if written."""
    from training.demo_data import write_demo_data

    marker = data_dir / DATA_MARKER
    stamp = json.dumps({"generator": _source_hash(), "seed": 0, "tasks": sorted(TASKS)})
    if marker.is_file() and marker.read_text() == stamp:
        return False
    shutil.rmtree(data_dir, ignore_errors=True)
    write_demo_data(data_dir, seed=0, tasks=TASKS)  # all three: a later partial rebuild reuses them
    marker.write_text(stamp)
    return True


def train_run(data_dir: Path, run_dir: Path, task: str, settings: dict[str, Any]):
    from training.config import TrainConfig
    from training.train import train

    config = TrainConfig(task=task, data=str(data_dir / task), output=str(run_dir), **settings)
    return train(config)


def _train_runs(progress: Progress, todo: list[str], baselines: dict[str, list[str]], data_dir: Path,
                runs_dir: Path, metrics: dict[str, Any], settings_of: Callable[..., dict[str, Any]]) -> dict[str, Path]:
    """Train each task model in `todo` and each baseline; their summaries go into metrics["models"].
    Returns {task: run directory} of the task models."""
    runs: dict[str, Path] = {}
    for task in todo:
        settings = settings_of(task, TASK_SETTINGS[task]["modalities"])
        name = DEMO_MODELS[task]
        with progress.stage(f"train {name} ({'+'.join(settings['modalities'])}, {settings['fusion']} fusion, "
                            f"{settings['epochs']} epochs)"):
            result = train_run(data_dir, runs_dir / task, task, settings)
        runs[task] = result.run_dir
        metrics["models"][name] = run_summary(result, settings, task)
    for label, modalities in baselines.items():
        settings = settings_of("classify", modalities)
        with progress.stage(f"baseline classify {label} ({settings[f'{modalities[0]}_encoder']} encoder)"):
            result = train_run(data_dir, runs_dir / f"classify-{label}", "classify", settings)
        metrics["models"][f"baseline {label}"] = run_summary(result, settings, "classify")
    return runs


@contextmanager
def _staging(repository: Path) -> Iterator[Path]:
    """A hidden, empty directory in `repository` (servers skip dot names), always removed afterwards."""
    staging = repository / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export_validated(run_dir: Path, staging: Path, name: str, data_dir: Path, parity: bool,
                      say: Callable[[str], None]) -> Path:
    """Export one run into staging/NAME/1 and validate it there; raises DemoBuildError when it does not validate."""
    from training.export import export
    from training.validate import validate_version

    target = export(run_dir, staging, name, version=1, data_dir=data_dir, log=lambda m: say(f"    {m}"))
    found = validate_version(target, parity=parity, warn=lambda m: say(f"    {m}"))
    if found:
        raise DemoBuildError(f"{name}: exported model does not validate: {found[0]}")
    return target


def _export_and_install(progress: Progress, repository: Path, runs: dict[str, Path], data_dir: Path,
                        validate_parity: bool, say: Callable[[str], None], metrics: dict[str, Any], threads: int) -> None:
    """Export and validate every run in a staging directory, then swap them all into `repository` and
    write the metrics: a failure leaves the repository's models as they were."""
    with _staging(repository) as staging:
        for task, run_dir in runs.items():
            name = DEMO_MODELS[task]
            with progress.stage(f"export {name} (ONNX + TorchScript, parity vs PyTorch)"):
                target = _export_validated(run_dir, staging, name, data_dir / task, validate_parity, say)
                say(f"    validated {target.relative_to(repository)}")
        with progress.stage(f"install into {repository}"):
            for task in runs:
                swap_in(staging / DEMO_MODELS[task], repository / DEMO_MODELS[task])
            remaining = {t: p for t, p in check_repository(repository).items() if p}
            if remaining:
                raise DemoBuildError(f"after install: {remaining}")
            metrics["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            metrics["build_seconds"] = round(progress.elapsed(), 1)
            metrics["threads"] = threads
            write_metrics(repository, metrics)


# ----------------------------------------------------------------------------- the build


def build_demo(
    repository: Path | str,
    work_dir: Path | str = Path(".cache/demo"),
    force: bool = False,
    *,
    encoders: str = "pretrained",
    max_train_samples: int | None = None,
    baselines: bool = True,
    validate_parity: bool = True,
    threads: int | None = None,
    audio_encoder: str | None = None,
    data_dir: Path | str | None = None,
    out=None,
) -> BuildResult:
    """Make `repository` hold valid demo-classify / demo-ner / demo-vqa models; build only what is
    missing or broken (everything with `force`). `encoders="tiny"` + `max_train_samples` make it cheap.
    `data_dir`: an existing demo data set to train on (default: written to WORK_DIR/data)."""
    used_encoders = encoder_names(encoders, audio_encoder)  # ValueError for an unknown profile
    repository, work_dir = Path(repository), Path(work_dir)
    started = time.perf_counter()
    say = lambda msg: print(msg, file=out or sys.stdout, flush=True)  # noqa: E731

    problems = {task: ["--force"] for task in TASKS} if force else check_repository(repository)
    todo = [task for task in TASKS if problems[task]]
    if not todo:
        metrics = read_metrics(repository)
        say(f"demo models in {repository} are valid ({', '.join(DEMO_MODELS.values())}); "
            f"checked in {time.perf_counter() - started:.1f} s, nothing to build")
        if metrics:
            say(format_table(metrics))
        return BuildResult(repository, [], metrics, time.perf_counter() - started)
    for task in todo if not force else []:
        more = f" (+{len(problems[task]) - 1} more)" if len(problems[task]) > 1 else ""
        say(f"{DEMO_MODELS[task]}: {problems[task][0]}{more}")

    threads = threads or _pick_threads()
    baseline_runs = BASELINES if baselines and "classify" in todo else {}
    progress = Progress(1 + len(todo) + len(baseline_runs) + len(todo) + 1, out)
    say(f"building {', '.join(DEMO_MODELS[t] for t in todo)} into {repository} "
        f"({encoders} encoders, {threads} torch thread{'s' if threads > 1 else ''}, work dir {work_dir})")

    given = data_dir is not None
    data_dir = Path(data_dir) if given else work_dir / "data"
    with progress.stage(f"demo data -> {data_dir}"):
        if given or not ensure_demo_data(data_dir, todo):
            say("    (existing data set used)")

    metrics = read_metrics(repository) if not force else None
    if not metrics or metrics.get("profile") != encoders:
        metrics = {"profile": encoders, "models": {}}
    metrics["encoders"] = used_encoders
    runs = _train_runs(progress, todo, baseline_runs, data_dir, work_dir / "runs", metrics,
                       lambda task, modalities: run_settings(task, modalities, encoders, max_train_samples, threads,
                                                             audio_encoder))

    _export_and_install(progress, repository, runs, data_dir, validate_parity, say, metrics, threads)

    say("")
    say(format_table(metrics))
    say(f"\ndemo models ready in {repository} after {progress.elapsed():.1f} s "
        f"(metrics: {repository / METRICS_JSON}, {repository / METRICS_MD})")
    return BuildResult(repository, todo, metrics, time.perf_counter() - started, progress.timings)

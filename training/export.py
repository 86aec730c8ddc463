"""`mmserve export`: a training run -> `model_repository/NAME/VERSION/` (ONNX + TorchScript + manifest).

    mmserve export RUN_DIR --repository model_repository --name NAME [--version N]
                   [--formats onnx,torchscript] [--max-batch-size N] [--data DIR]

Steps, each in its own module:

1. load the run, LoRA adapters merged into the base weights, and real dev records (`export_source`)
2. export each format into a hidden temporary directory `NAME/.tmp-<uuid>` (`export_formats`;
   servers ignore names starting with ".", `model_repository`)
3. load every exported file *fresh* and compare it with eager PyTorch on real dev batches (batch
   1, 3 and up to 8; several sequence lengths; every allowed subset of modalities with the others
   masked out) (`parity`, shared with `mmserve validate`)
4. write the manifest with the parity figures and the sha256 of every file (`export_manifest`)
5. fsync and rename the directory into place (`model_repository`).

Any failure deletes the temporary directory: a crash never leaves a loadable half-written version.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

from models.spec import PreprocessSpec
from training.export_error import ExportError
from training.export_formats import FORMATS, export_example, export_wrapper, write_formats
from training.export_manifest import build_manifest
from training.export_source import dev_features, load_for_export, model_input_names
from training.model_repository import next_version, publish, refuse_existing, staging_directory
from training.parity import TOLERANCE, check_parity, parity_batches

__all__ = ["ExportError", "FORMATS", "TOLERANCE", "build_parser", "export", "main"]


def export(
    run_dir: Path | str,
    repository: Path | str,
    name: str,
    version: int | None = None,
    formats: Sequence[str] = FORMATS,
    *,
    max_batch_size: int = 32,
    data_dir: Path | str | None = None,
    exporter: str = "auto",
    tolerance: float = TOLERANCE,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Export a run into `repository/name/VERSION/` and return that directory. Raises ExportError."""
    say = log or (lambda msg: None)
    run_dir, model_dir = Path(run_dir), Path(repository) / name
    formats = _check_arguments(name, version, list(dict.fromkeys(formats)), max_batch_size)
    if version is not None:
        refuse_existing(model_dir / str(version))

    run = load_for_export(run_dir)
    names = model_input_names(run.model, run.config)
    pre, features = dev_features(run, Path(data_dir) if data_dir else None)
    batches = parity_batches(features, run.config.modalities, run.preprocess, pre.pad_id)
    example = export_example(batches, names)
    wrapper = export_wrapper(run.model, names)

    with staging_directory(model_dir) as tmp:
        format_info = write_formats(wrapper, example, names, run.config.task, tmp, formats, exporter, say)
        _copy_tokenizer(run.preprocess, run.directory, tmp)

        parity = check_parity(run, names, batches, tmp, formats, tolerance)
        worst = {f: max(r.max_abs_diff for r in parity if r.format == f) for f in formats}
        say("parity ok: " + ", ".join(f"{f} max abs diff {d:.2g}" for f, d in worst.items())
            + f" over {len(parity) // len(formats)} probes")

        # the version is decided last so two concurrent exports do not both wait on the same number
        chosen = version if version is not None else next_version(model_dir)
        build_manifest(run, name, chosen, names, example, max_batch_size=max_batch_size, formats=format_info,
                       parity=parity, directory=tmp).dump(tmp)
        return publish(tmp, model_dir / str(chosen))


def _check_arguments(name: str, version: int | None, formats: list[str], max_batch_size: int) -> list[str]:
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(f"unknown formats {bad or formats}: choose from {', '.join(FORMATS)}")
    if not name or name.startswith(".") or "/" in name or name in ("..",):
        raise ExportError(f"invalid model name {name!r}")
    if version is not None and version < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    if max_batch_size < 1:
        raise ExportError("--max-batch-size must be at least 1")
    return formats


def _copy_tokenizer(spec: PreprocessSpec, run_dir: Path, target: Path) -> None:
    if spec.text is not None:
        tokenizer = spec.text.tokenizer_file
        (target / tokenizer).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / tokenizer, target / tokenizer)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmserve export", description="Export a training run to a model repository.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--name", required=True)
    p.add_argument("--version", type=int, default=None, help="integer version (default: the next free one)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated: onnx,torchscript")
    p.add_argument("--max-batch-size", type=int, default=32, help="recommended maximum batch size (manifest)")
    p.add_argument("--data", type=Path, default=None, help="data set directory for parity (default: the run's)")
    p.add_argument("--onnx-exporter", choices=("auto", "legacy", "dynamo"), default="auto",
                   help="auto: legacy (fast), dynamo if legacy cannot export the graph")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from training.config import ConfigError

    args = build_parser().parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        target = export(args.run_dir, args.repository, args.name, args.version, formats,
                        max_batch_size=args.max_batch_size, data_dir=args.data, exporter=args.onnx_exporter,
                        log=lambda msg: print(msg, file=sys.stderr))
    except ExportError as exc:
        print(f"mmserve export: error: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # bad run dir or data set (training.data.DataError is one too)
        print(f"mmserve export: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"mmserve export: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"exported {args.run_dir} -> {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

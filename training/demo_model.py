"""`mmserve demo-model`: build the three demo models once, then reuse them.

    python -m training.demo_model --repository model_repository [--work-dir .cache/demo] [--force]

When `repository` already holds valid `demo-classify`, `demo-ner` and `demo-vqa` models (the
latest version of each: manifest parses, names and tasks match, every listed file has its
sha256), nothing is rebuilt: the check takes about a second. Otherwise, for each missing or
broken model only (`training.demo_build`):

    1. write the demo data set (training.demo_data) into WORK_DIR/data (reused when complete)
    2. train one fused model per task with the offline pretrained encoders: MiniLM-L6 text with
       LoRA adapters on its top layers, EfficientNet-Lite0 image (frozen), and the small log-mel
       CNN audio encoder trained from scratch (the recipe: `training.demo_recipe`)
    3. train the unimodal baselines of the classification task (text-only, image-only,
       audio-only): same code, same settings, one modality
    4. export each task model (ONNX + TorchScript, parity against eager PyTorch) into a hidden
       staging directory, validate it, then move it into `repository` (a crash never leaves a
       half-written model where the server looks)
    5. print the metrics table (fused vs each baseline) and write it to
       `repository/demo_metrics.json` and `repository/demo_metrics.md` (`training.demo_metrics`)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from training.demo_build import BuildResult, DemoBuildError, build_demo, check_model, check_repository
from training.demo_metrics import METRICS_JSON, METRICS_MD, format_table
from training.demo_recipe import DEMO_MODELS, ENCODER_PROFILES, TASKS
from training.export_error import ExportError

__all__ = ["DEMO_MODELS", "METRICS_JSON", "METRICS_MD", "TASKS", "BuildResult", "DemoBuildError", "build_demo",
           "build_parser", "check_model", "check_repository", "format_table", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmserve demo-model", description=__doc__.splitlines()[0].strip("` "))
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="model repository to fill")
    p.add_argument("--work-dir", type=Path, default=Path(".cache/demo"), help="demo data and training runs")
    p.add_argument("--force", action="store_true", help="rebuild even when valid demo models exist")
    p.add_argument("--encoders", choices=sorted(ENCODER_PROFILES), default="pretrained",
                   help="pretrained (the demo) or tiny (random-init, seconds; for tests)")
    p.add_argument("--audio-encoder", choices=["tiny", "whisper-tiny"], default=None,
                   help="override the audio encoder of the profile")
    p.add_argument("--max-train-samples", type=int, default=None, help="cap training records per run")
    p.add_argument("--no-baselines", action="store_true", help="skip the unimodal classify baselines")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the idle cores)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from training.config import ConfigError

    try:
        build_demo(args.repository, args.work_dir, args.force, encoders=args.encoders,
                   max_train_samples=args.max_train_samples, baselines=not args.no_baselines,
                   threads=args.threads, audio_encoder=args.audio_encoder)
    except ConfigError as exc:
        print(f"mmserve demo-model: error: {exc}", file=sys.stderr)
        return 2
    except (DemoBuildError, ExportError) as exc:
        print(f"mmserve demo-model: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

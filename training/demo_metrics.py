"""The demo build's metrics: one entry per trained run, the table (fused vs each baseline) printed at the
end, and its two files in the repository, `demo_metrics.json` and `demo_metrics.md`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_JSON = "demo_metrics.json"
METRICS_MD = "demo_metrics.md"
HEADER = ["model", "task", "modalities", "fusion", "metric", "dev", "test", "also (test)", "train s"]


def run_summary(result, settings: dict[str, Any], task: str) -> dict[str, Any]:
    """The metrics entry of one training run (`result`: what training.train.train returns)."""
    return {
        "task": task, "modalities": settings["modalities"], "fusion": settings["fusion"],
        "encoders": {m: settings[f"{m}_encoder"] for m in settings["modalities"]},
        "peft": settings.get("peft", "none"), "freeze_encoders": settings.get("freeze_encoders", False),
        "train_samples": settings.get("max_train_samples"), "epochs": settings["epochs"],
        "best_epoch": result.best_epoch, "metric": result.metric_name,
        "dev": result.dev, "test": result.test,
        "trainable_params": result.trainable_params, "total_params": result.total_params,
        "train_seconds": round(result.seconds, 1),
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def metrics_rows(metrics: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, entry in metrics.get("models", {}).items():
        test = entry.get("test") or {}
        dev = entry.get("dev") or {}
        metric = entry["metric"]
        extra = {"classify": "macro_f1", "ner": "precision", "vqa": None}[entry["task"]]
        rows.append([
            key, entry["task"], "+".join(entry["modalities"]),
            entry["fusion"] if len(entry["modalities"]) > 1 else "-",
            metric, _fmt(dev.get(metric)), _fmt(test.get(metric)),
            f"{extra} {_fmt(test.get(extra))}" if extra else "",
            f"{entry['train_seconds']:.0f}",
        ])
    return rows


def format_table(metrics: dict[str, Any], markdown: bool = False) -> str:
    rows = metrics_rows(metrics)
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEADER)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(HEADER), line(["-" * w for w in widths])] + [line(r) for r in rows])


def write_metrics(repository: Path, metrics: dict[str, Any]) -> None:
    (repository / METRICS_JSON).write_text(json.dumps(metrics, indent=2) + "\n")
    enc = metrics.get("encoders", {})
    md = [
        "# Demo model metrics", "",
        f"Built by `mmserve demo-model` ({metrics.get('profile')} encoders: text {enc.get('text_encoder')}, "
        f"image {enc.get('image_encoder')}, audio {enc.get('audio_encoder')}) on the demo data set "
        "(`mmserve demo-data`). `classify` asks whether the sound fits the picture (an XOR of two unimodal "
        "facts), so every unimodal baseline sits near chance and only fusion can solve it. "
        "Test split; NER is entity-level F1 (seqeval), VQA the VQA soft accuracy.", "",
        format_table(metrics, markdown=True), "",
    ]
    (repository / METRICS_MD).write_text("\n".join(md))


def read_metrics(repository: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(repository) / METRICS_JSON).read_text())
    except (OSError, ValueError):
        return None

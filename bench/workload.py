"""Workloads: which model (a version directory of a model repository) and which request bodies.

* tiny: built here through the real pipeline (demo data -> `train` with tiny encoders -> `export`),
  cached under bench/.cache/ (rebuilt when missing; `--rebuild` forces it).
* demo: model_repository/demo-classify (built by `make serve`). When it is missing the bench says so
  and skips it (building it takes minutes of CPU and belongs to `make serve`); `--demo-repo` points
  elsewhere.

Requests are real multipart bodies: the demo data set's photos (JPEG) and clips (WAV), text of varied
length (the record's sentence plus 0-3 extra sentences), pre-encoded once so the client only sends bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"

# the tiny model: the same small settings as tests/fixtures_training.py (HTTP overhead dominates)
TINY_TRAIN = dict(epochs=1, max_train_samples=96, max_eval_samples=40, batch_size=16, hidden_size=32,
                  image_size=32, audio_seconds=1.0, max_length=32, lr=3e-3, patience=0, seed=0, progress=False)

_EXTRA = ["The light was low and the wind kept changing direction all afternoon.",
          "Someone in the background was talking about the weather and the long drive home.",
          "It is hard to say what made the noise, but it repeated several times before stopping.",
          "Nobody expected the recording to be used for anything, so it was left unlabelled for months."]


@dataclass
class Workload:
    name: str  # "tiny" | "demo"
    model: str  # model name in the repository
    version_dir: Path  # repository/NAME/VERSION
    task: str = "classify"
    note: str = ""
    bodies: list[bytes] = field(default_factory=list)  # pre-encoded multipart bodies
    items: list[dict] = field(default_factory=list)  # the same requests as {text, image, audio} bytes
    content_type: str = ""

    @property
    def model_dir(self) -> Path:
        return self.version_dir.parent

    def repository_view(self) -> Path:
        """A repository holding only this model (a symlink), so the server loads nothing else."""
        view = CACHE / "repos" / self.name
        link = view / self.model
        view.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.resolve() == self.model_dir.resolve():
                return view
            link.unlink()
        link.symlink_to(self.model_dir.resolve(), target_is_directory=True)
        return view


def _latest_version(model_dir: Path) -> Path | None:
    if not model_dir.is_dir():
        return None
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()
                      and (p / "manifest.json").is_file())
    return model_dir / str(versions[-1]) if versions else None


def demo_data(log=print) -> Path:
    """The classify part of the demo data set (real photos and synthetic clips), cached."""
    out = CACHE / "data"
    if (out / "classify" / "dev.jsonl").is_file():
        return out
    from training.demo_data import write_demo_data

    log(f"bench: writing demo data to {out}")
    tmp = CACHE / f".data-{uuid.uuid4().hex}"
    write_demo_data(tmp, tasks=("classify",))
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def tiny_model(rebuild: bool = False, log=print, formats: tuple[str, ...] = ("onnx",)) -> Path:
    """Version directory of the tiny classify model: demo data -> train (tiny encoders) -> export (`formats`:
    ONNX, and TorchScript for --backend torchscript)."""
    repo = CACHE / "tiny-repo"
    found = None if rebuild else _latest_version(repo / "tiny-classify")
    if found is not None:
        from models.manifest import read_manifest

        try:  # a cached model from an older code version whose manifest no longer validates is rebuilt
            cached = list(read_manifest(found).formats)
            missing = set(formats) - set(cached)
            if not missing:
                return found
            log(f"bench: cached tiny model at {found} has no {sorted(missing)} export; rebuilding")
            formats = tuple(dict.fromkeys([*cached, *formats]))  # keep what it had: switching back needs no rebuild
        except Exception as exc:  # noqa: BLE001 - any unreadable manifest means "stale cache"
            log(f"bench: cached tiny model at {found} is stale ({type(exc).__name__}); rebuilding")
    data = demo_data(log)
    from training.config import TrainConfig
    from training.export import export
    from training.train import train

    run_dir = CACHE / "tiny-run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    if repo.exists():
        shutil.rmtree(repo)
    log("bench: training the tiny model (tiny text/image/audio encoders, 1 epoch)")
    train(TrainConfig(task="classify", data=str(data / "classify"), output=str(run_dir), **TINY_TRAIN))
    log(f"bench: exporting the tiny model ({', '.join(formats)})")
    return export(run_dir, repo, "tiny-classify", formats=list(formats), max_batch_size=64, log=log)


def demo_model(repo: Path | None) -> tuple[Path | None, str]:
    repo = Path(repo) if repo else ROOT / "model_repository"
    found = _latest_version(repo / "demo-classify")
    if found is None:
        return None, (f"demo model not found at {repo / 'demo-classify'} (build it with `make serve`, or pass "
                      "--demo-repo REPO holding demo-classify/VERSION): skipping the demo workload")
    return found, ""


def _multipart(fields: list[tuple[str, str | None, str | None, bytes]], boundary: str) -> bytes:
    parts = []
    for name, filename, ctype, data in fields:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        if filename:
            head += f'; filename="{filename}"'
        head += "\r\n"
        if ctype:
            head += f"Content-Type: {ctype}\r\n"
        parts.append(head.encode() + b"\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def build_requests(wl: Workload, count: int, log=print) -> None:
    """`count` distinct requests from the demo data's records that carry both an image and a clip."""
    from models.manifest import read_manifest

    data = demo_data(log) / "classify"
    manifest = read_manifest(wl.version_dir)
    mods = manifest.modality_names
    records = []
    for split in ("test", "dev", "train"):
        for line in (data / f"{split}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("image") and rec.get("audio"):
                records.append(rec)
    boundary = "mmservebench" + uuid.uuid4().hex[:16]
    wl.content_type = f"multipart/form-data; boundary={boundary}"
    wl.bodies, wl.items = [], []
    for i in range(count):
        rec = records[i % len(records)]
        text = " ".join([rec["text"], *_EXTRA[: i % (len(_EXTRA) + 1)]])  # 0..4 extra sentences
        item = {"text": text if "text" in mods else None,
                "image": (data / rec["image"]).read_bytes() if "image" in mods else None,
                "audio": (data / rec["audio"]).read_bytes() if "audio" in mods else None}
        fields = [("model", None, None, wl.model.encode())]
        if item["text"] is not None:
            fields.append(("text", None, None, item["text"].encode()))
        if item["image"] is not None:
            fields.append(("image", Path(rec["image"]).name, "image/jpeg", item["image"]))
        if item["audio"] is not None:
            fields.append(("audio", Path(rec["audio"]).name, "audio/wav", item["audio"]))
        wl.bodies.append(_multipart(fields, boundary))
        wl.items.append(item)


def resolve(names: list[str], *, demo_repo: Path | None, rebuild: bool, log=print,
            backend: str = "onnx") -> tuple[list[Workload], list[str]]:
    workloads, skipped = [], []
    # TorchScript alone for --backend torchscript: serving it needs no ONNX export (one thing fewer for another
    # torch, the device image's, to get right)
    formats = (backend,)
    for name in names:
        if name == "tiny":
            workloads.append(Workload("tiny", "tiny-classify", tiny_model(rebuild, log, formats),
                                      note="tiny encoders, text 32 tokens, 32x32 image, 1 s audio, hidden 32"))
        elif name == "demo":
            found, why = demo_model(demo_repo)
            if found is not None and backend != "onnx":
                from models.manifest import read_manifest

                if backend not in read_manifest(found).formats:
                    found, why = None, f"demo model at {found} has no {backend} export: skipping the demo workload"
            if found is None:
                log(f"bench: {why}")
                skipped.append(why)
            else:
                workloads.append(Workload("demo", "demo-classify", found, note=str(found)))
        else:
            raise SystemExit(f"bench: unknown workload {name!r} (tiny, demo)")
    return workloads, skipped


if __name__ == "__main__":  # python -m bench.workload: build the tiny model only
    print(tiny_model("--rebuild" in sys.argv))

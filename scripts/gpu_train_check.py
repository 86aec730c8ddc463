"""The training half of `make gpu-check`: a short training run on the GPU, in one go.

On a machine without an NVIDIA GPU it says so in one line and exits 0. With one, it
  1. builds the demo data's classify task (tiny, deterministic, made here: nothing downloaded) in a temporary
     directory,
  2. trains the classify task on cuda:0 with autocast (bf16 where supported) and with fp32,
  3. trains the same run twice on 2 GPUs under torchrun when the machine has 2 or more,
  4. checks every run finished, its dev metric, and that the run really used the GPU,
and writes bench/results/gpu-train.json + .md (wall and epoch seconds, dev/test metrics).
Safe to re-run: it writes only its temporary directory and the two report files. Every encoder is the tiny one,
built from its config (named explicitly: the pretrained ones ship in wheels too big for the offline device image).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"


def gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True, timeout=900)
    return time.perf_counter() - t0


def summary(run_dir: Path, seconds: float, name: str) -> dict:
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dev = json.loads((run_dir / "eval_dev.json").read_text())["metrics"]
    test = json.loads((run_dir / "eval_test.json").read_text())["metrics"]
    return {"name": name, "wall_s": round(seconds, 1), "epochs": len(history),
            "epoch_s": [h["seconds"] for h in history], "dev_accuracy": dev["accuracy"],
            "test_accuracy": test["accuracy"]}


def main() -> int:
    count = gpus()
    if count == 0:
        import shutil

        if shutil.which("nvidia-smi"):  # a GPU, but this torch cannot use it: say so rather than pass
            print("gpu-train-check: nvidia-smi sees a GPU but this torch has no CUDA; install a CUDA build of torch "
                  "into the environment (pip install torch==2.13.0 from an index with CUDA wheels)")
            return 1
        print("gpu-train-check: no NVIDIA GPU here; nothing to do")
        return 0
    import torch

    work = Path(tempfile.mkdtemp(prefix="mmserve-gpu-train-"))
    python = sys.executable
    subprocess.run([python, "-c", "import sys; from training.demo_data import write_demo_data; "
                    "write_demo_data(sys.argv[1], tasks=('classify',))", str(work / "data")], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    common = ["--task", "classify", "--data", str(work / "data" / "classify"), "--epochs", "8", "--patience", "0",
              "--lr", "3e-3", "--no-progress", "--device", "cuda",
              "--text-encoder", "tiny", "--image-encoder", "tiny", "--audio-encoder", "tiny"]
    results = []
    for precision in ("auto", "fp32"):
        out = work / f"run-{precision}"
        seconds = run([python, "-m", "training.cli", "train", *common, "--precision", precision, "--output", str(out)],
                      work / f"{precision}.log")
        results.append(summary(out, seconds, f"1 GPU, precision {precision}"))
    if count >= 2:
        torchrun = str(Path(python).with_name("torchrun"))
        out = work / "run-ddp"
        seconds = run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training.cli", "train", *common,
                       "--output", str(out)], work / "ddp.log")
        results.append(summary(out, seconds, "2 GPUs, torchrun DDP"))
    report = {"device": torch.cuda.get_device_name(0), "gpus": count, "bf16": torch.cuda.is_bf16_supported(),
              "torch": torch.__version__, "runs": results}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu-train.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# GPU training check ({report['device']}, {count} GPU(s), torch {report['torch']})", "",
             "| run | wall s | epochs | mean epoch s | dev accuracy | test accuracy |", "|---|---|---|---|---|---|"]
    for r in results:
        mean = sum(r["epoch_s"]) / len(r["epoch_s"])
        lines.append(f"| {r['name']} | {r['wall_s']} | {r['epochs']} | {mean:.2f} | {r['dev_accuracy']:.3f} | "
                     f"{r['test_accuracy']:.3f} |")
    (OUT / "gpu-train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = all(r["dev_accuracy"] >= 0.85 for r in results)
    print("gpu-train-check:", "ok" if ok else "FAILED: a run did not learn the demo task (dev accuracy < 0.85)")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

"""`make gpu-check` (scripts/gpu_check.py, issue 15 item 4) where no GPU is: one line and exit 0, writing nothing; its
plan (`--dry-run`) in order and inside 8 minutes; and the runner's own logic with real processes: a part that
overruns its time box is killed with its children and reported, a failing part does not stop the next, only a
failed CUDA-test part makes the exit status non-zero, and the report lists every part."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.runtime import cuda_device_count
from scripts import gpu_check
from scripts.gpu_check import Part

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def results_snapshot() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in (ROOT / "bench" / "results").glob("gpu*")}


@pytest.mark.skipif(cuda_device_count() > 0, reason="a GPU is here: make gpu-check would run for minutes")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    before = results_snapshot()
    p = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 1 and "no usable NVIDIA GPU" in p.stdout, p.stdout
    assert results_snapshot() == before  # nothing written


def test_the_dry_run_prints_the_plan_in_order_within_8_minutes_and_runs_nothing():
    before = results_snapshot()
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    names = re.findall(r"^  \d+\. ([\w-]+):", out, re.M)
    assert names == ["install", "cuda-tests", "training", "demo-model", "bench"]
    assert "-m pytest -m cuda tests/test_gpu.py" in out and "scripts/gpu_train_check.py" in out
    bench = next(line for line in out.splitlines() if line.strip().startswith("$") and " -m bench " in line)
    for arg in ("--device cuda", "--name gpu", "--workloads tiny,demo", "--systems limit,mmserve,nobatch,litserve",
                "--concurrency 1,32,64", "--requests", "--max-minutes"):
        assert arg in bench, arg
    budgets = [float(x) for x in re.findall(r"up to (\d+) s \(cap", out)]
    assert budgets and sum(budgets) <= 8 * 60  # even when every part takes its whole time box
    assert "onnxruntime-gpu[cuda,cudnn]==" in out and "torch==" in out  # what install may run
    assert results_snapshot() == before


def test_budgets_leave_every_later_part_its_minimum():
    parts = [Part("a", "", ["true"], cap_s=150, min_s=0), Part("b", "", ["true"], cap_s=120, min_s=60),
             Part("c", "", ["true"], cap_s=240, min_s=120), Part("d", "", ["true"], cap_s=100, min_s=50, skip="no")]
    assert gpu_check.budget(parts, 0, 465) == 150
    assert gpu_check.budget(parts, 0, 250) == 70  # b and c keep 180 (d is skipped: keeps nothing)
    assert gpu_check.budget(parts, 2, 100) == 100
    assert gpu_check.budget(parts, 1, 100) == 0
    assert gpu_check.command_for(Part("x", "", ["bench"], 240, 120, budget_flag="--max-minutes"), 225)[-2:] == [
        "--max-minutes", "3.0"]


def test_parts_are_time_boxed_and_a_failure_is_reported_not_fatal(tmp_path):
    py = sys.executable
    marker = tmp_path / "grandchild-alive"
    # a part whose child process outlives it unless the whole process group is killed
    overrun = [py, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                         f"'import time; time.sleep(3); open(r\"{marker}\", \"w\").close()']); time.sleep(60)"]
    parts = [
        Part("slow", "overruns its box", overrun, cap_s=1.5, min_s=0),
        Part("broken", "fails", [py, "-c", "import sys; print('boom'); sys.exit(3)"], cap_s=20, min_s=0),
        Part("cuda-tests", "passes", [py, "-c", "print('ok')"], cap_s=20, min_s=0, critical=True),
        Part("skipped", "not needed", [py, "-c", "raise SystemExit(9)"], cap_s=20, min_s=0, skip="already there"),
    ]
    t0 = time.monotonic()
    results = gpu_check.run_parts(parts, 60, tmp_path / "logs", say=lambda *a, **k: None)
    assert time.monotonic() - t0 < 20
    got = {r.name: r for r in results}
    assert [r.name for r in results] == ["slow", "broken", "cuda-tests", "skipped"]
    assert got["slow"].status == "timeout" and got["slow"].seconds < 10
    assert got["broken"].status == "failed" and "exit status 3" in got["broken"].note and "boom" in got["broken"].tail
    assert got["cuda-tests"].status == "passed" and got["skipped"].status == "skipped"
    assert gpu_check.exit_status(parts, results) == 0  # only the CUDA tests decide
    time.sleep(3.5)
    assert not marker.exists()  # the overrunning part's child was killed with it

    failing = [Part("cuda-tests", "", [py, "-c", "raise SystemExit(1)"], cap_s=20, min_s=0, critical=True)]
    assert gpu_check.exit_status(failing, gpu_check.run_parts(failing, 60, tmp_path / "logs",
                                                              say=lambda *a, **k: None)) == 1

    out = tmp_path / "results"
    gpu_check.write_report(results, "1 x Test GPU", out)
    md = (out / "gpu.md").read_text()
    for r in results:
        assert re.search(rf"^\| {r.name} \| {r.status} \| {r.seconds} \|", md, re.M), r.name
    assert "boom" in md  # a failed part's last lines
    data = __import__("json").loads((out / "gpu.json").read_text())
    assert [p["name"] for p in data["gpu_check"]["parts"]] == ["slow", "broken", "cuda-tests", "skipped"]


def test_the_report_joins_the_bench_output_of_the_same_run(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    started = time.time()
    (out / "gpu.md").write_text("# bench tables\n")
    (out / "gpu.json").write_text('{"name": "gpu", "workloads": [{"workload": "tiny"}]}')
    (out / "gpu-train.md").write_text("# training\n")
    bench = gpu_check.Result("bench", "passed", 100.0, 200.0, started=started - 1)
    gpu_check.write_report([bench], "1 x Test GPU", out)
    md = (out / "gpu.md").read_text()
    assert md.startswith("# bench tables") and "| bench | passed | 100.0 |" in md and "(gpu-train.md)" in md
    data = __import__("json").loads((out / "gpu.json").read_text())
    assert data["workloads"] == [{"workload": "tiny"}] and data["gpu_check"]["parts"][0]["name"] == "bench"
    # an older gpu.md (the bench did not run this time) is replaced, not appended to
    stale = gpu_check.Result("bench", "timeout", 5.0, 5.0, started=time.time() + 100)
    gpu_check.write_report([stale], "1 x Test GPU", out)
    assert "bench tables" not in (out / "gpu.md").read_text()

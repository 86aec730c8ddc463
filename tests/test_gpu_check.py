"""`make gpu-check` (scripts/gpu_check.py, issue 15 item 4) where no GPU is: one line and exit 0, writing nothing; its
plan (`--dry-run`) in order and inside 8 minutes; and the runner's own logic with real processes: a part that
overruns its time box is killed with its children and reported, a failing part does not stop the next, only a
failed CUDA-test part makes the exit status non-zero, and the report lists every part. Then the offline device image
(`--device-image`, docs/gpu-check.md) in a faked one: its plan (the carried wheels installed with --no-index into a
target, guards only where the image falls short, what is skipped and why), its recognition, a failed install
skipping the rest, the report's notes and the files copied to $OUT, and tests/test_gpu.py's TorchScript variants
rehearsed on CPU."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.runtime import cuda_device_count
from scripts import gpu_check
from scripts.gpu_check import Part
from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.test_gpu_oom import hooks  # noqa: F401 (fixture)

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
    assert names == ["install", "cuda-tests", "training", "demo-model", "bench", "frontend"]
    assert "-m pytest -m cuda tests/test_gpu.py" in out and "scripts/gpu_train_check.py" in out
    bench = next(line for line in out.splitlines() if line.strip().startswith("$") and " -m bench " in line)
    for arg in ("--device cuda", "--name gpu", "--workloads tiny,demo", "--systems limit,mmserve,nobatch,litserve",
                "--concurrency 1,32,64", "--requests", "--max-minutes"):
        assert arg in bench, arg
    frontend = next(line for line in out.splitlines() if line.strip().startswith("$") and " -m bench.frontend " in line)
    for arg in ("--name gpu-frontend", "--workers 1,2,4,8", "--seconds", "--budget-s"):
        assert arg in frontend, arg
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
    data = json.loads((out / "gpu.json").read_text())
    assert [p["name"] for p in data["gpu_check"]["parts"]] == ["slow", "broken", "cuda-tests", "skipped"]


def report_over(out: Path, files: dict[str, str], part: gpu_check.Result) -> tuple[str, dict]:
    """`files` (name -> text) written into `out` as a part of this run left them, then the report written over
    them for `part`: (gpu.md, gpu.json as read back)."""
    out.mkdir(exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    gpu_check.write_report([part], "1 x Test GPU", out)
    return (out / "gpu.md").read_text(), json.loads((out / "gpu.json").read_text())


def test_the_report_joins_the_bench_output_of_the_same_run(tmp_path):
    out = tmp_path / "results"
    bench = gpu_check.Result("bench", "passed", 100.0, 200.0, started=time.time() - 1)
    md, data = report_over(out, {"gpu.md": "# bench tables\n", "gpu-train.md": "# training\n",
                                 "gpu.json": '{"name": "gpu", "workloads": [{"workload": "tiny"}]}'}, bench)
    assert md.startswith("# bench tables") and "| bench | passed | 100.0 |" in md and "(gpu-train.md)" in md
    assert data["workloads"] == [{"workload": "tiny"}] and data["gpu_check"]["parts"][0]["name"] == "bench"
    # an older gpu.md (the bench did not run this time) is replaced, not appended to
    md, _ = report_over(out, {}, gpu_check.Result("bench", "timeout", 5.0, 5.0, started=time.time() + 100))
    assert "bench tables" not in md


def test_the_report_takes_in_the_front_end_ceiling_of_the_same_run(tmp_path):
    out = tmp_path / "results"
    frontend = gpu_check.Result("frontend", "passed", 60.0, 90.0, started=time.time() - 1)
    md, data = report_over(out, {  # one file: the device hands back at most 8
        "gpu-frontend.md": "# mmserve front-end ceiling: gpu-frontend\n\n| workers |\n",
        "gpu-frontend.json": '{"name": "gpu-frontend", "points": [{"workers": 1}]}'}, frontend)
    assert "## mmserve front-end ceiling: gpu-frontend" in md and md.index("| workers |") < md.index("| frontend |")
    assert data["frontend"]["points"] == [{"workers": 1}]
    # a front-end report of an earlier run stays out
    md, data = report_over(out, {}, gpu_check.Result("frontend", "timeout", 5.0, 5.0, started=time.time() + 100))
    assert "front-end ceiling" not in md and "frontend" not in data


# ------------------------------------------------------------------------------------ the offline device image
def fake_wheels(tmp_path: Path) -> Path:
    """A .whl folder as make gpu-wheels leaves it: one wheel always installed, two guards (one the image here
    satisfies, one it cannot), and one expectation this environment misses."""
    wheels = tmp_path / ".whl"
    wheels.mkdir()
    plan = {"wheels": [
        {"name": "fastapi", "version": "0.165.0", "file": "fastapi-0.165.0-py3-none-any.whl", "condition": None},
        {"name": "packaging", "version": "99.0", "file": "packaging-99.0-py3-none-any.whl", "condition": ">=1"},
        {"name": "not-in-any-image", "version": "1.0", "file": "not_in_any_image-1.0-py3-none-any.whl",
         "condition": ">=1"}],
        "expect": {"numpy": ">=1.26", "not-in-any-image-either": ""}}
    (wheels / "plan.json").write_text(json.dumps(plan))
    return wheels


def test_the_device_image_plan_installs_offline_and_says_what_is_skipped_and_why(tmp_path):
    before = results_snapshot()
    wheels, site, out = fake_wheels(tmp_path), tmp_path / "site", tmp_path / "out"
    p = subprocess.run([sys.executable, str(SCRIPT), "--device-image", "--dry-run", "--wheels", str(wheels),
                        "--site", str(site), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    out_text = p.stdout
    assert re.findall(r"^  \d+\. ([\w-]+):", out_text, re.M) == ["install", "cuda-tests", "training", "demo-model",
                                                                   "bench", "frontend"]
    assert re.search(r"^  1\. install: .*its failure fails gpu-check", out_text, re.M)
    assert re.search(r"^  4\. demo-model: .*skipped: .*84 MB", out_text, re.M)
    pip = next(line for line in out_text.splitlines() if " -m pip install " in line)
    for arg in ("--no-index", "--no-deps", f"--target {site}", f"{wheels.name}/fastapi-0.165.0-py3-none-any.whl",
                "not_in_any_image-1.0-py3-none-any.whl"):
        assert arg in pip, arg
    assert "packaging-99.0" not in pip  # a guard the image (here: this environment) satisfies
    assert re.search(r"packaging: the image's [\d.]+ satisfies >=1: its wheel is not installed", out_text)
    assert "not-in-any-image: the image has none, not >=1: installing 1.0" in out_text
    assert "WARNING: not-in-any-image-either: not in the image" in out_text
    assert f"PYTHONPATH={site}" in out_text
    assert "-m pytest -m cuda tests/test_gpu.py" in out_text and "scripts/gpu_train_check.py" in out_text
    bench = next(line for line in out_text.splitlines() if line.strip().startswith("$") and " -m bench " in line)
    for arg in ("--device cuda", "--backend torchscript", "--workloads tiny",
                "--systems limit,mmserve,nobatch,litserve", "--max-minutes"):
        assert arg in bench, arg
    frontend = next(line for line in out_text.splitlines() if " -m bench.frontend " in line)
    assert "--tiny-format torchscript" in frontend and "--workers 1,2,4,8" in frontend  # no ONNX export there
    assert "onnxruntime-gpu" in out_text and "64 MiB" in out_text  # why the ONNX CUDA parts do not run
    budgets = [float(x) for x in re.findall(r"up to (\d+) s \(cap", out_text)]
    assert budgets and sum(budgets) <= 8 * 60
    assert f"into {out}" in out_text and not out.exists() and not site.exists()
    assert results_snapshot() == before


def test_the_device_image_is_recognised_by_its_three_marks(tmp_path, monkeypatch):
    import importlib.metadata

    wheels = fake_wheels(tmp_path)
    checks = gpu_check.device_image_checks(wheels, root=tmp_path)
    assert checks["no .venv"] and checks["wheels in .whl (plan.json of make gpu-wheels)"]
    assert gpu_check.device_image_checks(wheels)["no .venv"] is False  # this checkout has one
    real = importlib.metadata.version
    for torch_version, cuda in (("2.11.0+cu130", True), ("2.13.0+cpu", False)):
        monkeypatch.setattr(importlib.metadata, "version", lambda n, v=torch_version: v if n == "torch" else real(n))
        assert gpu_check.torch_is_cuda_build() is cuda


@pytest.mark.skipif(cuda_device_count() > 0, reason="a GPU is here: the device-image run would run for minutes")
def test_the_device_image_mode_without_a_gpu_is_one_line_and_without_wheels_says_what_to_do(tmp_path):
    before = results_snapshot()
    p = subprocess.run([sys.executable, str(SCRIPT), "--device-image", "--wheels", str(fake_wheels(tmp_path)),
                        "--site", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.splitlines() == [
        "gpu-check: no usable NVIDIA GPU here (no CUDA driver or no device); nothing to do"], p.stdout + p.stderr
    p = subprocess.run([sys.executable, str(SCRIPT), "--device-image", "--wheels", str(tmp_path / "none")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "make gpu-wheels" in p.stdout and ".whl" in p.stdout
    assert results_snapshot() == before


def test_what_failed_to_import_before_the_install_imports_after_it(tmp_path, monkeypatch):
    site = tmp_path / "site"  # not there yet, as on a fresh device machine
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ImportError):
        __import__("gpu_check_probe_module")
    site.mkdir()
    (site / "gpu_check_probe_module.py").write_text("VALUE = 7\n")  # what pip --target does
    gpu_check.refresh_imports(site)
    try:
        assert __import__("gpu_check_probe_module").VALUE == 7
    finally:
        sys.modules.pop("gpu_check_probe_module", None)


def test_a_failed_install_skips_the_later_parts_with_its_reason_and_fails_the_check(tmp_path):
    py = sys.executable
    parts = [Part("install", "", [py, "-c", "raise SystemExit(1)"], cap_s=20, min_s=0, critical=True),
             Part("cuda-tests", "", [py, "-c", "print('never')"], cap_s=20, min_s=0, critical=True),
             Part("bench", "", [py, "-c", "print('never')"], cap_s=20, min_s=0)]
    after = lambda part, r: "the carried wheels did not install" if r.status != "passed" else None  # noqa: E731
    results = gpu_check.run_parts(parts, 60, tmp_path / "logs", say=lambda *a, **k: None, after=after)
    assert [(r.name, r.status) for r in results] == [("install", "failed"), ("cuda-tests", "skipped"),
                                                     ("bench", "skipped")]
    assert results[1].note == "the carried wheels did not install"
    assert gpu_check.exit_status(parts, results) == 1


def test_the_report_lists_what_was_not_run_and_the_results_are_copied_for_the_device(tmp_path):
    log = tmp_path / "cuda-tests.log"
    log.write_text("....s\nSKIPPED [1] tests/test_gpu.py:97: onnxruntime 1.30.0 (the CPU package) has no "
                   "CUDAExecutionProvider\n2 passed, 1 skipped\n")
    results = [gpu_check.Result("cuda-tests", "passed", 30.0, 150.0, log=str(log))]
    notes = [gpu_check.DEVICE_SKIPS["onnx-bench"], *gpu_check.pytest_skips(results)]
    assert notes[1] == ("skipped test tests/test_gpu.py:97: onnxruntime 1.30.0 (the CPU package) has no "
                        "CUDAExecutionProvider")
    res = tmp_path / "results"
    gpu_check.write_report(results, "1 x Test GPU, offline device image", res, notes)
    md = (res / "gpu.md").read_text()
    assert "Not run, or run differently, here:" in md and "* skipped test tests/test_gpu.py:97" in md
    assert json.loads((res / "gpu.json").read_text())["gpu_check"]["notes"] == notes
    (res / "gpu-train.md").write_text("# training\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "bench.log").write_text("bench log\n")
    out = tmp_path / "OUT"
    copied = gpu_check.export_results(out, res, (logs, tmp_path / "missing"))
    assert copied == ["gpu.md", "gpu.json", "gpu-train.md", "gpu-check-logs.tar.gz"] and len(copied) <= 8
    assert (out / "gpu.md").read_text() == md
    import tarfile

    with tarfile.open(out / "gpu-check-logs.tar.gz") as tar:
        assert tar.getnames() == ["logs/bench.log"]


def test_the_device_runs_cuda_variants_rehearsed_on_cpu(app_repository, hooks, tmp_path):  # noqa: F811
    """tests/test_gpu.py's TorchScript variants (its generic model.pt, the fault-hook split raising torch's
    OutOfMemoryError) on CPU: the test logic the device run depends on, checked where no GPU is."""
    pytest.importorskip("torch")
    import shutil
    import threading

    from tests.test_app_api import make_client, wait_ready
    from tests.test_gpu import add_torchscript
    from tests.test_gpu_oom import TEXTS, assert_same, model_view, oom_above

    repo = tmp_path / "repo"
    shutil.copytree(app_repository / "tiny-classify", repo / "tiny-classify")
    add_torchscript(repo / "tiny-classify" / "1")
    seen: list[int] = []
    with make_client(repo, device="cpu", backend="torchscript", max_batch_size=32, max_delay_ms=2) as c:
        wait_ready(c)
        assert (model_view(c)["backend"], model_view(c)["provider"]) == ("torchscript", "torch-cpu")
        singles = [c.post("/v1/classify", json={"text": t, "top_k": 3}).json() for t in TEXTS]
        ref = c.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in TEXTS], "top_k": 3}).json()
        for got, want in zip(ref["results"], singles):  # padding to a batch's longest text changes nothing
            assert_same(got, want)
        assert len({tuple(p["score"] for p in s["predictions"]) for s in singles}) > 1  # inputs matter
        hooks(oom_above(3, seen, threading.Lock(), torch_style=True))
        r = c.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in TEXTS], "top_k": 3})
        assert [x["status"] for x in r.json()["results"]] == [200] * 12
        for got, want in zip(r.json()["results"], ref["results"]):
            assert_same(got, want)
        assert seen == [12, 6, 3, 3, 6, 3, 3]
        assert (model_view(c)["max_batch_size"], model_view(c)["batch_size_source"]) == (
            3, "lowered after out-of-memory at 12")


def test_the_onnx_cuda_tests_name_the_missing_provider_as_their_skip_reason(monkeypatch):
    import onnxruntime

    from tests import test_gpu

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    why = test_gpu._ort_cuda_skip()
    assert "has no CUDAExecutionProvider" in why and "onnxruntime-gpu" in why
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert test_gpu._ort_cuda_skip() is None  # the package has it: the tests run (and fail if CUDA cannot start)

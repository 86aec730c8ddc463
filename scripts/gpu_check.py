"""`make gpu-check`: everything that needs a GPU, in one go, under 8 minutes on one H100 / H200; safe to re-run.

Without a usable NVIDIA GPU (no driver, or `app.runtime.cuda_device_count() == 0`) it prints one line and exits 0.
With one, it runs these parts in order, each time-boxed (its share of the 8 minutes: a part gets at most its cap and
always leaves the later parts their minimum); a part that fails or runs out of time is reported and the next one runs:

  install     what the GPU paths need in this environment, only where missing: the CUDA libraries of
              onnxruntime-gpu (`onnxruntime-gpu[cuda,cudnn]` at the installed version) when its CUDA provider cannot
              start, and the CUDA build of torch when the CPU build is installed (same version; GPU_CHECK_PIP_ARGS adds
              pip arguments, e.g. `--index-url https://download.pytorch.org/whl/cu130`). What failed is reported.
  cuda-tests  `pytest -m cuda tests/test_gpu.py` (the CUDA provider really used, I/O binding, CPU parity,
              TorchScript on CUDA, out-of-memory split under a real arena limit)
  training    scripts/gpu_train_check.py: short training runs on the GPU -> bench/results/gpu-train.{json,md}
  demo-model  builds model_repository/demo-classify when it is missing (the bench's demo workload; skipped if there)
  bench       `python -m bench --device cuda` on the tiny and demo models: the in-process limit, mmserve with dynamic
              batching and with batching off, LitServe on the same GPU, concurrency 1, 32 and 64
              -> bench/results/gpu.{md,json,png}
  frontend    `python -m bench.frontend`: the front-end ceiling, MMSERVE_WORKERS 1, 2, 4 and 8 on a no-op model (the
              tiny model's preprocessing, no compute: on the CPU, no GPU needed, but this is the machine with the
              cores), server on cores 4-15 and 4 load-generator processes on 0-3, a few seconds per worker count
              -> bench/results/gpu-frontend.{md,json,png}, its table also in gpu.md and gpu.json ("frontend")

Then bench/results/gpu.md (and gpu.json under "gpu_check") list each part's result and seconds and link the training
report. Exit status: non-zero only when a CUDA test failed (or the CUDA tests could not finish). `--dry-run` prints
the plan and its commands and touches nothing (with or without a GPU).

`--device-image` (also chosen by itself where there is no .venv, python3's torch is a CUDA build and .whl/ holds
the wheels of `make gpu-wheels`): the offline GPU machine of the `run` tool (docs/gpu-check.md). Nothing can be
downloaded there, so the parts are
  install     the carried wheels (.whl/plan.json) into --site (default /tmp/site) with `pip install --no-index
              --no-deps --target`, then PYTHONPATH for every later part; checks the image's own packages against
              what the carried ones need and imports the app once; its failure fails gpu-check
  cuda-tests  `pytest -m cuda tests/test_gpu.py`: what runs without onnxruntime-gpu (TorchScript on CUDA, the
              out-of-memory split through the fault hook on TorchScript, DEVICE=cuda refused without a device); the
              ONNX CUDA provider tests are skipped, each with its reason (the image's onnxruntime is the CPU package
              and onnxruntime-gpu's wheel is over what a call carries)
  training    scripts/gpu_train_check.py (demo data, tiny encoders: nothing pretrained)
  demo-model  skipped: its pretrained encoders' wheel (84 MB) cannot travel
  bench       `python -m bench --device cuda --backend torchscript` on the tiny model (limit, mmserve with and
              without batching, LitServe, all on TorchScript on the GPU)
  frontend    the front-end ceiling as above (the image's onnxruntime runs the no-op model on the CPU; the tiny model
              it wraps is the bench's TorchScript export)
and the reports (gpu.md / gpu.json / gpu.png, gpu-train.md / .json, the logs as gpu-check-logs.tar.gz) are copied
into --out (default $OUT, where the device hands files back).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
LOGS = ROOT / ".cache" / "gpu-check"
TOTAL_S = 465.0  # 7 min 45 s for the parts; the report is written in the rest of the 8 minutes
DEMO_MODEL = ROOT / "model_repository" / "demo-classify"
WHEELS_DIR = ROOT / ".whl"  # make gpu-wheels
SITE = Path("/tmp/site")  # where the device image gets the carried wheels
BENCH_LOGS = ROOT / "bench" / ".cache" / "logs" / "gpu"  # python -m bench --name gpu
FRONTEND = "gpu-frontend"  # python -m bench.frontend --name gpu-frontend: bench/results/gpu-frontend.{md,json,png}
FRONTEND_LOGS = ROOT / "bench" / ".cache" / "logs" / FRONTEND


@dataclass
class Part:
    """One time-boxed step: `command` runs in its own process group (killed whole when its time is up)."""

    name: str
    what: str
    command: list[str]
    cap_s: float  # the most this part may take
    min_s: float  # what the parts before it must leave it
    critical: bool = False  # its failure makes the exit status non-zero (the CUDA tests)
    skip: str | None = None  # why it does not run (decided when the plan is made)
    budget_flag: str | None = None  # an option of `command` that takes the part's time (see command_for)


@dataclass
class Result:
    name: str
    status: str  # passed | failed | timeout | skipped
    seconds: float
    budget_s: float
    note: str = ""
    log: str | None = None
    tail: list[str] = field(default_factory=list)
    started: float = 0.0  # time.time() when it began


def python() -> str:
    return sys.executable


def plan(gpus: int) -> list[Part]:
    py = python()
    cpus = os.cpu_count() or 2
    bench = [py, "-m", "bench", "--device", "cuda", "--name", "gpu", "--out-dir", str(RESULTS),
             "--workloads", "tiny,demo", "--systems", "limit,mmserve,nobatch,litserve", "--concurrency", "1,32,64",
             "--requests", "300", "--note", f"make gpu-check on {gpus} GPU(s)"]
    if cpus >= 8:  # a GPU serves faster than one client core can load it: 4 cores for the load generator
        bench += ["--client-cpus", "0-3", "--server-cpus", f"4-{cpus - 1}"]
    parts = [
        Part("install", "CUDA libraries for onnxruntime-gpu and the CUDA build of torch, where missing",
             [py, str(Path(__file__).resolve()), "--install-only"], cap_s=150, min_s=0, budget_flag="--budget-s"),
        Part("cuda-tests", "pytest -m cuda (tests/test_gpu.py)",
             [py, "-m", "pytest", "-m", "cuda", "tests/test_gpu.py", "-q", "-rs", "-p", "no:cacheprovider"],
             cap_s=120, min_s=60, critical=True),
        Part("training", "short training runs on the GPU (scripts/gpu_train_check.py)",
             [py, "scripts/gpu_train_check.py"], cap_s=120, min_s=60),
        Part("demo-model", "build model_repository/demo-classify for the bench's demo workload",
             [py, "-m", "training.cli", "demo-model", "--repository", "model_repository", "--work-dir", ".cache/demo",
              "--no-baselines"], cap_s=150, min_s=0,
             skip="model_repository/demo-classify is there" if DEMO_MODEL.is_dir() else None),
        Part("bench", "serving benchmark on the GPU (python -m bench --device cuda)", bench, cap_s=240, min_s=120,
             budget_flag="--max-minutes"),
        frontend_part(py, cpus, f"make gpu-check on {gpus} GPU(s)"),
    ]
    return parts


def frontend_part(py: str, cpus: int, note: str, *extra: str) -> Part:
    """The front-end ceiling (bench.frontend): no GPU needed, but the device machine is the one with the cores for
    WORKERS 1 to 8 and a load generator that keeps up. 4 s per worker count keeps it near a minute; it skips a count
    its --budget-s cannot hold, and the GPU parts before it keep their time."""
    command = [py, "-m", "bench.frontend", "--name", FRONTEND, "--out-dir", str(RESULTS), "--workers", "1,2,4,8",
               "--seconds", "4", "--note", note, *extra]
    if cpus >= 8:  # the server on the most cores, 4 load-generator processes on the rest
        command += ["--client-cpus", "0-3", "--server-cpus", f"4-{cpus - 1}", "--clients", "4"]
    return Part("frontend", "front-end ceiling, WORKERS 1-8 on a no-op model on the CPU (python -m bench.frontend)",
                command, cap_s=90, min_s=60, budget_flag="--budget-s")


def budget(parts: list[Part], index: int, left_s: float) -> float:
    """Part `index`'s time: its cap, less what the later (running) parts must keep as their minimum."""
    reserve = sum(p.min_s for p in parts[index + 1:] if p.skip is None)
    return max(0.0, min(parts[index].cap_s, left_s - reserve))


def command_for(part: Part, budget_s: float) -> list[str]:
    if part.budget_flag == "--max-minutes":  # the bench stops starting new points in time to write its report
        return part.command + [part.budget_flag, f"{max(0.5, (budget_s - 45) / 60):.1f}"]
    if part.budget_flag:  # seconds
        return part.command + [part.budget_flag, f"{budget_s:.0f}"]
    return part.command


def run_part(part: Part, budget_s: float, log_dir: Path) -> Result:
    """Run one part in its own session, killed (the whole process group) when `budget_s` has passed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{part.name}.log"
    if part.skip:
        return Result(part.name, "skipped", 0.0, budget_s, part.skip)
    if budget_s < 1:
        return Result(part.name, "skipped", 0.0, budget_s, "no time left in the 8 minutes")
    cmd = command_for(part, budget_s)
    started = time.time()
    t0 = time.monotonic()
    with open(log, "w") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
        try:
            rc = proc.wait(timeout=budget_s)
            status = "passed" if rc == 0 else "failed"
            note = "" if rc == 0 else f"exit status {rc}"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            status, note = "timeout", f"stopped after its {budget_s:.0f} s"
    seconds = time.monotonic() - t0
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return Result(part.name, status, round(seconds, 1), round(budget_s, 1), note, str(log), tail, started)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def run_parts(parts: list[Part], total_s: float, log_dir: Path, say=print, after=None) -> list[Result]:
    """Each part in turn within `total_s`. `after(part, result)` may return a reason to skip every later part (the
    device image's install failed, say)."""
    start = time.monotonic()
    results = []
    stop = None
    for i, part in enumerate(parts):
        b = budget(parts, i, total_s - (time.monotonic() - start))
        if stop:
            results.append(Result(part.name, "skipped", 0.0, round(b, 1), stop))
            say(f"gpu-check: [{part.name}] skipped: {stop}", flush=True)
            continue
        say(f"gpu-check: [{part.name}] {part.what} (up to {b:.0f} s)", flush=True)
        r = run_part(part, b, log_dir)
        say(f"gpu-check: [{part.name}] {r.status} in {r.seconds:.1f} s" + (f": {r.note}" if r.note else ""),
            flush=True)
        results.append(r)
        if after is not None:
            stop = after(part, r)
    return results


def exit_status(parts: list[Part], results: list[Result]) -> int:
    critical = {p.name for p in parts if p.critical}
    return 1 if any(r.name in critical and r.status in ("failed", "timeout") for r in results) else 0


# ------------------------------------------------------------------------------------ report
def report_markdown(results: list[Result], device: str, out_dir: Path, notes: list[str] | None = None) -> str:
    lines = [f"## GPU check (`make gpu-check`, {device})", "",
             "| part | result | seconds | time box s | note |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds} | {r.budget_s:.0f} | {r.note} |")
    lines += ["", f"Total {sum(r.seconds for r in results):.0f} s. Training: "
              + ("[gpu-train.md](gpu-train.md)" if (out_dir / "gpu-train.md").is_file() else "no report (see above)")
              + ". Serving: the bench's tables above"
              + ("" if (out_dir / "gpu.json").is_file() else " (none: the bench did not finish)") + "."]
    if notes:
        lines += ["", "Not run, or run differently, here:", "", *[f"* {n}" for n in notes]]
    for r in results:
        if r.status in ("failed", "timeout") and r.tail:
            lines += ["", f"<details><summary>{r.name}: last lines of {Path(r.log or '').name}</summary>", "",
                      "```", *r.tail, "```", "</details>"]
    return "\n".join(lines) + "\n"


def written_by(results: list[Result], part: str, path: Path) -> bool:
    """`path` was written by `part` in this run, not left there by an earlier one."""
    ran = [r for r in results if r.name == part and r.status != "skipped"]
    return bool(ran) and path.is_file() and path.stat().st_mtime >= ran[0].started


def write_report(results: list[Result], device: str, out_dir: Path, notes: list[str] | None = None) -> None:
    """Add the parts to gpu.md / gpu.json when the bench wrote them in this run, else write them alone (an older
    gpu.md of another run is replaced, never mixed in). The front-end ceiling of this run goes in too (its table in
    gpu.md, its report under "frontend" in gpu.json): the device hands back at most 8 files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "gpu.md", out_dir / "gpu.json"
    fresh = written_by(results, "bench", md)
    front_md, front_js = out_dir / f"{FRONTEND}.md", out_dir / f"{FRONTEND}.json"
    front = written_by(results, "frontend", front_js) and front_md.is_file()
    sections = ([front_md.read_text().replace("# ", "## ", 1).rstrip("\n")] if front else []) + [
        report_markdown(results, device, out_dir, notes)]
    if fresh:
        md.write_text("\n\n".join([md.read_text().rstrip("\n"), *sections]))
    else:
        md.write_text("\n\n".join(["# GPU check\n\nNo serving benchmark from this run.", *sections]))
    data = json.loads(js.read_text()) if fresh and js.is_file() else {"name": "gpu", "workloads": []}
    if front:
        data["frontend"] = json.loads(front_js.read_text())
    data["gpu_check"] = {"device": device, "parts": [asdict(r) for r in results], "notes": notes or []}
    js.write_text(json.dumps(data, indent=1) + "\n")


# ------------------------------------------------------------------------------------ install
def _probe(code: str) -> tuple[bool, str]:
    """Run `code` in a fresh interpreter: (it exited 0, its last output line)."""
    try:
        p = subprocess.run([python(), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, "probe timed out"
    lines = (p.stdout + p.stderr).strip().splitlines()
    return p.returncode == 0, lines[-1] if lines else ""


ORT_PROBE = """
import tempfile, onnx, onnxruntime as ort
from onnx import helper, TensorProto
from app.runtime import preload_cuda_libraries
g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
path = tempfile.mktemp(suffix=".onnx"); onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
preload_cuda_libraries()
s = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print(s.get_providers()[0]); assert s.get_providers()[0] == "CUDAExecutionProvider"
"""
TORCH_PROBE = "import torch; print(torch.__version__, torch.version.cuda); assert torch.cuda.is_available()"


WHEELS = LOGS / "wheels"  # downloads kept between runs: a re-run after a time-out installs without downloading
INSTALL_RESERVE_S = 60  # an install step (not a download) starts only with this much of the part's time left


def pip(verb: str, *args: str) -> list[str]:
    extra = shlex.split(os.environ.get("GPU_CHECK_PIP_ARGS", ""))
    return [python(), "-m", "pip", verb, "--disable-pip-version-check", "--retries", "1", "--timeout", "30", *args,
            *extra]


def install_commands() -> list[tuple[str, str, list[tuple[str, list[str]]]]]:
    """(what, probe code, [(download | install, pip command)] to run when the probe fails). Downloads go to WHEELS
    first: stopping one at the time box harms nothing, whereas a `pip install` cut in the middle of replacing a
    package could leave it broken; install steps therefore only start with INSTALL_RESERVE_S left."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name).split("+")[0]
        except PackageNotFoundError:
            return None

    ort, torch = installed("onnxruntime-gpu"), installed("torch")
    local = ["--no-index", "--find-links", str(WHEELS)]
    ort_spec = f"onnxruntime-gpu[cuda,cudnn]=={ort}" if ort else "onnxruntime-gpu[cuda,cudnn]"
    torch_spec = f"torch=={torch}" if torch else "torch"
    return [
        ("onnxruntime CUDA provider", ORT_PROBE,
         [("download", pip("download", "-d", str(WHEELS), ort_spec)), ("install", pip("install", *local, ort_spec))]),
        # the CPU build's 2.13.0+cpu satisfies ==2.13.0, hence --force-reinstall of the wheel alone; then its
        # dependencies (the nvidia-* CUDA libraries), which only add packages
        ("torch with CUDA", TORCH_PROBE,
         [("download", pip("download", "--no-deps", "-d", str(WHEELS), torch_spec)),
          ("install", pip("install", "--force-reinstall", "--no-deps", *local, torch_spec)),
          ("install", pip("install", torch_spec))]),
    ]


def install(budget_s: float) -> int:
    """The install part (`--install-only`): probe, install what is missing, probe again. Exit 1 when something is
    still missing (the later parts run regardless and show what works)."""
    deadline = time.monotonic() + budget_s
    WHEELS.mkdir(parents=True, exist_ok=True)
    missing = []
    for what, probe, commands in install_commands():
        ok, out = _probe(probe)
        if ok:
            print(f"install: {what}: already works ({out})")
            continue
        print(f"install: {what}: not usable yet; installing")
        for kind, cmd in commands:
            if kind == "install" and deadline - time.monotonic() < INSTALL_RESERVE_S:
                print(f"install: {what}: too little time left to install safely; re-run make gpu-check (downloads "
                      f"are kept in {WHEELS})")
                break
            print("$ " + shlex.join(cmd), flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                print(f"install: {what}: pip failed")
                break
        ok, out = _probe(probe)
        print(f"install: {what}: {'works now' if ok else 'STILL NOT USABLE'} ({out})")
        if not ok:
            missing.append(what)
    ok, out = _probe("import torch, onnxruntime.capi.build_and_package_info as b; print(torch.version.cuda, b.cuda_version)")
    if ok and out.split()[0] != "None" and out.split()[0].split(".")[0] != out.split()[-1].split(".")[0]:
        print(f"install: WARNING: torch is built for CUDA {out.split()[0]} and onnxruntime-gpu for CUDA "
              f"{out.split()[-1]}: they may load conflicting CUDA libraries into one process (set GPU_CHECK_PIP_ARGS "
              "to an index with a matching torch build)")
    if missing:
        print("install: not usable: " + ", ".join(missing))
    return 1 if missing else 0


# ------------------------------------------------------------------------------------ the device image
def _wheels():
    from scripts import gpu_wheels  # packaging + stdlib: importable there before anything is installed

    return gpu_wheels


def torch_is_cuda_build() -> bool:
    """From the metadata alone (importing torch takes seconds): a +cuXXX build or the CUDA runtime's wheel beside it."""
    from importlib.metadata import PackageNotFoundError, distributions, version

    try:
        local = version("torch").partition("+")[2]
    except PackageNotFoundError:
        return False
    if local.startswith("cu"):
        return True
    return not local and any((d.metadata["Name"] or "").lower().startswith("nvidia-cuda-runtime")
                             for d in distributions())


def device_image_checks(wheels: Path = WHEELS_DIR, root: Path = ROOT) -> dict[str, bool]:
    return {"no .venv": not (root / ".venv").exists(),
            "wheels in .whl (plan.json of make gpu-wheels)": (wheels / "plan.json").is_file(),
            "python3 with a CUDA build of torch": torch_is_cuda_build()}


def use_site(site: Path) -> None:
    """The carried wheels' target first on the path, for this process (after the install) and every part."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)] + (
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    for p in (str(ROOT), str(site)):
        if p not in sys.path:
            sys.path.insert(0, p)


def refresh_imports(site: Path) -> None:
    """After the install part filled `site`: an import that failed before must look again (a path entry that did not
    exist is cached as None, and a directory's listing is cached too)."""
    import importlib

    sys.path_importer_cache.pop(str(site), None)
    importlib.invalidate_caches()


def gpu_count_after_install(site: Path) -> int:
    refresh_imports(site)
    return gpu_count()


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def device_wheels(wheels: Path, site: Path) -> tuple[list[dict], list[str], list[str]]:
    """(wheels to install, a line per guard, the image's packages falling short) for this interpreter's image."""
    gw = _wheels()
    plan = gw.read_plan(wheels)
    image = gw.installed_versions(exclude=site)
    chosen, notes = gw.wheels_to_install(plan, image)
    return chosen, notes, gw.expectation_problems(plan, image)


DEVICE_SKIPS = {
    "onnx-cuda": "ONNX on the CUDA provider (the provider and I/O binding, the real arena limit, the fault-hook split "
                 "on ONNX): the image's onnxruntime is the CPU package, and onnxruntime-gpu's wheel is far over the "
                 "64 MiB a device call carries",
    "demo-model": "the demo model: its pretrained encoders come in an 84 MB wheel, over the 64 MiB a device call "
                  "carries; the bench serves the tiny model only",
    "onnx-bench": "the bench on ONNX: onnxruntime-gpu cannot travel; limit, mmserve and LitServe all run TorchScript "
                  "on the GPU (--backend torchscript)",
}
# what the carried wheels must make importable (its failure fails the install part), and the image's torch (a line)
IMPORT_PROBE = ("import app.main, app.grpc_server, app.runtime, tritonclient.grpc, soundfile, uvicorn, httptools, "
                "litserve, pydantic, fastapi; print('imports ok: fastapi', fastapi.__version__, 'pydantic', "
                "pydantic.VERSION)")
TORCH_PROBE_LINE = ("import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', "
                    "torch.cuda.is_available(), 'devices', torch.cuda.device_count())")


def install_wheels(wheels: Path, site: Path) -> int:
    """The device image's install part (`--install-wheels`): the carried wheels into `site`, offline; then the
    image's own packages against what the carried ones need (reported), and one import of the app with them."""
    chosen, notes, short = device_wheels(wheels, site)
    for line in notes:
        print(f"install: {line}")
    cmd = _wheels().install_command(python(), Path(_rel(wheels)), chosen, site)
    print("$ " + shlex.join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        print("install: pip could not install the carried wheels")
        return 1
    for line in short:
        print(f"install: WARNING: {line}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    p = subprocess.run([python(), "-c", IMPORT_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    print((p.stdout + p.stderr).strip())
    if p.returncode != 0:
        print("install: the app does not import with the carried wheels")
        return 1
    t = subprocess.run([python(), "-c", TORCH_PROBE_LINE], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    print((t.stdout + t.stderr).strip().splitlines()[-1] if (t.stdout + t.stderr).strip() else "torch: no output")
    print(f"install: {len(chosen)} wheels in {site}")
    return 0


def device_plan(wheels: Path, site: Path, gpus: int | None) -> list[Part]:
    py = python()
    cpus = os.cpu_count() or 2
    bench = [py, "-m", "bench", "--device", "cuda", "--backend", "torchscript", "--name", "gpu",
             "--out-dir", str(RESULTS), "--workloads", "tiny", "--systems", "limit,mmserve,nobatch,litserve",
             "--concurrency", "1,32,64", "--requests", "300",
             "--note", "make gpu-check on the offline device image: TorchScript on CUDA, tiny model"]
    if cpus >= 8:
        bench += ["--client-cpus", "0-3", "--server-cpus", f"4-{cpus - 1}"]
    return [
        Part("install", f"the carried wheels ({_rel(wheels)}) into {site}, offline",
             [py, str(Path(__file__).resolve()), "--install-wheels", "--wheels", str(wheels), "--site", str(site)],
             cap_s=90, min_s=0, critical=True),
        Part("cuda-tests", "pytest -m cuda (tests/test_gpu.py) without onnxruntime-gpu",
             [py, "-m", "pytest", "-m", "cuda", "tests/test_gpu.py", "-q", "-rs", "-p", "no:cacheprovider"],
             cap_s=150, min_s=60, critical=True),
        Part("training", "short training runs on the GPU (scripts/gpu_train_check.py, tiny encoders)",
             [py, "scripts/gpu_train_check.py"], cap_s=120, min_s=60),
        Part("demo-model", "the demo model", [], cap_s=0, min_s=0, skip=DEVICE_SKIPS["demo-model"]),
        Part("bench", "serving benchmark on the GPU, TorchScript (python -m bench --device cuda --backend torchscript)",
             bench, cap_s=240, min_s=120, budget_flag="--max-minutes"),
        frontend_part(py, cpus, "make gpu-check on the offline device image", "--tiny-format", "torchscript"),
    ]


def pytest_skips(results: list[Result]) -> list[str]:
    """The CUDA tests' skip lines (pytest -rs), from the part's log."""
    out = []
    for r in results:
        if r.name == "cuda-tests" and r.log and Path(r.log).is_file():
            for line in Path(r.log).read_text(errors="replace").splitlines():
                m = re.match(r"SKIPPED \[\d+\] (.+)", line.strip())
                if m:
                    out.append(f"skipped test {m.group(1)}")
    return out


OUT_FILES = ("gpu.md", "gpu.json", "gpu.png", "gpu-train.md", "gpu-train.json")


def export_results(out: Path, results_dir: Path = RESULTS,
                   logs: tuple[Path, ...] = (LOGS, BENCH_LOGS, FRONTEND_LOGS)) -> list[str]:
    """Copy the reports into `out` (the device hands back at most 8 files from $OUT) and the logs as one archive."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in OUT_FILES:
        if (results_dir / name).is_file():
            shutil.copy2(results_dir / name, out / name)
            copied.append(name)
    archive = out / "gpu-check-logs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for d in logs:
            for f in sorted(Path(d).glob("*.log")) if Path(d).is_dir() else []:
                tar.add(f, arcname=f"{Path(d).name}/{f.name}")
    copied.append(archive.name)
    return copied


def main_device_image(args) -> int:
    if not (args.wheels / "plan.json").is_file():
        print(f"gpu-check: --device-image needs the carried wheels: no {args.wheels / 'plan.json'} (run `make "
              "gpu-wheels` on the machine that sends the tree, and name .whl in the call's carry)")
        return 2
    use_site(args.site)
    try:
        gpus: int | None = gpu_count()
    except ImportError:  # the app's own imports need the carried wheels: known after the install part
        gpus = None
    parts = device_plan(args.wheels, args.site, gpus)
    if args.dry_run:
        print_plan(parts, gpus)
        chosen, notes, short = device_wheels(args.wheels, args.site)
        print(f"  the install part runs (offline, {len(chosen)} wheels):")
        print("     $ " + shlex.join(_wheels().install_command(python(), Path(_rel(args.wheels)), chosen, args.site)))
        for line in notes + [f"WARNING: {x}" for x in short]:
            print(f"     {line}")
        print(f"     then PYTHONPATH={args.site}{os.pathsep}{ROOT} for every later part")
        print("  not run here: " + "; ".join(DEVICE_SKIPS.values()))
        if args.out:
            print(f"  then copies {', '.join(OUT_FILES)} and gpu-check-logs.tar.gz into {args.out}")
        return 0
    if gpus == 0:
        print("gpu-check: no usable NVIDIA GPU here (no CUDA driver or no device); nothing to do")
        return 0
    device = device_name()
    started = time.time()
    print(f"gpu-check: device image, {device}; {len(parts)} parts in at most {TOTAL_S:.0f} s; logs in {LOGS}",
          flush=True)

    def after(part: Part, result: Result) -> str | None:
        if part.name != "install":
            return None
        if result.status != "passed":
            return "the carried wheels did not install (install.log)"
        try:
            found = gpu_count_after_install(args.site)
        except ImportError as exc:
            return f"the app does not import here after the install: {exc}"
        return None if found > 0 else "no usable NVIDIA GPU (app.runtime.cuda_device_count() == 0)"

    results = run_parts(parts, TOTAL_S, LOGS, after=after)
    notes = [DEVICE_SKIPS["onnx-bench"], *pytest_skips(results)]
    write_report(results, device + ", offline device image", RESULTS, notes)
    code = exit_status(parts, results)
    tests = next((r.status for r in results if r.name == "cuda-tests"), "skipped")
    print(f"gpu-check: {time.time() - started:.0f} s; wrote {RESULTS / 'gpu.md'}; "
          + ("FAILED (install or CUDA tests)" if code else f"CUDA tests {tests}"))
    if args.out:
        print(f"gpu-check: copied to {args.out}: {', '.join(export_results(args.out))}")
    print((RESULTS / "gpu.md").read_text())
    return code


# ------------------------------------------------------------------------------------ main
def gpu_count() -> int:
    from app.runtime import cuda_device_count

    return cuda_device_count()


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        return f"{len(out)} x {out[0]}" if out else "NVIDIA GPU"
    except (OSError, subprocess.SubprocessError):
        return "NVIDIA GPU"


def print_plan(parts: list[Part], gpus: int | None) -> None:
    here = "GPUs unknown until the carried wheels are installed" if gpus is None else f"{gpus} GPU(s) here"
    print(f"gpu-check plan ({here}" + ("; a real run would stop after one line" if gpus == 0 else "")
          + f"; parts share {TOTAL_S:.0f} s):")
    left = TOTAL_S
    for i, part in enumerate(parts):
        b = budget(parts, i, left)
        state = f"skipped: {part.skip}" if part.skip else f"up to {b:.0f} s (cap {part.cap_s:.0f}, keeps {part.min_s:.0f})"
        print(f"  {i + 1}. {part.name}: {part.what}; {state}" + ("; its failure fails gpu-check" if part.critical else ""))
        if part.command:
            print(f"     $ {shlex.join(command_for(part, b))}")
        if part.name == "install" and "--install-only" in part.command:
            for what, _, commands in install_commands():
                for _, cmd in commands:
                    print(f"       if {what} is missing: $ {shlex.join(cmd)}")
        left -= 0 if part.skip else b
    print(f"  then: {RESULTS / 'gpu.md'} and gpu.json get each part's result and seconds "
          f"(gpu.png from the bench, gpu-train.md from training, the front-end ceiling's table from frontend)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and its commands; run nothing")
    ap.add_argument("--device-image", action="store_true",
                    help="the offline GPU machine (docs/gpu-check.md): install the wheels carried in --wheels into "
                         "--site, skip what cannot run there (chosen by itself where there is no .venv, torch is a "
                         "CUDA build and --wheels holds plan.json)")
    ap.add_argument("--wheels", type=Path, default=WHEELS_DIR, help="the wheels of make gpu-wheels (default .whl)")
    ap.add_argument("--site", type=Path, default=SITE, help="where the device image gets them (default /tmp/site)")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="also copy the reports and logs here (default $OUT when set)")
    ap.add_argument("--install-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--install-wheels", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--budget-s", type=float, default=150.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.wheels = args.wheels.resolve()
    if args.install_only:
        return install(args.budget_s)
    if args.install_wheels:
        return install_wheels(args.wheels, args.site)
    if args.device_image or all(device_image_checks(args.wheels).values()):
        return main_device_image(args)
    gpus = gpu_count()
    if args.dry_run:
        print_plan(plan(gpus), gpus)
        return 0
    if gpus == 0:
        print("gpu-check: no usable NVIDIA GPU here (no CUDA driver or no device); nothing to do")
        return 0
    device = device_name()
    parts = plan(gpus)
    started = time.time()
    print(f"gpu-check: {device}; {len(parts)} parts in at most {TOTAL_S:.0f} s; logs in {LOGS}")
    results = run_parts(parts, TOTAL_S, LOGS)
    write_report(results, device, RESULTS)
    code = exit_status(parts, results)
    print(f"gpu-check: {time.time() - started:.0f} s; wrote {RESULTS / 'gpu.md'}; "
          + ("CUDA tests FAILED" if code else "CUDA tests passed"))
    if args.out:
        print(f"gpu-check: copied to {args.out}: {', '.join(export_results(args.out))}")
    return code


if __name__ == "__main__":
    sys.exit(main())

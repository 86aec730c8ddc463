"""`make gpu-wheels`: download here, into .whl/, the wheels the offline device image lacks for `make gpu-check`.

The GPU machine a session may be lent (the `run` tool: one H100 / H200, x86-64, Python 3.12.3) cannot reach PyPI.
It runs commands in a copy of this working tree, plus up to 8 ignored paths named in `carry` (64 MiB in all), so
what its image lacks travels as wheels: `carry: [".whl"]`, installed there by `scripts/gpu_check.py --device-image`
with `pip install --no-index --no-deps --target`. docs/gpu-check.md has the exact device call.

Which wheels: the Requires-Dist closure of what the device run imports (pyproject's serving dependencies, and of
its extras the names the CUDA tests, the training check and the bench use there), walked over the metadata of the
packages installed in this environment (our .venv: the versions we test with, which are the versions pinned),
with the markers of the device's Python. Each package is then
  carry      not in the image: its wheel travels and is always installed there;
  guard      in the image, but in a version not on record that may be too old for an import-time check of ours:
             its wheel travels and is installed there only when the image's version fails `condition`;
  image      the image has it (in a version on record that satisfies every requirement, or not on record);
  left out   not needed there, or cannot be carried (the reason is printed).
The plan, with each wheel's file, size and install condition and what we expect of the image's own packages, is
written to .whl/plan.json, which the device side reads. The script fails when the wheels exceed WHEELS_LIMIT or the
wheels and the rest of the working tree exceed TREE_LIMIT.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
PLAN_FILE = "plan.json"
MiB = 1 << 20
TREE_LIMIT = 64 * MiB  # what a device call may carry: tracked + untracked-not-ignored files + carried paths
WHEELS_LIMIT = 56 * MiB  # the wheels' share, leaving the rest of the tree room to grow

# ------------------------------------------------------------------------------------------------ the device image
# /work/.library/device/KINDS.md, "Python packages already there": image 'cuda' of nvidia-h100-x1 and nvidia-h200,
# as last read on a machine running it on 2026-11-17.
IMAGE_PACKAGES_READ = "2026-11-17"
IMAGE_PACKAGES = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# KINDS.md, nvidia-h200, "pip list, as a session saw it" (2026-11), and its python3 / torch lines: the only versions
# on record. The image's torch is the CUDA build 2.11.0+cu130; its onnxruntime the CPU package.
IMAGE_VERSIONS_READ = "2026-11"
IMAGE_VERSIONS = {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "jax": "0.11.2", "jaxlib": "0.11.2", "numpy": "2.5.2",
    "onnx": "1.23.1", "onnx-ir": "1.0.0", "onnxruntime": "1.30.0", "onnxscript": "0.7.2",
    "pytorch-lightning": "2.6.6", "safetensors": "0.8.0", "sentence-transformers": "6.0.1",
    "sentencepiece": "0.2.2", "tiktoken": "0.14.0", "tokenizers": "0.23.2", "torch": "2.11.0",
    "torchaudio": "2.11.0", "torchmetrics": "1.9.0", "torchvision": "0.26.0", "transformers": "5.17.0",
    "triton": "3.6.0",
}
IMAGE_PYTHON = "3.12.3"
# the markers of the device's interpreter (Requires-Dist lines are evaluated against these, not this machine's)
DEVICE_MARKERS = {
    "python_version": "3.12", "python_full_version": IMAGE_PYTHON, "implementation_name": "cpython",
    "implementation_version": IMAGE_PYTHON, "platform_python_implementation": "CPython", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "platform_release": "",
    "platform_version": "",
}
# pip download's target: CPython 3.12 wheels for x86-64 Linux (manylinux tags match N exactly: list them all)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]

# ------------------------------------------------------------------------------------------------ what is needed
# Of pyproject's extras, the names the device run imports (the CUDA tests, scripts/gpu_train_check.py, the bench).
EXTRAS_USED = {
    "test": {"pytest", "pytest-timeout", "httpx", "onnx"},
    "bench": {"litserve", "aiohttp", "psutil", "matplotlib"},
    "train": {"transformers", "peft", "safetensors", "onnx", "onnxscript", "tqdm", "matplotlib", "scikit-image",
              "scikit-learn"},
}
# Needed there but in no pyproject list (or pinned there for another build): taken as they are.
EXTRA_ROOTS = {
    "onnxruntime": "the ONNX runtime app/ imports (the image's CPU package stands in for onnxruntime-gpu)",
    "torch": "TorchScript serving and training on CUDA: the image's CUDA build (pyproject pins the CPU build)",
}
# Every other extra entry, and why it does not travel (tests/test_gpu_wheels.py checks each has a reason).
LEFT_OUT = {
    "onnxruntime-gpu": "its wheel is far over the 64 MiB a device call carries: the ONNX CUDA provider cannot run "
                       "there (its tests are skipped with that reason)",
    "torch": "pinned to the CPU build (2.13.0+cpu) here; the image's CUDA build 2.11.0+cu130 is the one for the GPU",
    "seqeval": "NER metrics only (the training check trains classify); PyPI has no wheel of it, only an sdist",
    "schemathesis": "make fuzz only",
    "py-spy": "python -m bench.profile only",
    "tritonclient": "the test extra's [http] client is for tests/test_oip_tritonclient.py, not run there (the serving "
                    "dependency tritonclient[grpc] travels)",
}
# Image packages whose version is not on record while an import-time check of ours needs a floor: the wheel travels
# and is installed there only when the image's version fails the specifiers collected from Requires-Dist plus these.
GUARDS = {
    "protobuf": (">=6.33.5", "tritonclient's generated *_pb2.py check at import that the protobuf runtime is at least "
                             "the 6.33.5 that generated them"),
    "grpcio": (">=1.81.1", "tritonclient's service_pb2_grpc.py raises at import below the grpcio 1.81.1 that "
                           "generated it"),
    "typing-extensions": ("", "pydantic 2.14 / pydantic-core 2.50 need typing-extensions >= 4.16.0"),
}


@dataclass
class Need:
    name: str  # canonical
    version: str | None = None  # installed here (ours)
    specs: list[str] = field(default_factory=list)  # "requirer: spec"
    by: list[str] = field(default_factory=list)  # the packages that require it
    extras: set[str] = field(default_factory=set)
    roots: list[str] = field(default_factory=list)  # why it is a root (empty: a dependency)


@dataclass
class Decision:
    name: str
    version: str | None
    action: str  # carry | guard | image | left-out
    why: str
    requires: list[str] = field(default_factory=list)
    condition: str = ""  # guard: the image's version must satisfy this for the wheel to stay uninstalled
    file: str | None = None
    bytes: int = 0


def _spec_set(specs: Iterable[str]) -> SpecifierSet:
    out = SpecifierSet()
    for s in specs:
        out &= SpecifierSet(s.rpartition(": ")[2])
    return out


def _marker_ok(marker: Marker | None, extras: Iterable[str]) -> bool:
    if marker is None:
        return True
    return any(marker.evaluate({**DEVICE_MARKERS, "extra": e}) for e in [""] + sorted(extras))


def roots_from_pyproject(pyproject: dict) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """([(requirement, why)], {left-out requirement: reason}) for the device run."""
    project = pyproject["project"]
    roots = [(r, "serving (pyproject dependencies)") for r in project["dependencies"]]
    left: dict[str, str] = {}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        used = EXTRAS_USED.get(extra, set())
        for r in reqs:
            name = canonicalize_name(Requirement(r).name)
            if name in used and name not in EXTRA_ROOTS:
                roots.append((r, f"[{extra}] extra"))
            else:
                left[r] = LEFT_OUT.get(name, "UNDECIDED")
    roots += [(name, why) for name, why in EXTRA_ROOTS.items()]
    return roots, left


def closure(roots: list[tuple[str, str]], dist: Callable[[str], tuple[str, list[str]] | None],
            image: frozenset[str] = IMAGE_PACKAGES) -> dict[str, Need]:
    """Walk Requires-Dist from `roots`; `dist(name)` -> (version installed here, its Requires-Dist) or None.
    An image package is a leaf (the image brings its dependencies); every other package is walked."""
    needs: dict[str, Need] = {}
    queue: list[tuple[Requirement, str, str | None]] = [(Requirement(r), "", why) for r, why in roots]
    while queue:
        req, requirer, why = queue.pop(0)
        name = canonicalize_name(req.name)
        need = needs.get(name)
        first = need is None
        if first:
            need = needs[name] = Need(name)
        if why:
            need.roots.append(why)
        if requirer and requirer not in need.by:
            need.by.append(requirer)
        if str(req.specifier):
            need.specs.append(f"{requirer or 'pyproject'}: {req.specifier}")
        new_extras = set(req.extras) - need.extras
        need.extras |= set(req.extras)
        if not (first or new_extras):
            continue
        info = dist(name)
        if info is None and name not in image:
            raise SystemExit(f"gpu-wheels: {name} is needed on the device but not installed here (make install)")
        need.version, requires = info or (None, [])
        if name in image:
            continue  # a leaf: the image brings what its own packages need
        for line in requires:
            r = Requirement(line)
            if _marker_ok(r.marker, need.extras):
                queue.append((r, f"{name} {need.version}", None))
    return needs


def decide(needs: dict[str, Need], image: frozenset[str] = IMAGE_PACKAGES,
           versions: dict[str, str] = IMAGE_VERSIONS) -> list[Decision]:
    out = []
    for name in sorted(needs):
        n = needs[name]
        specs = _spec_set(n.specs)
        requires = sorted(set(n.specs))
        if name in image:
            known = versions.get(name)
            if known is not None and not specs.contains(Version(known), prereleases=True):
                # the recorded version is too old (or too new): carry ours; it is installed only where it fails
                out.append(Decision(name, n.version, "guard", f"the image's {known} (KINDS.md, "
                                    f"{IMAGE_VERSIONS_READ}) does not satisfy {specs}", requires, str(specs)))
            elif known is not None:
                out.append(Decision(name, n.version, "image", f"image has {known} (KINDS.md pip list, "
                                    f"{IMAGE_VERSIONS_READ})", requires))
            elif name in GUARDS:
                floor, why = GUARDS[name]
                cond = specs & SpecifierSet(floor) if floor else specs
                out.append(Decision(name, n.version, "guard", why, requires, str(cond)))
            else:
                out.append(Decision(name, n.version, "image", f"image has it (KINDS.md, {IMAGE_PACKAGES_READ}; "
                                    "version not on record)", requires))
        else:
            why = "; ".join(n.roots) if n.roots else "needed by " + ", ".join(n.by)
            out.append(Decision(name, n.version, "carry", f"not in the image: {why}", requires))
    return out


def venv_dist(name: str) -> tuple[str, list[str]] | None:
    """(version, Requires-Dist) of a distribution installed in this interpreter's environment."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        d = distribution(name)
    except PackageNotFoundError:
        return None
    return d.version, list(d.requires or [])


def plan_wheels(root: Path = ROOT, dist=venv_dist) -> tuple[list[Decision], dict[str, str]]:
    import tomllib

    roots, left = roots_from_pyproject(tomllib.loads((root / "pyproject.toml").read_text()))
    undecided = [r for r, why in left.items() if why == "UNDECIDED"]
    if undecided:
        raise SystemExit(f"gpu-wheels: no decision for {undecided}: add them to EXTRAS_USED or LEFT_OUT")
    return decide(closure(roots, dist)), left


# ------------------------------------------------------------------------------------------------ sizes
def tree_bytes(root: Path = ROOT) -> int:
    """What a device call carries besides `carry`: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    total = 0
    for rel in {p for p in out.decode().split("\0") if p}:
        path = root / rel
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def size_problems(wheel_bytes: int, tree: int, wheels_limit: int = WHEELS_LIMIT,
                  tree_limit: int = TREE_LIMIT) -> list[str]:
    problems = []
    if wheel_bytes > wheels_limit:
        problems.append(f"the wheels take {wheel_bytes / MiB:.1f} MiB, over their {wheels_limit / MiB:.0f} MiB")
    if wheel_bytes + tree > tree_limit:
        problems.append(f"wheels {wheel_bytes / MiB:.1f} MiB + tree {tree / MiB:.1f} MiB = "
                        f"{(wheel_bytes + tree) / MiB:.1f} MiB, over the {tree_limit / MiB:.0f} MiB a device call "
                        "carries")
    return problems


# ------------------------------------------------------------------------------------------------ download
def download_command(decisions: list[Decision], dest: Path, python: str = sys.executable) -> list[str]:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    pins = [f"{d.name}=={d.version}" for d in decisions if d.action in ("carry", "guard")]
    return [python, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *pins]


def match_files(decisions: list[Decision], dest: Path) -> list[str]:
    """Attach each carried wheel's file and size; remove any other wheel in `dest` (two versions of one package stop
    the install there). Returns problems (a wheel missing)."""
    want = {d.name: d for d in decisions if d.action in ("carry", "guard")}
    problems = []
    for path in sorted(dest.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        d = want.get(name)
        if d is None or Version(d.version or "0") != version:
            path.unlink()  # a stale version or a package no longer needed
            continue
        d.file, d.bytes = path.name, path.stat().st_size
    for d in want.values():
        if d.file is None:
            problems.append(f"no wheel for {d.name}=={d.version}")
    return problems


def write_plan(decisions: list[Decision], left: dict[str, str], dest: Path, tree: int) -> Path:
    carried = [d for d in decisions if d.action in ("carry", "guard")]
    plan = {
        "python": IMAGE_PYTHON, "image_packages_read": IMAGE_PACKAGES_READ, "image_versions_read": IMAGE_VERSIONS_READ,
        "wheels": [{"name": d.name, "version": d.version, "file": d.file, "bytes": d.bytes,
                    "install": "always" if d.action == "carry" else f"unless the image has {d.name}{d.condition}",
                    "condition": d.condition if d.action == "guard" else None, "why": d.why} for d in carried],
        # what the device run expects of the image's own packages (checked there, reported when one falls short)
        "expect": {d.name: str(_spec_set(d.requires)) for d in decisions if d.action == "image"},
        "left_out": left,
        "wheels_bytes": sum(d.bytes for d in carried), "tree_bytes": tree,
    }
    path = dest / PLAN_FILE
    path.write_text(json.dumps(plan, indent=1) + "\n")
    return path


def print_decisions(decisions: list[Decision], left: dict[str, str], say=print) -> None:
    for action, title in (("carry", "carried (not in the image)"),
                          ("guard", "carried, installed there only when the image's version falls short"),
                          ("image", "taken from the image")):
        rows = [d for d in decisions if d.action == action]
        say(f"{title}: {len(rows)}")
        for d in rows:
            size = f" {d.bytes / MiB:6.2f} MiB" if d.bytes else ""
            cond = f" [unless image has {d.condition}]" if d.condition else ""
            say(f"  {d.name}=={d.version}{size}{cond}: {d.why}")
    say(f"left out: {len(left)}")
    for req, why in sorted(left.items()):
        say(f"  {req}: {why}")


# ------------------------------------------------------------------------------------------------ the device side
# Used there by scripts/gpu_check.py --device-image (stdlib and packaging only: the image has both).
def read_plan(wheels: Path) -> dict:
    return json.loads((wheels / PLAN_FILE).read_text())


def installed_versions(exclude: Path | None = None) -> dict[str, str]:
    """{canonical name: version} of the distributions this interpreter imports (the first on sys.path wins, as for
    imports), leaving out those under `exclude` (the target of an earlier install: the image's own are asked)."""
    from importlib.metadata import distributions

    skip = exclude.resolve() if exclude else None
    paths = [p for p in sys.path if p and not (skip and Path(p).resolve().is_relative_to(skip))]
    out: dict[str, str] = {}
    for d in distributions(path=paths):
        name = d.metadata["Name"]
        if name:
            out.setdefault(canonicalize_name(name), d.version)
    return out


def _satisfies(version: str | None, spec: str) -> bool:
    if version is None:
        return False
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except ValueError:  # an unparsable version: take it as failing
        return False


def wheels_to_install(plan: dict, image: dict[str, str]) -> tuple[list[dict], list[str]]:
    """(the plan's wheels to install there, a line for each guard): a guard's wheel is installed only when the
    image's version of it fails its condition."""
    chosen, notes = [], []
    for w in plan["wheels"]:
        cond, have = w.get("condition"), image.get(w["name"])
        if cond is not None:
            if _satisfies(have, cond):
                notes.append(f"{w['name']}: the image's {have} satisfies {cond}: its wheel is not installed")
                continue
            notes.append(f"{w['name']}: the image has {have or 'none'}, not {cond}: installing {w['version']}")
        chosen.append(w)
    return chosen, notes


def expectation_problems(plan: dict, image: dict[str, str]) -> list[str]:
    """The image's own packages that fall short of what the carried ones (or ours) require."""
    problems = []
    for name, spec in sorted(plan.get("expect", {}).items()):
        have = image.get(name)
        if have is None:
            problems.append(f"{name}: not in the image (needed: {spec or 'any version'})")
        elif spec and not _satisfies(have, spec):
            problems.append(f"{name}: the image has {have}, needed {spec}")
    return problems


def install_command(python: str, wheels: Path, chosen: list[dict], site: Path) -> list[str]:
    """Offline: only the carried files, no index, no dependency resolution (the plan lists every one)."""
    return [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
            "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
            *[str(wheels / w["file"]) for w in chosen]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=WHEELS, help="where the wheels go (default .whl)")
    ap.add_argument("--dry-run", action="store_true", help="print the list and the pip command; download nothing")
    args = ap.parse_args(argv)
    decisions, left = plan_wheels()
    cmd = download_command(decisions, args.dest)
    if args.dry_run:
        print_decisions(decisions, left)
        print("$ " + " ".join(cmd))
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    print(f"gpu-wheels: downloading {sum(d.action in ('carry', 'guard') for d in decisions)} wheels into "
          f"{args.dest}", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        print("gpu-wheels: pip download failed (no wheel for the device? see above)")
        return 1
    problems = match_files(decisions, args.dest)
    tree = tree_bytes()
    wheel_bytes = sum(d.bytes for d in decisions if d.action in ("carry", "guard"))
    write_plan(decisions, left, args.dest, tree)
    print_decisions(decisions, left)
    problems += size_problems(wheel_bytes, tree)
    print(f"gpu-wheels: wheels {wheel_bytes / MiB:.1f} MiB (limit {WHEELS_LIMIT / MiB:.0f}), working tree "
          f"{tree / MiB:.1f} MiB, together {(wheel_bytes + tree) / MiB:.1f} of the {TREE_LIMIT / MiB:.0f} MiB a "
          f"device call carries; plan in {args.dest / PLAN_FILE}")
    for p in problems:
        print(f"gpu-wheels: FAILED: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

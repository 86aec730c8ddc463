"""`make gpu-wheels` (scripts/gpu_wheels.py): which wheels the offline device image gets, offline. The closure walk
and the decisions on made-up metadata (markers evaluated for the device's Python, extras followed, image packages
taken as leaves, guards), the real pyproject's extras each used or left out with a reason, the plan of our own .venv
(metadata only, no download), the size limits, and the device side's reading of plan.json. No network: the
download itself is only checked for its arguments."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from scripts import gpu_wheels as gw

ROOT = Path(__file__).resolve().parents[1]
KINDS = Path("/work/.library/device/KINDS.md")

FAKE = {  # name -> (version here, Requires-Dist)
    "fastapi": ("0.165.0", ["starlette>=1.6.0", "pydantic>=2.9.0", "anyio>=4.1.0",
                            "typing-extensions>=4.8.0", "email-validator>=2; extra == 'all'"]),
    "starlette": ("1.10.0", ["anyio<5,>=4.0.0", "typing-extensions>=4.10.0; python_version < '3.13'"]),
    "pydantic": ("2.14.4", ["pydantic-core==2.50.5", "typing-extensions>=4.16.0"]),
    "pydantic-core": ("2.50.5", ["typing-extensions>=4.16.0"]),
    "uvicorn": ("0.55.0", ["click>=7.0", "h11>=0.8", "httptools>=0.8.0; extra == 'standard'",
                           "uvloop>=0.15.1; sys_platform != 'win32' and extra == 'standard'",
                           "colorama>=0.4; sys_platform == 'win32' and extra == 'standard'",
                           "tomli>=1; python_version < '3.11'"]),
    "httptools": ("0.9.0", []),
    "tritonclient": ("2.73.0", ["numpy>=1.19.1", "grpcio>=1.81.1; extra == 'grpc'",
                                "protobuf<7.0,>=6.30.0; extra == 'grpc'", "geventhttpclient>=2.3.3; extra == 'http'"]),
    "anyio": ("4.16.0", ["sniffio>=1.1"]),  # an image package: its own needs are the image's business
    "numpy": ("2.4.6", []), "click": ("8.5.1", []), "h11": ("0.16.0", []), "uvloop": ("0.23.0", []),
    "typing-extensions": ("4.16.0", []), "grpcio": ("1.85.3", ["typing-extensions~=4.12"]),
    "protobuf": ("6.33.6", []), "oldlib": ("1.0", ["numpy<2"]),
}
IMAGE = frozenset({"anyio", "numpy", "click", "h11", "uvloop", "typing-extensions", "grpcio", "protobuf"})


def fake_dist(name):
    return FAKE.get(name)


def decisions(roots, versions=None):
    needs = gw.closure([(r, "test root") for r in roots], fake_dist, image=IMAGE)
    return {d.name: d for d in gw.decide(needs, image=IMAGE, versions=versions or {"numpy": "2.5.2"})}


def test_the_closure_follows_extras_and_the_device_markers_and_stops_at_image_packages():
    got = decisions(["fastapi>=0.110", "uvicorn[standard]>=0.29", "tritonclient[grpc]>=2.40"])
    carried = {n for n, d in got.items() if d.action == "carry"}
    assert carried == {"fastapi", "starlette", "pydantic", "pydantic-core", "uvicorn", "httptools", "tritonclient"}
    assert "email-validator" not in got and "geventhttpclient" not in got  # extras nobody asked for
    assert "colorama" not in got and "tomli" not in got  # win32 / Python < 3.11: not the device's markers
    assert "sniffio" not in got  # anyio is the image's: its dependencies are too
    assert got["uvloop"].action == "image" and got["click"].action == "image"
    assert got["numpy"].action == "image" and "2.5.2" in got["numpy"].why  # the recorded version satisfies
    assert got["pydantic-core"].version == "2.50.5" and "pydantic 2.14.4" in got["pydantic-core"].why
    assert got["fastapi"].why == "not in the image: test root"


def test_guards_carry_a_wheel_with_the_condition_the_image_must_meet():
    got = decisions(["fastapi>=0.110", "tritonclient[grpc]>=2.40"])
    proto, grpc, te = got["protobuf"], got["grpcio"], got["typing-extensions"]
    assert (proto.action, grpc.action, te.action) == ("guard", "guard", "guard")
    assert proto.version == "6.33.6" and grpc.version == "1.85.3"  # ours, not the image's
    for d, inside, outside in ((proto, "6.33.5", "6.33.4"), (grpc, "1.81.1", "1.80.0"), (te, "4.16.0", "4.15.0")):
        assert gw._satisfies(inside, d.condition) and not gw._satisfies(outside, d.condition), d
    assert not gw._satisfies("7.0.0", proto.condition)  # tritonclient's <7.0 is kept
    # an image package whose recorded version fails a requirement travels as a guard too
    assert decisions(["oldlib"])["numpy"].action == "guard" and decisions(["oldlib"])["numpy"].condition == "<2"


def test_a_needed_package_missing_here_stops_the_plan():
    with pytest.raises(SystemExit, match="not-installed-anywhere"):
        gw.closure([("not-installed-anywhere>=1", "test")], fake_dist, image=IMAGE)


def test_every_extra_entry_of_pyproject_is_used_or_left_out_with_a_reason():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    roots, left = gw.roots_from_pyproject(pyproject)
    assert not [r for r, why in left.items() if why == "UNDECIDED"], left
    assert {r for r, _ in roots} >= set(pyproject["project"]["dependencies"])  # serving: all of it
    names = {re.split(r"[\[<>=~!; ]", r)[0]: why for r, why in left.items()}
    assert "64 MiB" in names["onnxruntime-gpu"] and "sdist" in names["seqeval"] and "CPU build" in names["torch"]


def test_the_plan_of_this_venv_pins_our_versions_and_carries_nothing_the_image_has():
    decided, left = gw.plan_wheels()
    by = {d.name: d for d in decided}
    carried = {n for n, d in by.items() if d.action == "carry"}
    assert {"fastapi", "starlette", "uvicorn", "httptools", "pydantic", "pydantic-core", "pydantic-settings",
            "python-multipart", "soundfile", "cffi", "tritonclient", "litserve"} <= carried
    assert not carried & gw.IMAGE_PACKAGES
    assert {d.name for d in decided if d.action == "guard"} >= {"protobuf", "grpcio"}
    for name in ("torch", "numpy", "onnxruntime", "transformers", "pytest", "aiohttp", "psutil"):
        assert by[name].action == "image", by[name]
    assert "onnxruntime-gpu" not in by and "seqeval" not in by and "schemathesis" not in by
    for d in decided:
        if d.action in ("carry", "guard"):
            assert d.version == version(d.name), d  # pinned to what we test with


def test_the_image_list_is_the_one_kinds_md_records():
    if not KINDS.is_file():
        pytest.skip(f"{KINDS} is not on this machine (it is the workplace's, not the project's)")
    text = KINDS.read_text()
    listed = re.search(r"Packages: (.+?)\.\s*$", text[text.index("## Python packages already there"):], re.M | re.S)
    names = {gw.canonicalize_name(n.strip()) for n in listed.group(1).split(",")}
    assert names == gw.IMAGE_PACKAGES
    assert gw.IMAGE_PACKAGES_READ in text


def test_the_download_asks_for_cp312_manylinux_wheels_of_the_carried_packages_only(tmp_path):
    d = [gw.Decision("fastapi", "0.165.0", "carry", ""), gw.Decision("protobuf", "6.33.6", "guard", ""),
         gw.Decision("numpy", "2.4.6", "image", "")]
    cmd = gw.download_command(d, tmp_path, python="py")
    joined = " ".join(cmd)
    for arg in ("-m pip download", "--no-deps", "--only-binary=:all:", "--python-version 3.12", "--implementation cp",
                "--platform manylinux_2_28_x86_64", "--platform manylinux_2_17_x86_64",
                "--platform manylinux2014_x86_64", f"-d {tmp_path}"):
        assert arg in joined, arg
    assert cmd[-2:] == ["fastapi==0.165.0", "protobuf==6.33.6"]


def test_wheel_files_are_matched_and_stale_ones_removed(tmp_path):
    for f in ("fastapi-0.165.0-py3-none-any.whl", "fastapi-0.160.0-py3-none-any.whl",
              "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
              "requests-2.0.0-py3-none-any.whl"):
        (tmp_path / f).write_bytes(b"x" * 10)
    d = [gw.Decision("fastapi", "0.165.0", "carry", ""), gw.Decision("pydantic-core", "2.50.5", "carry", ""),
         gw.Decision("soundfile", "0.14.0", "carry", ""), gw.Decision("numpy", "2.4.6", "image", "")]
    problems = gw.match_files(d, tmp_path)
    assert problems == ["no wheel for soundfile==0.14.0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fastapi-0.165.0-py3-none-any.whl",
        "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"]  # one version each
    assert d[0].file == "fastapi-0.165.0-py3-none-any.whl" and d[0].bytes == 10


def test_the_size_check():
    MiB = gw.MiB
    assert gw.size_problems(16 * MiB, 3 * MiB) == []
    (p,) = gw.size_problems(57 * MiB, 3 * MiB)
    assert "over their 56 MiB" in p
    (p,) = gw.size_problems(50 * MiB, 15 * MiB)
    assert "65.0 MiB, over the 64 MiB" in p
    assert len(gw.size_problems(60 * MiB, 10 * MiB)) == 2


def test_the_tree_size_counts_tracked_and_untracked_files_but_not_ignored_ones(tmp_path):
    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("/.whl/\n")  # 7 bytes
    (tmp_path / "tracked.py").write_bytes(b"t" * 100)
    git("add", ".gitignore", "tracked.py")
    (tmp_path / "untracked.txt").write_bytes(b"u" * 50)
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "big.whl").write_bytes(b"w" * 5000)
    assert gw.tree_bytes(tmp_path) == 157


PLAN = {"wheels": [
    {"name": "fastapi", "version": "0.165.0", "file": "fastapi-0.165.0-py3-none-any.whl", "condition": None},
    {"name": "protobuf", "version": "6.33.6", "file": "protobuf-6.33.6-cp39-abi3-manylinux2014_x86_64.whl",
     "condition": ">=6.33.5"},
    {"name": "grpcio", "version": "1.85.3", "file": "grpcio-1.85.3-cp312-cp312-manylinux2014_x86_64.whl",
     "condition": ">=1.81.1"},
    {"name": "typing-extensions", "version": "4.16.0", "file": "typing_extensions-4.16.0-py3-none-any.whl",
     "condition": ">=4.16.0"}],
    "expect": {"numpy": ">=1.26", "anyio": "<5,>=4.10", "uvloop": ">=0.15.1", "h11": ""}}


def test_the_device_side_installs_a_guard_only_where_the_image_falls_short():
    image = {"protobuf": "5.29.3", "grpcio": "1.85.0", "numpy": "2.5.2", "anyio": "4.3.0", "h11": "0.16.0"}
    chosen, notes = gw.wheels_to_install(PLAN, image)
    assert [w["name"] for w in chosen] == ["fastapi", "protobuf", "typing-extensions"]
    assert any("grpcio: the image's 1.85.0 satisfies" in n for n in notes)
    assert any("protobuf: the image has 5.29.3" in n for n in notes)
    assert any("typing-extensions: the image has none" in n for n in notes)
    assert gw.expectation_problems(PLAN, image) == ["anyio: the image has 4.3.0, needed <5,>=4.10",
                                                     "uvloop: not in the image (needed: >=0.15.1)"]
    cmd = gw.install_command("python3", Path(".whl"), chosen, Path("/tmp/site"))
    assert cmd[:4] == ["python3", "-m", "pip", "install"]
    for arg in ("--no-index", "--no-deps", "--upgrade"):
        assert arg in cmd
    assert cmd[cmd.index("--target") + 1] == "/tmp/site"
    assert cmd[-3:] == [".whl/fastapi-0.165.0-py3-none-any.whl",
                        ".whl/protobuf-6.33.6-cp39-abi3-manylinux2014_x86_64.whl",
                        ".whl/typing_extensions-4.16.0-py3-none-any.whl"]


def test_installed_versions_leave_out_an_earlier_install_target(tmp_path, monkeypatch):
    ours = version("fastapi")
    site = tmp_path / "site"
    info = site / "fastapi-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fastapi\nVersion: 0.1.0\n")
    monkeypatch.setattr(sys, "path", [str(site)] + sys.path)
    assert gw.installed_versions()["fastapi"] == "0.1.0"  # first on the path wins, as for imports
    assert gw.installed_versions(exclude=site)["fastapi"] == ours


def test_write_plan_records_what_the_device_side_reads(tmp_path):
    d = [gw.Decision("fastapi", "0.165.0", "carry", "x", file="f.whl", bytes=3),
         gw.Decision("protobuf", "6.33.6", "guard", "y", ["tritonclient 2.73.0: >=6.30.0"], ">=6.33.5", "p.whl", 4),
         gw.Decision("numpy", "2.4.6", "image", "z", ["pyproject: >=1.26", "ml-dtypes: >=1.21"])]
    plan = json.loads(gw.write_plan(d, {"seqeval>=1.2": "why"}, tmp_path, 100).read_text())
    assert [w["name"] for w in plan["wheels"]] == ["fastapi", "protobuf"]
    assert plan["wheels"][0]["condition"] is None and plan["wheels"][1]["condition"] == ">=6.33.5"
    assert plan["expect"] == {"numpy": ">=1.21,>=1.26"} and plan["wheels_bytes"] == 7 and plan["tree_bytes"] == 100

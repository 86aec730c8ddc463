"""`mmserve validate`: check every version in a model repository before a server loads it.

    mmserve validate model_repository [--no-parity]

For every NAME/VERSION: the manifest parses (schema), every listed file exists with its sha256,
no unlisted file sits beside them, model.onnx loads in onnxruntime with the manifest's input and
output names and dtypes, model.pt loads with torch.jit.load (skipped, with a warning, when torch is
not installed), and a parity sample (a synthetic but valid record built through
models.preprocessing: short text, a generated picture, a tone) gives the same logits from both
formats within 1e-4. One line per problem, naming the file; one OK line per good version; exit
status 1 when anything is wrong. Stray temporary directories (`.tmp-*`, left by an interrupted
export) are reported as warnings and never loaded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydantic import ValidationError

from models import contract
from models.manifest import MANIFEST_FILE, Manifest, sha256_file
from training.model_repository import TMP_PREFIX
from training.parity import compare_logits, load_torchscript, onnx_session, run_onnx, run_torchscript, within_tolerance

_ORT_DTYPES = {"tensor(int64)": "int64", "tensor(float)": "float32", "tensor(bool)": "bool"}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def summarize_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "manifest"
        if err["type"] == "missing":
            parts.append(f"{loc} is required")
        elif err["type"] == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        else:
            parts.append(f"{loc}: {err['msg']}")
    shown = "; ".join(parts[:5]) + (f"; ... ({len(parts) - 5} more)" if len(parts) > 5 else "")
    return f"{len(parts)} schema error{'s' if len(parts) != 1 else ''}: {shown}"


def read_manifest_checked(directory: Path) -> tuple[Manifest | None, str | None]:
    path = directory / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"{path}: missing"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path}: unreadable: {_one_line(exc)}"
    except json.JSONDecodeError as exc:
        return None, f"{path}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    try:
        return Manifest.model_validate(raw), None
    except ValidationError as exc:
        return None, f"{path}: invalid manifest: {summarize_validation_error(exc)}"


def sample_batch(manifest: Manifest, directory: Path) -> dict[str, np.ndarray]:
    """A synthetic but valid batch of 3 through models.preprocessing: every modality present,
    then the optional media masked out (row 2: no audio; row 3: only required modalities)."""
    from PIL import Image

    from models.preprocessing import Features, Preprocessor, collate

    pre = Preprocessor(manifest.preprocessing, directory)
    modalities = manifest.modality_names
    required = set(manifest.required_modalities)
    words = ["a", "short", "question", "about", "the", "red", "picture"]
    height = width = 48
    grid = np.linspace(0, 255, width, dtype=np.float32)
    picture = np.stack([np.tile(grid, (height, 1)), np.tile(grid[:, None], (1, width)),
                        np.full((height, width), 90.0, np.float32)], axis=-1).astype(np.uint8)
    sample_rate = manifest.preprocessing.audio.sample_rate if manifest.preprocessing.audio else 16000
    t = np.arange(int(0.5 * sample_rate)) / sample_rate
    tone = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)

    items = []
    for row, keep in enumerate(({"image", "audio"}, {"image"}, set())):
        if "text" in modalities:
            text_words = words[: 7 - 2 * row]
            f = pre.encode_words(text_words) if manifest.task == "ner" else pre.encode_text(" ".join(text_words))
        else:
            f = Features()
        if "image" in modalities and ("image" in keep or "image" in required):
            f.pixel_values = pre.image_from_pil(Image.fromarray(picture))
        if "audio" in modalities and ("audio" in keep or "audio" in required):
            f.audio_features = pre.audio_from_waveform(tone, sample_rate)
        if "text" not in modalities and f.pixel_values is None and f.audio_features is None:
            # a model without text needs at least one present modality per record
            if "image" in modalities:
                f.pixel_values = pre.image_from_pil(Image.fromarray(picture))
            else:
                f.audio_features = pre.audio_from_waveform(tone, sample_rate)
        items.append(f)
    return collate(items, modalities, manifest.preprocessing, pad_id=pre.pad_id)


def _expected_shape(spec_shape, batch: dict[str, np.ndarray]) -> list[int | None]:
    sizes = {contract.BATCH_AXIS: contract.batch_size(batch), contract.SEQUENCE_AXIS: contract.sequence_length(batch)}
    return [sizes.get(d) if isinstance(d, str) else d for d in spec_shape]


def validate_version(directory: Path, parity: bool = True, warn: Callable[[str], None] = print) -> list[str]:
    """Problems of one NAME/VERSION directory (empty list: good)."""
    directory = Path(directory)
    manifest, problem = read_manifest_checked(directory)
    if manifest is None:
        return [problem]
    problems: list[str] = []
    manifest_path = directory / MANIFEST_FILE
    if manifest.name != directory.parent.name:
        problems.append(f"{manifest_path}: name {manifest.name!r} does not match directory {directory.parent.name!r}")
    if str(manifest.version) != directory.name:
        problems.append(f"{manifest_path}: version {manifest.version} does not match directory {directory.name!r}")

    # integrity: every listed file present with its hash, nothing unlisted
    broken = set()
    for rel, expected in manifest.files.items():
        path = directory / rel
        if not path.is_file():
            problems.append(f"{path}: missing (listed in the manifest)")
            broken.add(rel)
        elif sha256_file(path) != expected:
            problems.append(f"{path}: sha256 mismatch (file altered or truncated)")
            broken.add(rel)
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != MANIFEST_FILE and rel not in manifest.files:
            problems.append(f"{path}: not listed in the manifest")
    for fmt, info in manifest.formats.items():
        if info.file not in manifest.files:
            problems.append(f"{manifest_path}: {fmt} file {info.file} has no sha256 in the manifest")
            broken.add(info.file)
    tokenizer = manifest.preprocessing.text.tokenizer_file if manifest.preprocessing.text else None
    if tokenizer and tokenizer not in manifest.files:
        problems.append(f"{directory / tokenizer}: tokenizer not listed in the manifest")
        broken.add(tokenizer)

    names = [t.name for t in manifest.inputs]
    runners: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]] = {}
    onnx_info = manifest.formats.get("onnx")
    if onnx_info and onnx_info.file not in broken:
        path = directory / onnx_info.file
        try:
            session = onnx_session(path)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{path}: does not load in onnxruntime: {_one_line(exc)}")
        else:
            got_in = [(i.name, _ORT_DTYPES.get(i.type, i.type)) for i in session.get_inputs()]
            want_in = [(t.name, t.dtype) for t in manifest.inputs]
            got_out = [(o.name, _ORT_DTYPES.get(o.type, o.type)) for o in session.get_outputs()]
            want_out = [(t.name, t.dtype) for t in manifest.outputs]
            if got_in != want_in:
                problems.append(f"{path}: inputs {got_in} do not match the manifest {want_in}")
            elif got_out != want_out:
                problems.append(f"{path}: outputs {got_out} do not match the manifest {want_out}")
            else:
                runners["onnx"] = lambda b: run_onnx(session, b)
    ts_info = manifest.formats.get("torchscript")
    if ts_info and ts_info.file not in broken:
        path = directory / ts_info.file
        try:
            import torch  # noqa: F401 - only whether it is installed
        except ImportError:
            warn(f"warning: {path}: not loaded (torch is not installed; TorchScript checks skipped)")
        else:
            try:
                module = load_torchscript(path)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{path}: does not load with torch.jit.load: {_one_line(exc)}")
            else:
                runners["torchscript"] = lambda b: run_torchscript(module, names, b)

    if parity and runners and not (tokenizer and tokenizer in broken):
        try:
            batch = sample_batch(manifest, directory)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{manifest_path}: cannot build a sample batch from its preprocessing spec: {_one_line(exc)}")
            return problems
        outputs = {}
        for fmt, runner in runners.items():
            path = directory / manifest.formats[fmt].file
            try:
                out = runner(batch)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{path}: fails on a sample batch: {_one_line(exc)}")
                continue
            want = _expected_shape(manifest.outputs[0].shape, batch)
            if len(want) != out.ndim or any(w is not None and w != g for w, g in zip(want, out.shape)):
                problems.append(f"{path}: output shape {list(out.shape)} does not match the manifest {manifest.outputs[0].shape}")
            elif not np.isfinite(out).all():
                problems.append(f"{path}: non-finite logits on a sample batch")
            else:
                outputs[fmt] = out
        if len(outputs) == 2:
            diff, same = compare_logits(outputs["onnx"], outputs["torchscript"], manifest.task,
                                        manifest.multi_label, batch.get(contract.ATTENTION_MASK))
            if not within_tolerance(diff, same):
                problems.append(
                    f"{directory / manifest.formats['onnx'].file}: disagrees with "
                    f"{manifest.formats['torchscript'].file} on a sample batch (max abs diff {diff:.3g}, "
                    f"predictions {'match' if same else 'differ'})")
    return problems


def validate(repository: Path | str, parity: bool = True, report: Callable[[str], None] | None = None) -> list[str]:
    """Problems across a model repository (empty: all good). `report` receives OK and warning lines."""
    say = report or (lambda line: None)
    repository = Path(repository)
    if not repository.is_dir():
        return [f"{repository}: not a directory"]
    problems: list[str] = []
    found = 0
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for entry in sorted(model_dir.iterdir()):
            if entry.name.startswith(TMP_PREFIX):
                say(f"warning: {entry}: stray temporary directory from an interrupted export (ignored; safe to delete)")
                continue
            if entry.name.startswith("."):
                continue
            if not entry.is_dir() or not entry.name.isdigit():
                say(f"warning: {entry}: not an integer version directory (ignored)")
                continue
            found += 1
            version_problems = validate_version(entry, parity=parity, warn=say)
            problems.extend(version_problems)
            if not version_problems:
                manifest = Manifest.model_validate_json((entry / MANIFEST_FILE).read_text())
                say(f"OK {model_dir.name}/{entry.name}: {manifest.task}, "
                    f"{'+'.join(manifest.modality_names)}, formats {','.join(manifest.formats)}"
                    + ("" if parity else " (parity sample skipped)"))
    if not found:
        problems.append(f"{repository}: no model versions found (expected NAME/VERSION/{MANIFEST_FILE})")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmserve validate", description="Check every model version in a repository.")
    p.add_argument("repository", type=Path, nargs="?", default=Path("model_repository"))
    p.add_argument("--no-parity", action="store_true", help="skip running the models on a sample batch")
    args = p.parse_args(argv)
    problems = validate(args.repository, parity=not args.no_parity, report=print)
    for line in problems:
        print(f"ERROR {line}")
    if problems:
        print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {args.repository}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Read a data set directory (train/dev/test.jsonl) into preprocessed examples with targets.

Record formats (media paths relative to the JSONL file's directory; media may be absent/null):
  classify: {"id", "text", "image"?, "audio"?, "label": str | [str, ...]}   (a list: multi-label)
  ner:      {"id", "tokens": [...], "tags": [...BIO...], "image"?, "audio"?}
  vqa:      {"id", "question", "image", "audio"?, "answers": [str, ...]}      (or "answer": str)

Two passes. `read_split` checks each line's structure (JSON, fields, BIO tags, labels known
from train.jsonl, media files exist); `encode_split` decodes text and the media of the
modalities the model uses through `models.preprocessing.Preprocessor` -- the same code that
serving runs, so a file training accepts is a file serving accepts. A bad record is reported
as `FILE:LINE: reason`: raised as `DataError`, or, with skip_bad, counted per kind and dropped.

VQA answers are normalised before they are counted or compared (`normalize_answer`):
lowercase, punctuation removed, articles (a, an, the) dropped, number words zero..ten written
as digits, whitespace collapsed -- a light version of the official VQA-v2 normalisation.
Soft targets: score(answer) = min(1, #annotators who gave it / 3).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from models.media import MediaError
from models.ner import IGNORE_INDEX, align_labels, validate_bio
from models.preprocessing import Features, Preprocessor, collate
from training.config import ConfigError

SPLITS = ("train", "dev", "test")


class DataError(ConfigError):
    """A bad data set (first bad record as `FILE:LINE: reason`): printed as one line, exit code 2."""


@dataclass
class Record:
    """One parsed line. `target` is the raw gold value: label(s), BIO tags or normalised answers."""

    path: Path
    line: int
    id: str
    text: str | None = None  # classify text or VQA question
    tokens: list[str] | None = None  # NER words
    image: Path | None = None
    audio: Path | None = None
    target: Any = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Example:
    """A record turned into model inputs (`features`) and a training target (`target`)."""

    record: Record
    features: Features
    target: Any  # int | float32 [C] multi-hot | list[int] token labels | float32 [C] soft scores


@dataclass
class BadRecords:
    """Per-kind counts of skipped records, and the first message of each kind."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, message)

    def handle(self, exc: "_Bad", where: str, skip_bad: bool) -> None:
        """Fail fast with `where: reason`, or count the record as skipped under --skip-bad."""
        message = f"{where}: {exc.reason}"
        if not skip_bad:
            raise DataError(message) from None
        self.add(exc.kind, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts.items()))


class _Bad(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


# ---------------------------------------------------------------------------- answers

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}
_PUNCT = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


def normalize_answer(answer: str) -> str:
    words = _PUNCT.sub(" ", str(answer).lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


# ---------------------------------------------------------------------------- pass 1: structure


def _string(obj: dict, key: str, *, required: bool = True) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            raise _Bad("missing field", f"missing field {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad("wrong type", f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _string_list(obj: dict, key: str) -> list[str]:
    if key not in obj or obj[key] is None:
        raise _Bad("missing field", f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Bad("wrong type", f"field {key!r} must be a list of strings")
    return value


def _media(obj: dict, key: str, base: Path, required: bool = False) -> Path | None:
    rel = _string(obj, key, required=required)
    if rel is None or (rel == "" and not required):
        return None
    path = base / rel
    if not path.is_file():
        raise _Bad("missing file", f"{key} file not found: {rel}")
    return path


def _parse(obj: Any, task: str, base: Path, modalities: Sequence[str]) -> dict:
    if not isinstance(obj, dict):
        raise _Bad("invalid JSON", f"expected a JSON object, got {type(obj).__name__}")
    out: dict[str, Any] = {"id": str(obj.get("id", ""))}
    if task == "classify":
        text = _string(obj, "text")
        if not text.strip():
            raise _Bad("empty text", "empty text")
        if "label" not in obj or obj["label"] is None:
            raise _Bad("missing field", "missing field 'label'")
        label = obj["label"]
        if isinstance(label, str):
            if not label:
                raise _Bad("wrong type", "empty label")
        elif not (isinstance(label, list) and label and all(isinstance(x, str) and x for x in label)):
            raise _Bad("wrong type", "field 'label' must be a string or a non-empty list of strings")
        out.update(text=text, target=label)
    elif task == "ner":
        tokens, tags = _string_list(obj, "tokens"), _string_list(obj, "tags")
        if not tokens:
            raise _Bad("empty text", "empty tokens")
        if any(not t.strip() for t in tokens):
            raise _Bad("empty text", "empty token")
        if len(tags) != len(tokens):
            raise _Bad("tags do not match tokens", f"{len(tags)} tags for {len(tokens)} tokens")
        reason = validate_bio(tags)
        if reason:
            raise _Bad("invalid BIO tags", reason)
        out.update(tokens=tokens, target=tags)
    else:  # vqa
        question = _string(obj, "question")
        if not question.strip():
            raise _Bad("empty text", "empty question")
        if obj.get("answers") is not None:
            answers = _string_list(obj, "answers")
        elif obj.get("answer") is not None:
            answers = [_string(obj, "answer")]
        else:
            raise _Bad("missing field", "missing field 'answers'")
        answers = [normalize_answer(a) for a in answers]
        answers = [a for a in answers if a]
        if not answers:
            raise _Bad("empty text", "no non-empty answer")
        if obj.get("image") is None:
            raise _Bad("missing field", "missing field 'image' (VQA needs a picture)")
        out.update(text=question, target=answers)
    # media of modalities the model does not use are not opened (nor required to exist)
    if "image" in modalities or task == "vqa":
        out["image"] = _media(obj, "image", base)
    if "audio" in modalities:
        out["audio"] = _media(obj, "audio", base)
    return out


def read_split(
    path: Path,
    task: str,
    modalities: Sequence[str],
    *,
    known: set[str] | None = None,
    skip_bad: bool = False,
    bad: BadRecords | None = None,
) -> list[Record]:
    """Parse and check one JSONL file. `known`: labels (or tags) of train.jsonl; anything else is bad."""
    path = Path(path)
    base = path.parent
    bad = bad if bad is not None else BadRecords()
    records: list[Record] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _Bad("invalid JSON", f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            parsed = _parse(obj, task, base, modalities)
            if known is not None:
                values = parsed["target"]
                if task == "classify":
                    values = [values] if isinstance(values, str) else values
                    unknown = [v for v in values if v not in known]
                    if unknown:
                        raise _Bad("unknown label", f"unknown label {unknown[0]!r} (not in train.jsonl)")
                elif task == "ner":
                    unknown = [t for t in values if t != "O" and t not in known]
                    if unknown:
                        raise _Bad("unknown label", f"unknown tag {unknown[0]!r} (not in train.jsonl)")
        except _Bad as exc:
            bad.handle(exc, f"{path}:{number}", skip_bad)
            continue
        records.append(Record(path=path, line=number, **parsed))
    return records


def label_space(task: str, train: list[Record], top_answers: int | None = None) -> tuple[list[str], bool]:
    """(labels, multi_label) from the training records.

    classify: sorted distinct labels (multi-label when any record has a list);
    ner: "O" then the sorted B-/I- tags (both prefixes of every type seen);
    vqa: the answer vocabulary, sorted, optionally the `top_answers` most frequent.
    """
    if task == "classify":
        multi = any(isinstance(r.target, list) for r in train)
        names = {x for r in train for x in ([r.target] if isinstance(r.target, str) else r.target)}
        return sorted(names), multi
    if task == "ner":
        kinds = {t.split("-", 1)[1] for r in train for t in r.target if t != "O"}
        return ["O"] + [f"{p}-{k}" for k in sorted(kinds) for p in ("B", "I")], False
    counts = Counter(a for r in train for a in set(r.target))
    ranked = sorted(counts, key=lambda a: (-counts[a], a))
    if top_answers:
        ranked = ranked[:top_answers]
    return sorted(ranked), False


def vqa_soft_scores(answers: Sequence[str], index: dict[str, int]) -> np.ndarray:
    """float32 [C]: min(1, count/3) for each vocabulary answer among the annotators' answers."""
    scores = np.zeros(len(index), dtype=np.float32)
    for answer, n in Counter(answers).items():
        if answer in index:
            scores[index[answer]] = min(1.0, n / 3.0)
    return scores


# ---------------------------------------------------------------------------- pass 2: features


def encode_split(
    records: list[Record],
    task: str,
    modalities: Sequence[str],
    pre: Preprocessor,
    labels: list[str],
    multi_label: bool,
    *,
    skip_bad: bool = False,
    bad: BadRecords | None = None,
) -> list[Example]:
    """Tokenise text and decode media once per record; MediaError makes a bad record."""
    bad = bad if bad is not None else BadRecords()
    index = {name: i for i, name in enumerate(labels)}
    examples = []
    for r in records:
        try:
            features = Features()
            if "text" in modalities:
                if task == "ner":
                    features = pre.encode_words(r.tokens)
                else:
                    features = pre.encode_text(r.text)
            for kind, path in (("image", r.image), ("audio", r.audio)):
                if kind not in modalities or path is None:
                    continue
                try:
                    data = path.read_bytes()
                    if kind == "image":
                        features.pixel_values = pre.image_from_bytes(data)
                    else:
                        features.audio_features, features.audio_frames = pre.audio_clip(data)
                except MediaError as exc:
                    raise _Bad(f"undecodable {kind}", f"{kind} {path.relative_to(r.path.parent)}: {exc.message}")
                except OSError as exc:
                    raise _Bad("missing file", f"{kind} file unreadable: {path}: {exc.strerror}")
            if task == "classify":
                if multi_label:
                    target = np.zeros(len(labels), dtype=np.float32)
                    for name in [r.target] if isinstance(r.target, str) else r.target:
                        target[index[name]] = 1.0
                else:
                    target = index[r.target]
            elif task == "ner":
                word_labels = [index.get(t, index["O"]) for t in r.target]
                target = align_labels(features.word_ids, word_labels) if features.word_ids is not None else []
            else:
                target = vqa_soft_scores(r.target, index)
        except _Bad as exc:
            bad.handle(exc, r.where, skip_bad)
            continue
        examples.append(Example(record=r, features=features, target=target))
    return examples


# ---------------------------------------------------------------------------- whole data set


@dataclass
class RawDataset:
    splits: dict[str, list[Record]]  # "train", "dev" and (when test.jsonl exists) "test"
    labels: list[str]
    multi_label: bool
    bad: dict[str, BadRecords]

    def texts(self) -> list[str]:
        """Training texts (the tokenizer's corpus)."""
        return [" ".join(r.tokens) if r.tokens is not None else r.text for r in self.splits["train"]]


def read_dataset(
    data_dir: Path,
    task: str,
    modalities: Sequence[str],
    *,
    skip_bad: bool = False,
    multi_label: bool | None = None,
    top_answers: int | None = None,
    max_train_samples: int | None = None,
    splits: Sequence[str] = SPLITS,
) -> RawDataset:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found")
    for required in ("train", "dev"):
        if required in splits and not (data_dir / f"{required}.jsonl").is_file():
            raise DataError(f"{data_dir}: missing {required}.jsonl")
    bad = {s: BadRecords() for s in splits}
    out: dict[str, list[Record]] = {}
    out["train"] = read_split(data_dir / "train.jsonl", task, modalities, skip_bad=skip_bad, bad=bad["train"])
    if not out["train"]:
        raise DataError(f"{data_dir / 'train.jsonl'}: no usable records")
    if max_train_samples:
        out["train"] = out["train"][:max_train_samples]
    labels, inferred = label_space(task, out["train"], top_answers)
    multi = inferred if multi_label is None else multi_label
    known = set(labels) if task in ("classify", "ner") else None
    for split in splits:
        if split == "train":
            continue
        path = data_dir / f"{split}.jsonl"
        if path.is_file():
            out[split] = read_split(path, task, modalities, known=known, skip_bad=skip_bad, bad=bad[split])
    return RawDataset(splits=out, labels=labels, multi_label=multi, bad=bad)


# ---------------------------------------------------------------------------- torch side


def make_collate_fn(task: str, modalities: Sequence[str], spec, pad_id: int = 0,
                    multi_label: bool = False) -> Callable[[list[Example]], dict]:
    """Batch examples into the tensor contract (torch tensors) plus `labels`.

    labels: classify int64 [B] (float32 [B, C] multi-hot when multi-label); ner int64 [B, T]
    aligned with input_ids, IGNORE_INDEX (-100) on padding, specials and non-first sub-tokens;
    vqa float32 [B, C] soft scores.
    """
    import torch

    def collate_fn(batch: list[Example]) -> dict:
        arrays = collate([e.features for e in batch], modalities, spec, pad_id=pad_id)
        out = {k: torch.from_numpy(v) for k, v in arrays.items()}
        if task == "classify":
            if multi_label:
                out["labels"] = torch.from_numpy(np.stack([e.target for e in batch]))
            else:
                out["labels"] = torch.tensor([e.target for e in batch], dtype=torch.long)
        elif task == "ner":
            longest = out["input_ids"].shape[1] if "input_ids" in out else max(len(e.target) for e in batch)
            labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
            for i, e in enumerate(batch):
                labels[i, : len(e.target)] = torch.tensor(e.target, dtype=torch.long)
            out["labels"] = labels
        else:
            out["labels"] = torch.from_numpy(np.stack([e.target for e in batch]))
        return out

    return collate_fn

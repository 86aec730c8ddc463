"""Word-level NER helpers (no torch): split text into words, align BIO labels to sub-word tokens,
read predictions off first sub-tokens, and turn BIO tags into character-offset entities."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

IGNORE_INDEX = -100  # label of tokens the loss skips (special tokens, non-first sub-tokens)

# a run of letters/digits/underscore, or a single other non-space character
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Word:
    """A word of the submitted text: `text == original[start:end]`."""

    text: str
    start: int
    end: int


def split_words(text: str) -> list[Word]:
    """Split on whitespace and punctuation (each punctuation mark is its own word), keeping offsets."""
    return [Word(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def validate_bio(tags: Sequence[str]) -> str | None:
    """Why `tags` are not BIO tags ("O", "B-TYPE", "I-TYPE"), or None when they all are."""
    for tag in tags:
        if tag == "O":
            continue
        prefix, _, kind = tag.partition("-")
        if prefix not in ("B", "I") or not kind:
            return f"tag {tag!r} is not BIO: expected 'O', 'B-TYPE' or 'I-TYPE'"
    return None


def bio_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, start, end_exclusive) word spans of the entities in a BIO tag sequence.

    conlleval semantics: an entity starts at B-X, or at an I-X that does not continue an X
    entity; it runs while the following tags are I-X. Raises ValueError on a non-BIO tag.
    """
    reason = validate_bio(tags)
    if reason:
        raise ValueError(reason)
    spans: list[tuple[str, int, int]] = []
    kind, start = None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, tag_kind = tag.partition("-")
        continues = prefix == "I" and tag_kind == kind
        if kind is not None and not continues:
            spans.append((kind, start, i))
            kind = None
        if prefix == "B" or (prefix == "I" and not continues):
            kind, start = tag_kind, i
    return spans


def align_labels(word_ids: Sequence[int | None], word_label_ids: Sequence[int]) -> list[int]:
    """Per-token label ids: the word's label on its first sub-token, IGNORE_INDEX (-100) elsewhere."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(word_label_ids[word] if word is not None and word != previous else IGNORE_INDEX)
        previous = word
    return labels


def first_token_predictions(
    word_ids: Sequence[int | None], probs: np.ndarray, num_words: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(tag ids int64 [W], scores float32 [W]) from per-token probabilities float [T, C].

    Each word takes the argmax class of its first sub-token and that class's probability.
    W is `num_words` (default: highest word id + 1); a word with no token (cut off by
    truncation) gets tag id -1 and score 0.0.
    """
    if num_words is None:
        num_words = max((w for w in word_ids if w is not None), default=-1) + 1
    tag_ids = np.full(num_words, -1, dtype=np.int64)
    scores = np.zeros(num_words, dtype=np.float32)
    seen: set[int] = set()
    for token, word in enumerate(word_ids):
        if word is None or word in seen or word >= num_words:
            continue
        seen.add(word)
        tag_ids[word] = int(np.argmax(probs[token]))
        scores[word] = probs[token, tag_ids[word]]
    return tag_ids, scores


def entities(
    words: Sequence[Word], tags: Sequence[str], scores: Sequence[float], text: str | None = None
) -> list[dict]:
    """Entities as {"text", "type", "start", "end", "score"} with character offsets.

    `text` is the string the words were split from; an entity's text is then exactly
    text[start:end]. Without it the words' own texts are joined by single spaces. score is the
    mean of the entity's word scores. Only words[:len(tags)] are considered.
    """
    found = []
    for kind, first, stop in bio_spans(tags):
        span = words[first:stop]
        start, end = span[0].start, span[-1].end
        found.append(
            {
                "text": text[start:end] if text is not None else " ".join(w.text for w in span),
                "type": kind,
                "start": start,
                "end": end,
                "score": float(np.mean([scores[i] for i in range(first, stop)])),
            }
        )
    return found

"""Word-level NER helpers against hand-computed examples, and end to end from text to entities."""
from __future__ import annotations

import numpy as np
import pytest

from models.ner import (
    IGNORE_INDEX,
    Word,
    align_labels,
    bio_spans,
    entities,
    first_token_predictions,
    split_words,
    validate_bio,
)
from models.preprocessing import Preprocessor
from models.spec import PreprocessSpec, TextSpec
from models.tokenizer import train_tiny_tokenizer


def test_split_words_keeps_offsets_into_the_original_text():
    text = "  Dr. Müller  visited New-York, twice!"
    words = split_words(text)
    assert [w.text for w in words] == ["Dr", ".", "Müller", "visited", "New", "-", "York", ",", "twice", "!"]
    assert all(text[w.start : w.end] == w.text for w in words)
    assert words[0] == Word("Dr", 2, 4)
    assert split_words("   ") == []


@pytest.mark.parametrize(
    "tags, spans",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
        (["I-PER", "I-PER", "O"], [("PER", 0, 2)]),  # I- without B- starts an entity
        (["B-PER", "B-PER"], [("PER", 0, 1), ("PER", 1, 2)]),
        (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),  # type change starts anew
        (["O", "O"], []),
        ([], []),
        (["O", "B-ORG", "I-ORG"], [("ORG", 1, 3)]),  # entity running to the end
    ],
)
def test_bio_spans_follow_conlleval(tags, spans):
    assert bio_spans(tags) == spans


def test_validate_bio():
    assert validate_bio(["O", "B-PER", "I-PER", "B-MISC_2"]) is None
    assert "X-FOO" in validate_bio(["O", "X-FOO"])
    assert validate_bio(["B-"]) is not None
    assert validate_bio(["PER"]) is not None
    with pytest.raises(ValueError, match="X-FOO"):
        bio_spans(["X-FOO"])


def test_align_labels_marks_first_subtoken_only():
    word_ids = [None, 0, 1, 1, 1, 2, None]
    assert align_labels(word_ids, [3, 1, 0]) == [IGNORE_INDEX, 3, 1, IGNORE_INDEX, IGNORE_INDEX, 0, IGNORE_INDEX]


def test_first_token_predictions_reads_first_subtokens():
    word_ids = [None, 0, 1, 1, None]
    probs = np.array(
        [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05]],
        dtype=np.float32,
    )
    tags, scores = first_token_predictions(word_ids, probs)
    assert tags.tolist() == [1, 2] and tags.dtype == np.int64
    np.testing.assert_allclose(scores, [0.8, 0.6])
    tags, scores = first_token_predictions(word_ids, probs, num_words=3)  # word 2 truncated away
    assert tags.tolist() == [1, 2, -1] and scores[2] == 0.0


def test_entities_map_back_to_the_submitted_text():
    text = "Angela  Merkel met Joe Biden in Berlin."
    words = split_words(text)
    tags = ["B-PER", "I-PER", "O", "B-PER", "I-PER", "O", "B-LOC", "O"]
    scores = [0.9, 0.7, 0.99, 0.6, 0.8, 0.95, 0.5, 0.99]
    found = entities(words, tags, scores, text=text)
    assert found == [
        {"text": "Angela  Merkel", "type": "PER", "start": 0, "end": 14, "score": pytest.approx(0.8)},
        {"text": "Joe Biden", "type": "PER", "start": 19, "end": 28, "score": pytest.approx(0.7)},
        {"text": "Berlin", "type": "LOC", "start": 32, "end": 38, "score": pytest.approx(0.5)},
    ]
    assert entities(words, tags, scores)[0]["text"] == "Angela Merkel"  # no text: words joined
    assert entities(words, ["O"] * 5, scores[:5]) == []


def test_text_to_entities_through_the_tokenizer(tmp_path):
    labels = ["O", "B-LOC", "I-LOC"]
    train_tiny_tokenizer(["new york is far from paris"], vocab_size=60).save(str(tmp_path / "tokenizer.json"))
    pre = Preprocessor(PreprocessSpec(text=TextSpec()), tmp_path)
    text = "I love New York!"
    words = split_words(text)
    features = pre.encode_words([w.text for w in words])
    # a "model" that tags each token with its word's gold label
    gold = [0, 0, 1, 2, 0]
    token_labels = align_labels(features.word_ids, gold)
    assert [label for label in token_labels if label != IGNORE_INDEX] == gold
    probs = np.full((len(features.word_ids), 3), 0.1, dtype=np.float32)
    for t, w in enumerate(features.word_ids):
        probs[t, gold[w] if w is not None else 0] = 0.8
    tag_ids, scores = first_token_predictions(features.word_ids, probs, num_words=len(words))
    found = entities(words, [labels[i] for i in tag_ids], scores, text=text)
    assert found == [{"text": "New York", "type": "LOC", "start": 7, "end": 15, "score": pytest.approx(0.8)}]

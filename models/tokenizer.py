"""Train a small BERT-style WordPiece tokenizer for the randomly initialised "tiny" text encoder.

The vocabulary is learned here rather than with `tokenizers.trainers.WordPieceTrainer`, whose
result changes from run to run: it breaks ties between equally frequent merges by token ids
assigned in hash-map order. Same algorithm (byte-pair merges, continuation pieces prefixed
with "##"), with ties broken alphabetically, so the same corpus gives the same tokenizer.json.
"""
from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]  # in id order: [PAD] is 0
PREFIX = "##"


def _merge(symbols: list[str], a: str, b: str, joined: str) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            out.append(joined)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_wordpiece_vocab(word_counts: dict[str, int], vocab_size: int) -> list[str]:
    """Special tokens, every character (plain and "##"-continued), then the most frequent merges.

    Deterministic: merges are taken by count, ties by the alphabetical order of the pair.
    """
    words = [([w[0]] + [PREFIX + c for c in w[1:]], n) for w, n in sorted(word_counts.items()) if w]
    vocab = SPECIAL_TOKENS + sorted({s for symbols, _ in words for s in symbols})
    known = set(vocab)
    pair_counts: Counter[tuple[str, str]] = Counter()
    holders: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (symbols, n) in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += n
            holders[pair].add(i)
    heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count <= 0:
            continue
        # counts only ever drop without a push, so a stale entry is re-queued at its true count
        if count != -negative:
            heapq.heappush(heap, (-count, a, b))
            continue
        joined = a + b[len(PREFIX):]
        if joined not in known:
            vocab.append(joined)
            known.add(joined)
        for i in sorted(holders.pop((a, b))):
            symbols, n = words[i]
            merged = _merge(symbols, a, b, joined)
            if merged == symbols:
                continue
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] -= n
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += n
                holders[pair].add(i)
                heapq.heappush(heap, (-pair_counts[pair], *pair))
            words[i] = (merged, n)
    return vocab


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
    """A lowercasing WordPiece tokenizer trained on `texts`, wrapping sequences in [CLS] ... [SEP].

    Ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then the learned vocabulary (at most
    `vocab_size` entries in all, more only if the corpus has more distinct characters).
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    vocab = learn_wordpiece_vocab(word_counts, vocab_size)
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token=UNK))
    # registered as special so they are never split, and decode(skip_special_tokens) drops them
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece(prefix=PREFIX)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab.index(CLS)), (SEP, vocab.index(SEP))],
    )
    return tokenizer

"""A small umT5-style tokenizer built in code: the real one is 4 MB of SentencePiece and cannot be downloaded here."""

from __future__ import annotations

import string

from transformers import T5Tokenizer

from posegen_cli.pipelines.text import DEFAULT_NEGATIVE

WORDS = [
    "a",
    "woman",
    "man",
    "girl",
    "boy",
    "person",
    "is",
    "are",
    "the",
    "of",
    "and",
    "in",
    "on",
    "with",
    "her",
    "his",
    "dancing",
    "walking",
    "standing",
    "wearing",
    "dress",
    "shirt",
    "black",
    "white",
    "red",
    "blue",
    "long",
    "short",
    "hair",
    "background",
    "street",
    "room",
    "studio",
    "video",
    "she",
    "he",
    "moves",
    "arms",
    "legs",
]
"""Whole-word pieces, so prompts tokenize into few, stable ids as with the real vocabulary."""


def tiny_vocab() -> list[tuple[str, float]]:
    """Unigram pieces with log-probability scores: T5's three specials first (<pad>=0, </s>=1, <unk>=2)."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + DEFAULT_NEGATIVE))
    candidates = [("\u2581" + w, -3.0) for w in WORDS] + [(c, -8.0) for c in chars] + [("\u2581" + c, -9.0) for c in chars]
    for piece, score in candidates:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))
    return pieces


def make_tiny_tokenizer() -> T5Tokenizer:
    """A T5 (umT5-compatible) tokenizer: Unigram over :func:`tiny_vocab`, ``</s>`` appended, no sentinel ids."""
    return T5Tokenizer(vocab=tiny_vocab(), extra_ids=0, model_max_length=512)

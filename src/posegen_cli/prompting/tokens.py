"""Where the subject word sits among the caption's umT5 tokens (port.md §5).

Background K/V sharing reads the cross-attention column of the subject word ("woman", ...). The release knew four
words by hard-coded umT5 ids, matched them as case-sensitive substrings ("man" inside "human") and crashed when the
id was absent. Here the word is found as a whole word, case-insensitively, in exactly the text the encoder sees, and
every word piece overlapping it is returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import regex
from transformers import PreTrainedTokenizerBase

from posegen_cli.errors import InputError, option
from posegen_cli.prompting.umt5 import TEXT_LEN, clean_prompt, tokenize_text

RELEASE_TOKEN_IDS: dict[str, int] = {"woman": 27502, "girl": 15146, "man": 621, "boy": 18942}
"""The release's four subject words and their umT5 ids (the pieces "▁woman", ...), in its lookup order."""

SUBJECT_WORDS: tuple[str, ...] = (
    "woman", "girl", "man", "boy",
    "lady", "gentleman", "guy", "person", "child", "kid", "teenager", "teen", "toddler", "baby",
    "dancer", "athlete", "performer", "singer", "actor", "actress", "character", "individual",
)
"""Subject nouns tried in order: the release's four first so its choice is kept, then other words for a person."""

_DETERMINERS = frozenset(["a", "an", "the", "this", "that", "one", "another"])
_STOP = frozenset(
    [
        "of", "in", "on", "at", "with", "by", "from", "for", "to", "into", "onto", "over", "under", "near", "behind",
        "beside", "against", "and", "or", "but", "while", "as", "who", "which", "that", "is", "are", "was", "were", "be",
        "being", "has", "have", "had", "wears", "wearing", "stands", "standing", "sits", "sitting", "holds", "holding",
        "looks", "looking", "its", "his", "her", "their",
    ]
)
_WORD = regex.compile(r"[\p{L}\p{N}][\p{L}\p{N}'’-]*|[^\s\p{L}\p{N}]")
_NOUN_PHRASE_WORDS = 4


@dataclass(frozen=True)
class SubjectTokens:
    """The subject word, its character span in the cleaned prompt, and its token positions among the 512 ids."""

    word: str
    start: int
    end: int
    positions: list[int]
    input_ids: list[int]


def word_pattern(word: str) -> regex.Pattern[str]:
    """Case-insensitive whole-word pattern; a hyphen joins words, so "post-man" holds no "man" but "woman's" holds "woman"."""
    parts = [regex.escape(p) for p in word.split()]
    return regex.compile(r"(?<![\p{L}\p{N}_-])" + r"\s+".join(parts) + r"(?![\p{L}\p{N}_-])", regex.IGNORECASE)


def candidate_nouns(text: str) -> list[str]:
    """Heads of the noun phrases that follow an article ("a young woman in" gives "woman"), for error messages.

    A heuristic without a tagger: after a determiner, take up to four words until punctuation, a preposition or a
    verb-like word (an "-ing" word after the first), and keep the last one.
    """
    words = [w.lower() for w in _WORD.findall(text)]
    found: list[str] = []
    for i, word in enumerate(words):
        if word not in _DETERMINERS:
            continue
        phrase: list[str] = []
        for nxt in words[i + 1 : i + 1 + _NOUN_PHRASE_WORDS]:
            if nxt in _STOP or nxt in _DETERMINERS or not nxt[0].isalnum() or (phrase and nxt.endswith("ing")):
                break
            phrase.append(nxt)
        if phrase and phrase[-1] not in found:
            found.append(phrase[-1])
    return found


def _no_subject_error(text: str, subject: str | None) -> InputError:
    nouns = candidate_nouns(text)
    listed = ", ".join(nouns[:12]) if nouns else "none"
    if subject is not None:
        what = f"{option('subject')} {subject!r} is not a whole word of the prompt"
    else:
        what = f"the prompt names no subject word ({', '.join(SUBJECT_WORDS[:6])}, ...)"
    return InputError(
        f"{what}; nouns found: {listed}; pass the one that names the person with {option('subject')} WORD, "
        f"or a caption that names them with {option('prompt')} TEXT"
    )


def find_subject(text: str, subject: str | None = None) -> tuple[str, int, int]:
    """The subject word and its first whole-word span in ``text`` (already cleaned); InputError when there is none.

    Without ``subject``, the first word of :data:`SUBJECT_WORDS` present in ``text`` wins (priority, not position,
    like the release).
    """
    words = [subject.strip()] if subject is not None else list(SUBJECT_WORDS)
    if subject is not None and not words[0]:
        raise InputError(f"{option('subject')} is empty (pass the word that names the person, e.g. {option('subject')} woman)")
    for word in words:
        match = word_pattern(word).search(text)
        if match:
            return word.lower(), match.start(), match.end()
    raise _no_subject_error(text, subject)


def overlapping_positions(offsets: Sequence[tuple[int, int]], special: Sequence[int], start: int, end: int) -> list[int]:
    """Indices of the non-special tokens whose character span overlaps ``[start, end)``.

    SentencePiece pieces may include the "▁" standing for the preceding space in their span, so overlap, not
    equality, decides; a lone "▁" piece covers only the space and is left out.
    """
    return [
        i for i, ((s, e), sp) in enumerate(zip(offsets, special))
        if not sp and e > s and s < end and e > start
    ]


def locate_subject(
    tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str | None = None, *, max_length: int = TEXT_LEN
) -> SubjectTokens:
    """Clean ``prompt`` as the text encoder does, pick the subject word and return all its token positions.

    The ids come from :func:`~posegen_cli.prompting.umt5.tokenize_text`, the text encoder's own call, so the
    positions index exactly what the encoder sees.
    """
    text = clean_prompt(prompt)
    word, start, end = find_subject(text, subject)
    enc = tokenize_text(tokenizer, text, max_length=max_length, offsets=True)
    positions = overlapping_positions(enc["offset_mapping"], enc["special_tokens_mask"], start, end)
    if not positions:
        raise InputError(
            f"the subject word {word!r} starts at character {start}, past the {max_length}-token limit of the text encoder "
            f"(shorten the prompt or put the subject earlier, e.g. with {option('prompt')})"
        )
    return SubjectTokens(word=word, start=start, end=end, positions=positions, input_ids=list(enc["input_ids"]))


def release_choice(tokenizer: PreTrainedTokenizerBase, input_ids: Sequence[int], prompt: str) -> tuple[str, int | None] | None:
    """What the release reads for ``prompt`` (as written, before cleaning): its word and token position.

    The release takes the first of its four words that is a case-sensitive substring ("man" inside "Woman" or
    "human"), then the first index of that word's single piece "▁word". None when none of the four occurs (it
    stopped and asked for an edit); the position is None where the piece is absent (it crashed).
    """
    for word in RELEASE_TOKEN_IDS:
        if word in prompt:
            ids = list(input_ids)
            piece_id = tokenizer.convert_tokens_to_ids("\u2581" + word)
            if piece_id is None or piece_id == tokenizer.unk_token_id or piece_id not in ids:
                return word, None
            return word, ids.index(piece_id)
    return None

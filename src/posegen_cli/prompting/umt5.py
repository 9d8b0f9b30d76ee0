"""The text Wan's umT5 encoder sees: its cleaning, its 512-token context and the one tokenizer call (port.md §4.1, §5).

The text encoder (``pipelines/text.py``) and the subject lookup (``prompting/tokens.py``) both tokenize through
:func:`tokenize_text` here, so the subject's token positions index exactly the ids the encoder is given.
"""

from __future__ import annotations

import html
from pathlib import Path

import ftfy
import regex
import torch
from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizerBase

from posegen_cli.errors import InputError

TEXT_LEN = 512
"""umT5 context length of Wan: the DiT's cross-attention split hard-codes 512 text tokens, so every prompt is padded
(or truncated) to exactly this many."""

_WHITESPACE = regex.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """ftfy, two rounds of HTML unescaping, then whitespace collapsed to single spaces; case is kept.

    Uses the ``regex`` module like the release: ``re`` treats a few control characters as whitespace that
    ``regex`` does not, so the same module keeps the cleaned text, and every token offset, identical. Cleaning is
    not idempotent (``&amp;amp;`` unescapes once per call), so it is applied exactly once, by whoever tokenizes.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The umT5 tokenizer folder of the Wan I2V repository (``tokenizer/``)."""
    return AutoTokenizer.from_pretrained(str(path))


def tokenize_text(
    tokenizer: PreTrainedTokenizerBase, text: str, *, max_length: int = TEXT_LEN, offsets: bool = False
) -> BatchEncoding:
    """Tokenize already-cleaned ``text`` as Wan's encoder does: ``</s>`` appended, truncated and padded to ``max_length``.

    Returns one unbatched encoding (lists of ``max_length`` ints: ``input_ids``, ``attention_mask``); ``offsets=True``
    adds ``offset_mapping`` (character spans in ``text``) and ``special_tokens_mask``, which need a fast tokenizer.
    Raises InputError when offsets are asked of a slow tokenizer.
    """
    if offsets and not tokenizer.is_fast:
        raise InputError(
            f"the tokenizer {type(tokenizer).__name__} gives no character offsets "
            f"(load the Wan umT5 tokenizer folder with its tokenizer.json)"
        )
    return tokenizer(
        text,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_offsets_mapping=offsets,
        return_special_tokens_mask=offsets,
    )


def tokenize(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask, int64 [1, 512], of ``prompt`` after :func:`clean_prompt`: the text encoder's input."""
    batch = tokenize_text(tokenizer, clean_prompt(prompt))
    return torch.tensor([batch["input_ids"]]), torch.tensor([batch["attention_mask"]])

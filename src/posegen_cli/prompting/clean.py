"""The text cleaning Wan's text encoder applies before umT5 tokenization (port.md §4.1).

The pipeline imports :func:`clean_prompt` for text encoding and the subject lookup uses it too, so that character
offsets refer to exactly the text the encoder sees.
"""

from __future__ import annotations

import html

import ftfy
import regex

_WHITESPACE = regex.compile(r"\s+")
_LINE_BREAKS = regex.compile(r"[\r\n]+")


def clean_prompt(text: str) -> str:
    """ftfy, two rounds of HTML unescaping, then whitespace collapsed to single spaces; case is kept.

    Uses the ``regex`` module like the release: ``re`` treats a few control characters as whitespace that
    ``regex`` does not, so the same module keeps the cleaned text, and every token offset, identical.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def one_line(text: str) -> str:
    """Join a prompt's lines with spaces: prompt files are read line by line and only one line is used.

    Only line breaks are touched, so cleaning the result gives the same text as cleaning the input.
    """
    return _LINE_BREAKS.sub(" ", text).strip()

"""The text cleaning Wan's text encoder applies before umT5 tokenization (port.md §4.1).

The pipeline imports :func:`clean_prompt` for text encoding and the subject lookup uses it too, so that character
offsets refer to exactly the text the encoder sees.
"""

from __future__ import annotations

import html

import ftfy
import regex

_WHITESPACE = regex.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """ftfy, two rounds of HTML unescaping, then whitespace collapsed to single spaces; case is kept.

    Uses the ``regex`` module like the release: ``re`` treats a few control characters as whitespace that
    ``regex`` does not, so the same module keeps the cleaned text, and every token offset, identical.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def prompt_line(text: str) -> str:
    """The one line of a prompt the release encodes: the text itself if it has one line, else its longest line.

    The release reads prompt files with ``readlines`` (universal newlines) and keeps the first longest line,
    so a multi-paragraph caption or prompt is reduced the same way here.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return max(lines, key=len).strip() if len(lines) > 1 else text.strip()

"""The release's rule for which line of a multi-line prompt or caption is encoded."""

from __future__ import annotations


def prompt_line(text: str) -> str:
    """The one line of a prompt the release encodes: the text itself if it has one line, else its longest line.

    The release reads prompt files with ``readlines`` (universal newlines) and keeps the first longest line,
    so a multi-paragraph caption or prompt is reduced the same way here.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return max(lines, key=len).strip() if len(lines) > 1 else text.strip()

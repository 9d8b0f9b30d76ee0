"""Expected failures: the CLI prints their message on one line and exits with their code.

Library messages never spell a command-line flag. Where advice names a setting they write :func:`option` (the
library parameter, e.g. ``option("work_dir")``); :func:`phrase` turns those references into words when the message
is shown. The default spelling is the command line's convention (``work_dir`` is the flag ``work-dir`` with two
leading dashes); ``cli.py`` passes its own table for the flags it names differently.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

_OPTION_REF = re.compile(r"\{@([a-z][a-z0-9_]*)\}")

Spelling = Callable[[str], str]


def option(name: str) -> str:
    """A reference to the setting ``name`` (a library parameter) inside a message, spelled when the message is shown."""
    return "{@" + name + "}"


def command_line_spelling(name: str, table: Mapping[str, str] | None = None) -> str:
    """How the command line names the setting ``name``: ``table[name]`` if given, else the two-dash flag of that name."""
    if table is not None and name in table:
        return table[name]
    return "-" + "-" + name.replace("_", "-")


def phrase(message: str, spell: Spelling = command_line_spelling) -> str:
    """``message`` with every :func:`option` reference replaced by ``spell(name)``."""
    return _OPTION_REF.sub(lambda match: spell(match.group(1)), message)


class PosegenError(Exception):
    """An error the user can fix; never shown with a traceback unless the CLI is asked for one.

    ``message`` may hold :func:`option` references; ``str(error)`` spells them the command line's way and
    :meth:`phrase` with any other spelling.
    """

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def phrase(self, spell: Spelling = command_line_spelling) -> str:
        """The message with its setting references spelled by ``spell``."""
        return phrase(self.message, spell)

    def __str__(self) -> str:
        return self.phrase()


class InputError(PosegenError):
    """A bad input file or option (exit code 2)."""


class OptionError(InputError):
    """A setting whose value cannot be used: which setting (``option``, the library parameter), the value, and either
    the allowed ``choices`` or the ``problem`` (text that may hold :func:`option` references)."""

    def __init__(self, option_name: str, value: object, choices: Sequence[str] | None = None, *, problem: str | None = None) -> None:
        self.option, self.value, self.choices, self.problem = option_name, value, tuple(choices or ()), problem
        if problem is not None:
            message = f"{option(option_name)} {problem}"
        else:
            message = f"{option(option_name)} {value!r} is not known (use {', '.join(self.choices)})"
        super().__init__(message)


class MissingModelError(PosegenError):
    """A model is not on disk and cannot be downloaded now (exit code 3)."""

    exit_code = 3


class ResourceError(PosegenError):
    """The machine ran out of something: GPU memory, disk (exit code 4)."""

    exit_code = 4


def require_file(path: str | Path, what: str) -> Path:
    """Return ``path`` as a Path, or raise an InputError naming it and what it should be."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p} (check the path)")
    if not p.is_file():
        raise InputError(f"{what} is not a file: {p} (pass a file, not a folder)")
    return p


@contextlib.contextmanager
def out_of_memory_as(message: str) -> Iterator[None]:
    """Turn a CUDA out-of-memory error inside the block into a one-line ResourceError(``message``).

    torch is imported only on entry, so the CLI can import this module without it.
    """
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise ResourceError(message) from None

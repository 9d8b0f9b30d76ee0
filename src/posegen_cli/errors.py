"""Expected failures: the CLI prints their message on one line and exits with their code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class PosegenError(Exception):
    """An error the user can fix; never shown with a traceback unless ``--debug``."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(PosegenError):
    """A bad input file or option (exit code 2)."""


class MissingModelError(PosegenError):
    """A model is not on disk and cannot be downloaded now (exit code 3)."""

    exit_code = 3


class MissingModelsError(MissingModelError):
    """Models a job needs that are not on disk and cannot be fetched by this run (exit code 3).

    Carries the facts (``names``, ``models_dir``, ``offline``) so the CLI can print the one command that
    fetches them all.
    """

    def __init__(self, names: list[str], models_dir: Path | None, offline: bool) -> None:
        if models_dir is not None:
            where = f"in {models_dir}"
        else:
            where = "in the Hugging Face cache" + (" and HF_HUB_OFFLINE is set" if offline else "")
        super().__init__(f"{len(names)} model(s) this job needs are not {where}: {', '.join(names)}")
        self.names = list(names)
        self.models_dir = models_dir
        self.offline = offline


class ResourceError(PosegenError):
    """The machine ran out of something: GPU memory, disk (exit code 4)."""

    exit_code = 4


def require_file(path: str | Path, what: str) -> Path:
    """Return ``path`` as a Path, or raise an InputError naming it and what it should be (missing, a folder, empty)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p} (check the path)")
    if not p.is_file():
        raise InputError(f"{what} is not a file: {p} (pass a file, not a folder)")
    if p.stat().st_size == 0:
        raise InputError(f"{what} {p} is empty: the file has 0 bytes (copy or export it again)")
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

"""Finished segments on disk, so a crashed or interrupted job continues where it stopped.

The folder is named by a key over the input files' contents and every setting that changes a segment's pixels,
so a re-run with the same command finds it and a changed command never reuses stale segments. Segments are
stored losslessly as ``.npy`` (uint8 frames) and written atomically: a file under its final name is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from posegen_cli.cache import cache_dir, cache_key
from posegen_cli.errors import ResourceError, option
from posegen_cli.fsutil import atomic_path

MANIFEST = "manifest.json"
WORK_KIND = "animate"


@contextlib.contextmanager
def disk_errors(what: Path) -> Iterator[None]:
    """A full disk becomes a ResourceError naming the file; partial files are already removed by ``atomic_path``."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(
                f"disk full while writing {what} (free some space, or pass {option('work_dir')} on a larger disk, and run again)"
            ) from None
        raise


class WorkDir:
    """One job's folder of finished segments and stage outputs, with a manifest of what is done."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.settings = settings

    @classmethod
    def for_job(cls, files: list[Path], settings: dict[str, Any], root: Path | None = None) -> WorkDir:
        """The folder for these inputs and settings, under ``root`` (default: the posegen cache), created if new."""
        key = cache_key(files, settings)
        path = root / key if root is not None else cache_dir(WORK_KIND, key)
        work = cls(path, settings)
        with disk_errors(path):
            path.mkdir(parents=True, exist_ok=True)
            if not (path / MANIFEST).exists():
                work._write_manifest({})
        return work

    def stage_dir(self, name: str) -> Path:
        """A sub-folder for an earlier stage's outputs (pose videos, caption) kept with the segments."""
        return self.path / name

    def segment_path(self, index: int) -> Path:
        return self.path / f"segment-{index:04d}.npy"

    def _read_manifest(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return {"segments": {}}

    def _write_manifest(self, segments: dict[str, Any]) -> None:
        target = self.path / MANIFEST
        with disk_errors(target), atomic_path(target) as tmp:
            tmp.write_text(json.dumps({"settings": self.settings, "segments": segments}, indent=1, sort_keys=True, default=str))

    def finished(self) -> dict[int, tuple[int, ...]]:
        """Segments whose file is complete: timeline index to frame-array shape."""
        done = {}
        for key, entry in self._read_manifest().get("segments", {}).items():
            index = int(key)
            if self.segment_path(index).exists():
                done[index] = tuple(entry["shape"])
        return done

    def save_segment(self, index: int, frames: np.ndarray, seconds: float) -> None:
        """Store a finished segment, then record it; a crash between the two only costs recomputing it."""
        target = self.segment_path(index)
        with disk_errors(target), atomic_path(target) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(frames, dtype=np.uint8))
        segments = self._read_manifest().get("segments", {})
        segments[str(index)] = {"shape": list(frames.shape), "seconds": round(seconds, 3)}
        self._write_manifest(segments)

    def load_segment(self, index: int) -> np.ndarray:
        """The segment's frames, memory-mapped: merging a long video never holds all of it in memory."""
        return np.load(self.segment_path(index), mmap_mode="r")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

"""Finished segments on disk, so a crashed or interrupted job continues where it stopped.

The folder is named by a key over the input files' contents and every setting that changes a segment's pixels,
so a re-run with the same command finds it and a changed command never reuses stale segments. Segments are
stored losslessly as ``.npy`` (uint8 frames) and written atomically: a file under its final name is complete.
The folder's record (``cache.Record``, the same one the pose and caption caches keep) holds each segment's
digest, so a segment changed or damaged since it was stored is generated again rather than merged.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from posegen_cli.cache import RECORD, Record, cache_dir, cache_key
from posegen_cli.errors import ResourceError, option
from posegen_cli.fsutil import atomic_path

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
    """One job's folder of finished segments and stage outputs, with a record of what is done."""

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
            if Record.read(path) is None:
                work._write_record(Record({"settings": settings, "segments": {}}))
        return work

    def stage_dir(self, name: str) -> Path:
        """A sub-folder for an earlier stage's outputs (pose videos, caption) kept with the segments."""
        return self.path / name

    def segment_path(self, index: int) -> Path:
        return self.path / f"segment-{index:04d}.npy"

    def _read_record(self) -> Record:
        return Record.read(self.path) or Record({"settings": self.settings, "segments": {}})

    def _write_record(self, record: Record) -> None:
        with disk_errors(self.path / RECORD):
            record.write(self.path)

    def finished(self) -> dict[int, tuple[int, ...]]:
        """Segments stored complete and unchanged since (their digest matches): timeline index to frame-array shape."""
        record = self._read_record()
        done = {}
        for key, entry in record.data.get("segments", {}).items():
            index = int(key)
            if not record.changed(self.path, [self.segment_path(index).name]):
                done[index] = tuple(entry["shape"])
        return done

    @property
    def embeddings_path(self) -> Path:
        """The job's prompt and reference embeddings (safetensors), written by a Ray driver for its workers."""
        return self.path / "embeddings.safetensors"

    @property
    def anchor_inputs_path(self) -> Path:
        """The anchor's latents at its shared K/V steps (safetensors), from which any worker rebuilds the anchor's K/V."""
        return self.path / "anchor-inputs.safetensors"

    def save_segment(self, index: int, frames: np.ndarray, seconds: float) -> None:
        """Store a finished segment, then record it with its digest; a crash between the two only costs recomputing it."""
        self.write_segment(index, frames)
        self.record_segment(index, frames.shape, seconds)

    def write_segment(self, index: int, frames: np.ndarray) -> None:
        """Write a segment's file atomically, without recording it (a Ray worker's half of :meth:`save_segment`)."""
        target = self.segment_path(index)
        with disk_errors(target), atomic_path(target) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(frames, dtype=np.uint8))

    def record_segment(self, index: int, shape: tuple[int, ...], seconds: float) -> None:
        """Mark a written segment finished in the record, with its digest; only one process (the driver) may call this."""
        record = self._read_record()
        record.data.setdefault("segments", {})[str(index)] = {"shape": list(shape), "seconds": round(seconds, 3)}
        record.add(self.path, self.segment_path(index).name)
        self._write_record(record)

    def segment_seconds(self) -> dict[int, float]:
        """Measured generation time of every stored segment (for ETAs), by timeline index."""
        return {int(key): float(entry["seconds"]) for key, entry in self._read_record().data.get("segments", {}).items()}

    def load_segment(self, index: int) -> np.ndarray:
        """The segment's frames, memory-mapped: merging a long video never holds all of it in memory."""
        return np.load(self.segment_path(index), mmap_mode="r")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

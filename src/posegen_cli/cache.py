"""Content-keyed folders of a stage's results, so a stage never recomputes what it already produced for the same inputs.

One mechanism serves every cache-and-publish place (the pose cache, the caption cache, the work folder of finished
segments): a folder named by a key over its inputs' contents and settings, holding the files and a record
(``manifest.json``) with the SHA-256 of every file it vouches for. An entry is reused only while each of those files
still has the digest it was stored with; anything else (a file edited in place, truncated, removed) makes it a
damaged entry that is built again. The cache belongs to posegen: users get copies (``fsutil.copy_tree``), never links.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posegen_cli.fsutil import atomic_dir, atomic_path

_CHUNK = 1 << 20
RECORD = "manifest.json"


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the content, not the name or the time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_key(files: list[str | Path], settings: dict[str, Any]) -> str:
    """A short key for the contents of ``files`` together with the settings that shape the result."""
    h = hashlib.sha256()
    for f in files:
        h.update(file_digest(f).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def cache_root() -> Path:
    """``$POSEGEN_CACHE_DIR``, else ``~/.cache/posegen``."""
    env = os.environ.get("POSEGEN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "posegen"


def cache_dir(kind: str, key: str) -> Path:
    """The folder for one cached result of a stage (not created)."""
    return cache_root() / kind / key


def folder_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative POSIX paths, sorted), the record itself excepted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != RECORD)


@dataclass
class Record:
    """What a cache folder vouches for: ``data`` (the stage's own facts) and the digest of each file by relative path."""

    data: dict[str, Any] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> Record | None:
        """The folder's record, or None when it has none (or an unreadable one)."""
        try:
            raw = json.loads((folder / RECORD).read_text())
            return cls(dict(raw["data"]), dict(raw["files"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, folder: Path) -> None:
        """Store the record atomically (a crash leaves the previous one)."""
        with atomic_path(folder / RECORD) as tmp:
            tmp.write_text(json.dumps({"data": self.data, "files": self.digests}, indent=1, sort_keys=True, default=str))

    def add(self, folder: Path, name: str) -> None:
        """Vouch for ``folder / name`` as it is now."""
        self.digests[name] = file_digest(folder / name)

    def changed(self, folder: Path, names: list[str] | None = None) -> list[str]:
        """Files (all vouched-for ones, or ``names``) that are missing or no longer have their stored digest."""
        wanted = self.digests if names is None else {name: self.digests.get(name, "") for name in names}
        return [name for name, digest in wanted.items() if not (folder / name).is_file() or file_digest(folder / name) != digest]


@dataclass(frozen=True)
class Lookup:
    """The outcome of :meth:`CacheEntry.get_or_make`: the stage's data, and whether it came from the cache."""

    data: dict[str, Any]
    cached: bool
    damaged: list[str]
    """Files of an earlier entry that had changed, so the entry was built again (empty when none)."""


@dataclass(frozen=True)
class CacheEntry:
    """One content-keyed folder, written whole and atomically by ``make`` and reused only while intact."""

    path: Path

    @classmethod
    def of(cls, kind: str, files: list[str | Path], settings: dict[str, Any]) -> CacheEntry:
        return cls(cache_dir(kind, cache_key(files, settings)))

    def get_or_make(self, make: Callable[[Path], dict[str, Any]], use_cache: bool = True) -> Lookup:
        """The stored data when the entry exists and every file matches its digest, else ``make(tmp)`` stored anew.

        ``make`` writes its files into the temporary folder it is given and returns the facts to keep.
        """
        damaged: list[str] = []
        if use_cache:
            record = Record.read(self.path)
            if record is not None:
                damaged = record.changed(self.path)
                if not damaged:
                    return Lookup(record.data, True, [])
        with atomic_dir(self.path) as tmp:
            data = make(tmp)
            record = Record(data)
            for name in folder_files(tmp):
                record.add(tmp, name)
            record.write(tmp)
        return Lookup(data, False, damaged)

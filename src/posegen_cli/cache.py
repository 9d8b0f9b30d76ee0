"""Content-keyed work folders, so a stage never recomputes what it already produced for the same inputs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


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

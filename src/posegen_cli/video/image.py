"""Reference images: decoded once to RGB uint8, with a clear error for anything else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from posegen_cli.cache import file_digest
from posegen_cli.errors import InputError, require_file


def load_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); alpha is dropped and grey is expanded, as the release's ``cv2.imread`` does."""
    path = require_file(path, "image")
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InputError(f"cannot read image {path}: not a PNG/JPEG/WebP/BMP/TIFF image (convert it to PNG)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class ReferenceImage:
    """A reference photo decoded and hashed once per job: its path, RGB uint8 (H, W, 3) pixels and SHA-256 digest."""

    path: Path
    pixels: np.ndarray
    digest: str

    @classmethod
    def load(cls, source: str | Path | ReferenceImage, what: str = "reference image") -> ReferenceImage:
        """Decode and hash ``source`` (kept as it is when already loaded); InputError names ``what`` when it is missing."""
        if isinstance(source, ReferenceImage):
            return source
        path = require_file(source, what)
        return cls(path=path, pixels=load_image(path), digest=file_digest(path))

"""Reference images: decoded once to RGB uint8, with a clear error for anything else."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from posegen_cli.errors import InputError, require_file


def load_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); alpha is dropped and grey is expanded, as the release's ``cv2.imread`` does."""
    path = require_file(path, "image")
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InputError(f"cannot read image {path}: not a PNG/JPEG/WebP/BMP/TIFF image (convert it to PNG)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

"""Reference images: decoded once to RGB uint8, with a clear error for anything else.

A transparent image (a cut-out) is composited onto a stated background colour, white by default, rather
than having its alpha dropped: dropped alpha leaves whatever colour the editor stored under the
transparent pixels, usually black, and dark clothing then merges into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from posegen_cli.cache import file_digest
from posegen_cli.errors import InputError, OptionError, require_file

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
COLOR_NAMES: dict[str, Color] = {
    "white": WHITE,
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "gray": (128, 128, 128),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
}


def parse_color(text: str) -> Color:
    """An RGB colour from a name (white, black, grey, red, green, blue), ``#RRGGBB``/``RRGGBB`` or ``R,G,B`` (0-255).

    Raises OptionError (setting ``background``) for anything else.
    """
    value = text.strip().lower()
    if value in COLOR_NAMES:
        return COLOR_NAMES[value]
    if match := re.fullmatch(r"#?([0-9a-f]{6})", value):
        digits = match.group(1)
        return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)
    if match := re.fullmatch(r"(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})", value):
        rgb = tuple(int(v) for v in match.groups())
        if all(v <= 255 for v in rgb):
            return rgb  # type: ignore[return-value]
    raise OptionError(
        "background", text, problem=f"{text!r} is not a colour (use a name such as white or black, #RRGGBB, or R,G,B with 0-255)"
    )


@dataclass(frozen=True)
class LoadedImage:
    """RGB uint8 (H, W, 3) pixels and whether any were transparent (and so composited onto ``background``)."""

    pixels: np.ndarray
    transparent: bool
    background: Color


def read_image(path: str | Path, background: Color = WHITE) -> LoadedImage:
    """Decode ``path``; alpha is composited onto ``background`` (straight alpha, rounded), grey is expanded.

    Opaque images come out exactly as the release's ``cv2.imread`` gives them.
    """
    path = require_file(path, "image")
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise InputError(f"cannot read image {path}: not a PNG/JPEG/WebP/BMP/TIFF image (convert it to PNG)")
    if image.ndim != 3 or image.shape[2] != 4:
        # Opaque: decoded again the release's way, so 16-bit and grey images convert exactly as it does.
        return LoadedImage(cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), False, background)
    scale = 257.0 if image.dtype == np.uint16 else 1.0
    colour = image[..., :3].astype(np.float32) / scale
    alpha = image[..., 3:].astype(np.float32) / (255 * scale)
    under = np.array(background[::-1], np.float32)
    composite = np.round(colour * alpha + under * (1 - alpha)).astype(np.uint8)
    transparent = bool((alpha < 1).any())
    return LoadedImage(cv2.cvtColor(composite, cv2.COLOR_BGR2RGB), transparent, background)


def load_image(path: str | Path, background: Color = WHITE) -> np.ndarray:
    """RGB uint8 (H, W, 3) of :func:`read_image`."""
    return read_image(path, background).pixels


@dataclass(frozen=True)
class ReferenceImage:
    """A reference photo decoded and hashed once per job: its path, RGB uint8 (H, W, 3) pixels (a transparent one
    composited onto ``background``), its SHA-256 digest and whether it was transparent."""

    path: Path
    pixels: np.ndarray
    digest: str
    transparent: bool = False
    background: Color = WHITE

    @classmethod
    def load(cls, source: str | Path | ReferenceImage, what: str = "reference image", background: Color = WHITE) -> ReferenceImage:
        """Decode and hash ``source``, compositing a transparent one onto ``background`` (kept as it is when already
        loaded); InputError names ``what`` when it is missing."""
        if isinstance(source, ReferenceImage):
            return source
        path = require_file(source, what)
        image = read_image(path, background)
        return cls(path=path, pixels=image.pixels, digest=file_digest(path), transparent=image.transparent, background=image.background)

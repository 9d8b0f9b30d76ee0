"""Camera-motion patterns for the negative guidance branch (experimental; PoseAnything, CVPR 2026, arXiv 2512.13465).

PoseAnything steers the camera of a pose-conditioned Wan DiT through classifier-free guidance alone: the positive
branch gets the subject's pose and no camera signal, the negative branch a camera-motion pattern and no subject
pose, ε = ε(∅s, zc) + s·(ε(zs, ∅c) − ε(∅s, zc)). Because guidance pushes *away* from the negative branch, the pattern
moves the way the picture of the unwanted camera would: for a camera panning left (the background flowing right)
the pattern slides left; for a zoom-in (the background growing) it shrinks.

The pattern is a lattice of rectangles drawn in strokes as wide as the release's body links (9 px), coloured from
the skeleton palette so the pose condition looks like the skeleton strokes the model knows, each cell a different colour so a
shift by one lattice pitch is not the same picture. It is a pure function of the *global* frame index: frames that
two segments share (a base and a transition) get the same pattern. Everything is defined on the model's 720x1280
canvas; another canvas is scaled uniformly to the same area (a 288x512 preview sees the same picture at 0.4x,
a landscape canvas a wider window onto the same lattice), so strokes and speeds scale with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from posegen_cli.choices import CAMERA_MOTIONS
from posegen_cli.pose.render import BODY_LINK_COLORS, BODY_LINK_HALF_WIDTH
from posegen_cli.video.framing import MODEL_SIZE

PANS = {"pan-left": (1.0, 0.0), "pan-right": (-1.0, 0.0), "pan-up": (0.0, 1.0), "pan-down": (0.0, -1.0)}
"""Camera pan → (du, dv): the pattern coordinate seen at a screen point moves by ``speed`` px per frame this way,
so the pattern itself slides toward the pan's direction (pan-left: the pattern slides left)."""
ZOOMS = {"zoom-in": -1.0, "zoom-out": 1.0}
"""Camera zoom → the sign of the pattern's growth: a zoom-in shrinks the pattern, a zoom-out grows it."""

PITCH = 160.0
"""Lattice pitch on the 720x1280 canvas, in pixels: 4.5 cells across, 8 down."""
INSET = 30.0
"""Each rectangle's edges run along the centres of the pixels ``INSET`` and ``PITCH - INSET`` of its cell (a 100 px
square, 60 px from the next one)."""
HALF_STROKE = float(BODY_LINK_HALF_WIDTH)
"""Strokes cover the centre line ± 4 px, 9 px wide like the release's body links (``render.BODY_LINK_HALF_WIDTH``)."""


@dataclass(frozen=True)
class CameraMotion:
    """A camera move: ``kind`` from :data:`CAMERA_MOTIONS` and its ``speed``.

    ``speed`` is pixels per frame on the 720x1280 canvas for pans, percent per second for zooms: each second a
    zoom-out pattern grows by the factor 1 + speed/100 and a zoom-in pattern shrinks by it, compounding, with
    ``fps`` (frames per second) turning frames into seconds.
    """

    kind: str
    speed: float
    fps: Fraction | float

    def __post_init__(self) -> None:
        if self.kind not in CAMERA_MOTIONS:
            raise ValueError(f"camera motion {self.kind!r} is not one of {', '.join(CAMERA_MOTIONS)}")
        if not self.speed > 0:
            raise ValueError(f"camera speed must be positive, got {self.speed}")
        if not float(self.fps) > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")


def zoom_factor(motion: CameraMotion, frames: int) -> float:
    """How much a zoom pattern has grown (> 1) or shrunk (< 1) after ``frames`` frames; 1.0 for pans."""
    if motion.kind not in ZOOMS:
        return 1.0
    return (1.0 + motion.speed / 100.0) ** (ZOOMS[motion.kind] * frames / float(motion.fps))


def pattern_coordinates(index: int, motion: CameraMotion, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel centre of frame ``index`` lies in the pattern, in 720x1280-canvas pixels: ``(u [W], v [H])``.

    Float64 columns/rows (pans and zooms are separable). A ``size`` (height, width) canvas is scaled by
    ``sqrt(720·1280 / (width·height))`` to the model canvas's area. Frame 0 is the lattice at rest; pans shift it
    by ``speed·index`` px; zooms scale it about the canvas centre by ``(1 ± speed/100) ** (index / fps)``.
    """
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"camera_pattern needs a positive canvas size, got {width}x{height}")
    scale = math.sqrt(MODEL_SIZE[0] * MODEL_SIZE[1] / (width * height))
    u = (np.arange(width, dtype=np.float64) + 0.5) * scale
    v = (np.arange(height, dtype=np.float64) + 0.5) * scale
    if motion.kind in PANS:
        du, dv = PANS[motion.kind]
        return u + du * motion.speed * index, v + dv * motion.speed * index
    growth = zoom_factor(motion, index)
    cu, cv = width * scale / 2, height * scale / 2
    return cu + (u - cu) / growth, cv + (v - cv) / growth


def _on_edge(local: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Which positions (within a cell) fall on the stroke of the edge at ``lo`` or at ``hi``."""
    return (np.abs(local - lo) <= HALF_STROKE) | (np.abs(local - hi) <= HALF_STROKE)


def _within(local: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Positions along an edge, its stroke's square caps included."""
    return (local >= lo - HALF_STROKE) & (local <= hi + HALF_STROKE)


def camera_pattern(index: int, motion: CameraMotion, size: tuple[int, int] = MODEL_SIZE) -> np.ndarray:
    """The camera pattern of global frame ``index``: uint8 RGB [height, width, 3], black where there is no stroke.

    The lattice cell of a point is ``(floor(u / PITCH), floor(v / PITCH))``; its left/right edges (``u`` within
    ``HALF_STROKE`` of ``INSET + 0.5`` or ``PITCH - INSET + 0.5`` in the cell) take palette colour ``(3·i + 5·j) mod 23``, its top/bottom
    edges the next one, from ``render.BODY_LINK_COLORS``; vertical edges are drawn over horizontal ones. Pure: the
    same arguments always give the same pixels.
    """
    u, v = pattern_coordinates(index, motion, size)
    cell_u, cell_v = np.floor(u / PITCH).astype(np.int64), np.floor(v / PITCH).astype(np.int64)
    local_u, local_v = u - cell_u * PITCH, v - cell_v * PITCH
    lo, hi = INSET + 0.5, PITCH - INSET + 0.5
    palette = np.asarray(BODY_LINK_COLORS, dtype=np.uint8)
    colour = (3 * cell_u[None, :] + 5 * cell_v[:, None]) % len(palette)
    vertical = _on_edge(local_u, lo, hi)[None, :] & _within(local_v, lo, hi)[:, None]
    horizontal = _on_edge(local_v, lo, hi)[:, None] & _within(local_u, lo, hi)[None, :]
    frame = np.zeros((*size, 3), np.uint8)
    frame[horizontal] = palette[(colour[horizontal] + 1) % len(palette)]
    frame[vertical] = palette[colour[vertical]]
    return frame

"""The contract between pose backends and everything downstream (rendering, alignment, keypoint files)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

NUM_KEYPOINTS = 133
"""COCO-WholeBody: 17 body, 6 feet, 68 face, 21 left hand, 21 right hand."""
FACE_START, FACE_SIZE = 23, 68
LEFT_HAND_START, RIGHT_HAND_START, HAND_SIZE = 91, 112, 21
LEFT_WRIST, RIGHT_WRIST = 9, 10


@dataclass
class PersonPose:
    """One detected person in one frame, in source-frame pixels."""

    keypoints: np.ndarray  # (133, 2) float, x then y (Sapiens: float64, as the release keeps them)
    scores: np.ndarray  # (133,) float
    box: np.ndarray  # (4,) float32: x1, y1, x2, y2
    box_score: float


class PoseBackend(Protocol):
    """Finds people in RGB frames; people come back sorted by ``box_score``, highest first."""

    name: str

    def detect(self, frames: Sequence[np.ndarray]) -> list[list[PersonPose]]: ...


class NormalBackend(Protocol):
    """Per-pixel surface normals and body-part segmentation, the inputs of the hand-normal video."""

    name: str

    def normals_and_segmentation(self, frames: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per frame, at the frame's size: normals (H, W, 3) and Goliath class ids (H, W) int.

        Normals are either the release's uint8 codes (``normal.npy``) or float vectors, raw or unit;
        ``render.render_hand_normals`` accepts both.
        """
        ...

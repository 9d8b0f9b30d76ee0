"""The conditioning frames exactly as the PoseGen LoRA was trained on them (spec pose.md §1 and §2).

Every colour below is the one the model *decodes*: the release drew its palette into an array that
``cv2.VideoWriter`` took for BGR, so the skeleton reaches the model with red and blue swapped. We draw
those decoded RGB values straight into an RGB frame, which any RGB writer then stores faithfully.
Pixel sizes never scale with resolution, and OpenCV rasterises every primitive (LINE_8, no
anti-aliasing) so the footprints match the release pixel for pixel.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from posegen_cli.pose.types import HAND_SIZE, LEFT_HAND_START, NUM_KEYPOINTS, RIGHT_HAND_START

BODY_THRESHOLD = 0.3
"""prepare_input_pose.py's ``body_kpt_thr``. A point counts when its score is >= this in float64, as the
release compares them: float32(0.3) is just above 0.3 and drawn, float32(0.7) just below 0.7 and not."""
HAND_THRESHOLD = 0.7
"""prepare_input_pose.py's ``hand_kpt_thr`` (Sapiens heatmap-maximum scale)."""

BODY_LINK_HALF_WIDTH = 4
"""The minor semi-axis of each body-link ellipse, so strokes are about 9 px wide."""
HAND_LINK_THICKNESS = 2
POINT_RADIUS = 4

# COCO-WholeBody index of each of the first 24 OpenPose-134 points; -1 is the neck (mean of 5 and 6).
_OPENPOSE_BODY_FROM_COCO = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 17, 18, 19, 20, 21, 22)

# Body links as OpenPose-134 index pairs with their decoded RGB colour, in draw order (§1.5).
BODY_LINKS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (13, 18), (13, 19), (13, 20), (10, 21), (10, 22), (10, 23),
)  # fmt: skip
BODY_LINK_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 255), (0, 85, 255), (0, 170, 255), (0, 255, 255), (0, 255, 170), (0, 255, 85), (0, 255, 0),
    (85, 255, 0), (170, 255, 0), (225, 255, 0), (255, 170, 0), (255, 85, 0), (255, 0, 0), (170, 0, 255),
    (255, 0, 170), (255, 0, 255), (170, 0, 255), (0, 255, 0), (0, 255, 0), (0, 255, 0), (0, 128, 255),
    (0, 128, 255), (0, 128, 255),
)  # fmt: skip
BODY_POINT_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 255), (0, 85, 255), (0, 170, 255), (0, 255, 255), (0, 255, 170), (0, 255, 85), (0, 255, 0),
    (85, 255, 0), (170, 255, 0), (255, 255, 0), (255, 170, 0), (255, 85, 0), (255, 0, 0), (255, 0, 85),
    (255, 0, 170), (255, 0, 255), (170, 0, 255), (85, 0, 255),
) + ((0, 128, 255),) * 6  # fmt: skip

# Hand links as local 0..20 index pairs (same for both hands) and their decoded rainbow colours (§1.7).
HAND_LINKS: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
    (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)  # fmt: skip
HAND_LINK_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 255), (0, 77, 255), (0, 153, 255), (0, 229, 255), (0, 255, 204), (0, 255, 128), (0, 255, 51),
    (25, 255, 0), (102, 255, 0), (179, 255, 0), (255, 255, 0), (255, 178, 0), (255, 102, 0), (255, 25, 0),
    (255, 0, 51), (255, 0, 128), (255, 0, 204), (230, 0, 255), (153, 0, 255), (77, 0, 255),
)  # fmt: skip
HAND_POINT_COLOR = (255, 255, 255)

HAND_CLASSES = (5, 14)
"""Goliath segmentation ids of Left_Hand and Right_Hand: the pixels the hand-normal video keeps."""

_COORD_LIMIT = 2**30  # OpenCV takes int32 coordinates; anything beyond cannot be drawn at all.


def _usable_scores(keypoints: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Scores with points OpenCV cannot place (NaN, inf, beyond int32) forced to 0, i.e. not detected."""
    ok = np.isfinite(keypoints).all(axis=1) & (np.abs(np.nan_to_num(keypoints)) < _COORD_LIMIT).all(axis=1)
    return np.where(ok & np.isfinite(scores), scores, 0.0)


def _openpose_body(keypoints: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 24 body points in OpenPose order; the neck takes the mean of the shoulders' xy *and* score.

    Float64, as in the release: a float32 mean can round across a pixel edge or the 0.3 threshold.
    """
    pts = np.zeros((24, 2), np.float64)
    sc = np.zeros(24, np.float64)
    for op, coco in enumerate(_OPENPOSE_BODY_FROM_COCO):
        if coco < 0:
            pts[op] = (keypoints[5] + keypoints[6]) / 2
            sc[op] = (scores[5] + scores[6]) / 2
        else:
            pts[op] = keypoints[coco]
            sc[op] = scores[coco]
    return pts, sc


def _ipoint(p: np.ndarray) -> tuple[int, int]:
    """Python ``int()`` truncation toward zero, as the release casts coordinates."""
    return int(p[0]), int(p[1])


def _draw_body_link(canvas: np.ndarray, p1: tuple[int, int], p2: tuple[int, int], color: tuple[int, int, int]) -> None:
    """A filled ellipse between the two points, with the release's integer truncations.

    The length is numpy's int64 power as in the release, not a correctly rounded square root: for
    a squared length of 10404 it gives 101.99999999999999, so the semi-axis is 50, not 51.
    """
    length = (np.int64(p1[1] - p2[1]) ** 2 + np.int64(p1[0] - p2[0]) ** 2) ** 0.5
    angle = math.degrees(math.atan2(p1[1] - p2[1], p1[0] - p2[0]))
    centre = (int((p1[0] + p2[0]) / 2), int((p1[1] + p2[1]) / 2))
    poly = cv2.ellipse2Poly(centre, (int(length / 2), BODY_LINK_HALF_WIDTH), int(angle), 0, 360, 1)
    cv2.fillConvexPoly(canvas, poly, color)


def _draw_hand(canvas: np.ndarray, pts: np.ndarray, sc: np.ndarray, threshold: float) -> None:
    """White dots on every endpoint of a valid link first, then the rainbow links over them."""
    ok = sc >= threshold
    valid = [k for k, (a, b) in enumerate(HAND_LINKS) if ok[a] and ok[b]]
    endpoints = sorted({i for k in valid for i in HAND_LINKS[k]})
    for i in endpoints:
        cv2.circle(canvas, _ipoint(pts[i]), POINT_RADIUS, HAND_POINT_COLOR, thickness=-1)
    for k in valid:
        a, b = HAND_LINKS[k]
        cv2.line(canvas, _ipoint(pts[a]), _ipoint(pts[b]), HAND_LINK_COLORS[k], thickness=HAND_LINK_THICKNESS)


def render_pose(
    keypoints: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
    *,
    body_threshold: float = BODY_THRESHOLD,
    hand_threshold: float = HAND_THRESHOLD,
) -> np.ndarray:
    """The pose-conditioning frame (height, width, 3) uint8 RGB for one person's 133 COCO-WholeBody points.

    Draw order is the release's: body links, body points, left hand, right hand; the face is never
    drawn. Points without a usable position (NaN, inf) count as not detected. Everything is computed in
    float64 like the release's pickle-fed visualizer, so float32 inputs are taken exactly.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if keypoints.shape != (NUM_KEYPOINTS, 2) or scores.shape != (NUM_KEYPOINTS,):
        raise ValueError(f"render_pose needs keypoints (133, 2) and scores (133,), got {keypoints.shape} and {scores.shape}")
    if width <= 0 or height <= 0:
        raise ValueError(f"render_pose needs a positive canvas size, got {width}x{height}")
    scores = _usable_scores(keypoints, scores)
    keypoints = np.nan_to_num(keypoints)
    canvas = np.zeros((height, width, 3), np.uint8)

    body_pts, body_sc = _openpose_body(keypoints, scores)
    drawn = body_sc >= body_threshold
    for (a, b), color in zip(BODY_LINKS, BODY_LINK_COLORS):
        if drawn[a] and drawn[b]:
            _draw_body_link(canvas, _ipoint(body_pts[a]), _ipoint(body_pts[b]), color)
    for i, color in enumerate(BODY_POINT_COLORS):
        if drawn[i]:
            cv2.circle(canvas, _ipoint(body_pts[i]), POINT_RADIUS, color, thickness=-1)

    for start in (LEFT_HAND_START, RIGHT_HAND_START):
        hand = slice(start, start + HAND_SIZE)
        _draw_hand(canvas, keypoints[hand], scores[hand], hand_threshold)
    return canvas


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """Normal vectors (H, W, 3) float to the release's uint8 codes: unit length (+1e-5), then truncation.

    Re-normalising vectors that are already unit length changes them by about 1e-5 relative, far below
    one code step, so backends may hand over raw or normalised vectors.
    """
    n = np.asarray(normals, dtype=np.float32)
    n = n / (np.linalg.norm(n, axis=-1, keepdims=True) + np.float32(1e-5))
    return ((n + 1) / 2 * 255).astype(np.uint8)


def render_hand_normals(normals: np.ndarray, segmentation: np.ndarray) -> np.ndarray:
    """The hand-conditioning frame (H, W, 3) uint8 RGB: normal codes on hand pixels, black elsewhere.

    ``normals`` is either float vectors (H, W, 3) or already-encoded uint8 codes; ``segmentation`` is
    the Goliath class id per pixel (H, W). Both hands are kept (classes 5 and 14), without telling them
    apart, and R, G, B carry nx, ny, nz (the release converts this video correctly, unlike the skeleton).
    """
    normals = np.asarray(normals)
    segmentation = np.asarray(segmentation)
    if normals.ndim != 3 or normals.shape[2] != 3 or segmentation.shape != normals.shape[:2]:
        raise ValueError(
            f"render_hand_normals needs normals (H, W, 3) and segmentation (H, W), got {normals.shape} and {segmentation.shape}"
        )
    codes = normals if normals.dtype == np.uint8 else encode_normals(normals)
    mask = np.isin(segmentation, HAND_CLASSES)
    out = np.zeros(codes.shape, np.uint8)
    out[mask] = codes[mask]
    return out


def overlay_pose(frame: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """The skeleton pasted over the source frame, for people to check the extraction by eye."""
    out = np.array(pose, dtype=np.uint8)
    cv2.copyTo(frame, cv2.inRange(pose, (0, 0, 0), (0, 0, 0)), out)
    return out

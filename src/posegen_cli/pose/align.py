"""Retargeting the driving skeleton onto the reference person (issue 4).

The release leaves it to the user to make the reference person and the driving person match in scale
and position; when they do not, identity and background fall apart over long videos. We measure both
bodies with robust statistics (one frame for the reference, medians over the driving frames) using
only the parts both show, then move the driving skeleton with one similarity transform (``auto``),
optionally followed by a per-limb rescale that keeps every joint angle (``limbs``).

Everything here works in one coordinate frame, the model canvas (720x1280): the reference pose is
detected on the framed reference image and the driving keypoints are first moved through the same
9:16 crop rule (``framing.map_points_to_model``), so ``none`` is the identity and the aligned skeleton
can be rendered directly at the model's resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from posegen_cli.choices import ALIGN_MODES
from posegen_cli.errors import option
from posegen_cli.pose.render import BODY_THRESHOLD, render_pose
from posegen_cli.pose.types import NUM_KEYPOINTS, PersonPose
from posegen_cli.report import Reporter
from posegen_cli.video.framing import map_points_to_model

NOSE, L_EAR, R_EAR = 0, 3, 4
L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW, L_WRIST, R_WRIST = 5, 6, 7, 8, 9, 10
L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANKLE, R_ANKLE = 11, 12, 13, 14, 15, 16
NECK, HIP_CENTRE = NUM_KEYPOINTS, NUM_KEYPOINTS + 1
"""Virtual joints appended after the 133 COCO-WholeBody points: shoulder and hip midpoints."""

SCALE_PARTS = ("shoulders", "torso", "legs", "head")
"""Measurements that set the global scale: the ones least changed by arm motion."""
LIMB_PARTS = ("shoulders", "torso", "hips", "upper_arm", "forearm", "thigh", "shin", "neck", "head")
"""Measurements the ``limbs`` mode matches one by one."""
X_ANCHORS = ("hip_centre", "neck", "nose")
Y_ANCHORS = ("feet_line", "hip_centre", "neck", "nose")
"""Anchors in order of preference: the first one both bodies show decides the offset on that axis."""
MIN_VISIBLE_FRACTION = 0.25
"""A driving measurement counts only if it is visible in at least this share of the frames."""
LIMB_FACTOR_RANGE = (0.5, 2.0)
"""Per-limb factors are clamped here: a larger one means a foreshortened limb, not a different body."""

# Kinematic tree over the extended (135-point) skeleton, parents before children: (parent, child, part).
BONES: tuple[tuple[int, int, str], ...] = (
    (NECK, L_SHOULDER, "shoulders"), (NECK, R_SHOULDER, "shoulders"),
    (L_SHOULDER, L_ELBOW, "upper_arm"), (L_ELBOW, L_WRIST, "forearm"),
    (R_SHOULDER, R_ELBOW, "upper_arm"), (R_ELBOW, R_WRIST, "forearm"),
    (NECK, HIP_CENTRE, "torso"), (HIP_CENTRE, L_HIP, "hips"), (HIP_CENTRE, R_HIP, "hips"),
    (L_HIP, L_KNEE, "thigh"), (L_KNEE, L_ANKLE, "shin"), (R_HIP, R_KNEE, "thigh"), (R_KNEE, R_ANKLE, "shin"),
    (NECK, NOSE, "neck"),
)  # fmt: skip
# Points that ride on a joint: feet on the ankles, hands on the wrists, the head around the nose.
ATTACHED: tuple[tuple[int, tuple[int, ...], str | None], ...] = (
    (L_ANKLE, (17, 18, 19), None),
    (R_ANKLE, (20, 21, 22), None),
    (L_WRIST, tuple(range(91, 112)), None),
    (R_WRIST, tuple(range(112, 133)), None),
    (NOSE, (1, 2, 3, 4, *range(23, 91)), "head"),
)
# Pairs of one measurement on both body sides: per frame the longer one counts (the other is foreshortened).
_SIDED: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "upper_arm": ((L_SHOULDER, L_ELBOW), (R_SHOULDER, R_ELBOW)),
    "forearm": ((L_ELBOW, L_WRIST), (R_ELBOW, R_WRIST)),
    "thigh": ((L_HIP, L_KNEE), (R_HIP, R_KNEE)),
    "shin": ((L_KNEE, L_ANKLE), (R_KNEE, R_ANKLE)),
}
_PAIRS: dict[str, tuple[int, int]] = {
    "shoulders": (L_SHOULDER, R_SHOULDER),
    "torso": (NECK, HIP_CENTRE),
    "hips": (L_HIP, R_HIP),
    "neck": (NECK, NOSE),
    "head": (L_EAR, R_EAR),
}


def _extend(keypoints: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(F, 135, 2) float64 points with the neck and hip centre appended, and (F, 135) visibility.

    A virtual joint is visible only when both of its points are, so a half-seen torso never sets a length.
    """
    pts = np.asarray(keypoints, dtype=np.float64)
    sc = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0)
    vis = (sc >= threshold) & np.isfinite(pts).all(axis=-1)
    neck = (pts[:, L_SHOULDER] + pts[:, R_SHOULDER]) / 2
    hips = (pts[:, L_HIP] + pts[:, R_HIP]) / 2
    ext = np.concatenate([pts, neck[:, None], hips[:, None]], axis=1)
    ext_vis = np.concatenate([vis, (vis[:, L_SHOULDER] & vis[:, R_SHOULDER])[:, None], (vis[:, L_HIP] & vis[:, R_HIP])[:, None]], axis=1)
    return ext, ext_vis


def _segment(ext: np.ndarray, vis: np.ndarray, a: int, b: int) -> np.ndarray:
    """Per-frame length of a-b, NaN where either end is unseen."""
    length = np.linalg.norm(ext[:, a] - ext[:, b], axis=-1)
    return np.where(vis[:, a] & vis[:, b], length, np.nan)


def _longer(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Element-wise max that ignores a NaN side and stays NaN only where both are."""
    return np.where(np.isnan(left), right, np.where(np.isnan(right), left, np.maximum(left, right)))


def frame_measurements(keypoints: np.ndarray, scores: np.ndarray, threshold: float = BODY_THRESHOLD) -> dict[str, np.ndarray]:
    """Per-frame body measurements in pixels, (F,) each, NaN where the parts are not visible.

    Limbs come in pairs; per frame the longer side counts, since a limb only ever looks shorter (turned
    towards the camera) than it is. ``legs`` is thigh plus shin of one side.
    """
    ext, vis = _extend(keypoints, scores, threshold)
    out = {name: _segment(ext, vis, a, b) for name, (a, b) in _PAIRS.items()}
    for name, (left, right) in _SIDED.items():
        out[name] = _longer(_segment(ext, vis, *left), _segment(ext, vis, *right))
    (lt, rt), (ls, rs) = _SIDED["thigh"], _SIDED["shin"]
    out["legs"] = _longer(_segment(ext, vis, *lt) + _segment(ext, vis, *ls), _segment(ext, vis, *rt) + _segment(ext, vis, *rs))
    return out


def frame_anchors(keypoints: np.ndarray, scores: np.ndarray, threshold: float = BODY_THRESHOLD) -> dict[str, np.ndarray]:
    """Per-frame anchor positions (F, 2), NaN where unseen; ``feet_line`` has only a y (the lower ankle)."""
    ext, vis = _extend(keypoints, scores, threshold)
    out = {
        name: np.where(vis[:, idx, None], ext[:, idx], np.nan) for name, idx in (("hip_centre", HIP_CENTRE), ("neck", NECK), ("nose", NOSE))
    }
    ankles_y = np.where(vis[:, [L_ANKLE, R_ANKLE]], ext[:, [L_ANKLE, R_ANKLE], 1], -np.inf).max(axis=1)
    out["feet_line"] = np.stack([np.full(len(ext), np.nan), np.where(np.isfinite(ankles_y), ankles_y, np.nan)], axis=1)
    return out


@dataclass(frozen=True)
class BodyStatistics:
    """Robust summary of one body over a clip: median lengths and anchor positions of what is visible."""

    lengths: dict[str, float]
    anchors: dict[str, tuple[float, float]]
    frames: int


def body_statistics(
    keypoints: np.ndarray, scores: np.ndarray, threshold: float = BODY_THRESHOLD, min_fraction: float = MIN_VISIBLE_FRACTION
) -> BodyStatistics:
    """Medians over frames of :func:`frame_measurements` and :func:`frame_anchors` (one frame for a photo).

    Parts seen in fewer than ``min_fraction`` of the frames are left out rather than trusted.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if keypoints.ndim == 2:
        keypoints, scores = keypoints[None], scores[None]
    if keypoints.shape[1:] != (NUM_KEYPOINTS, 2) or scores.shape != keypoints.shape[:2]:
        raise ValueError(f"body_statistics needs keypoints (F, 133, 2) and scores (F, 133), got {keypoints.shape} and {scores.shape}")
    frames = len(keypoints)
    need = max(1, int(np.ceil(min_fraction * frames)))

    def robust(values: np.ndarray) -> float | None:
        seen = values[np.isfinite(values)]
        return float(np.median(seen)) if len(seen) >= need else None

    lengths = {}
    for name, per_frame in frame_measurements(keypoints, scores, threshold).items():
        value = robust(per_frame)
        if value is not None and value > 0:
            lengths[name] = value
    anchors = {}
    for name, per_frame in frame_anchors(keypoints, scores, threshold).items():
        x, y = robust(per_frame[:, 0]), robust(per_frame[:, 1])
        if y is not None:
            anchors[name] = (float("nan") if x is None else x, y)
    return BodyStatistics(lengths=lengths, anchors=anchors, frames=frames)


@dataclass(frozen=True)
class Alignment:
    """Driving (model-frame) points to reference points: ``p' = scale * p + translation``, then limbs.

    ``limb_factors`` (``limbs`` mode) rescale each bone after the similarity transform, and
    ``limb_offset`` re-centres the result on the reference's anchors; ``matched`` are the measurements
    that set the scale, ``driving_only`` / ``reference_only`` the ones one body lacks.
    """

    mode: str
    scale: float = 1.0
    translation: tuple[float, float] = (0.0, 0.0)
    matched: tuple[str, ...] = ()
    anchors: tuple[str | None, str | None] = (None, None)
    limb_factors: dict[str, float] = field(default_factory=dict)
    clamped: tuple[str, ...] = ()
    limb_offset: tuple[float, float] = (0.0, 0.0)
    driving_only: tuple[str, ...] = ()
    reference_only: tuple[str, ...] = ()

    @property
    def aligned(self) -> bool:
        """Whether anything was fitted (``none``, or no common body part, leaves poses as they are)."""
        return bool(self.matched)

    def summary(self) -> dict[str, Any]:
        """Plain values for ``Reporter.summary``: what was matched and the transform applied."""
        data: dict[str, Any] = {"align": self.mode, "align_scale": round(self.scale, 4)}
        data["align_offset_px"] = [round(self.translation[0], 1), round(self.translation[1], 1)]
        data["align_matched"] = list(self.matched)
        data["align_anchors"] = {"x": self.anchors[0], "y": self.anchors[1]}
        if self.limb_factors:
            data["align_limb_factors"] = {k: round(v, 3) for k, v in self.limb_factors.items()}
        if self.driving_only:
            data["align_driving_only"] = list(self.driving_only)
        if self.reference_only:
            data["align_reference_only"] = list(self.reference_only)
        return data

    def describe(self) -> str:
        """One line for people: what was matched, how much the skeleton was scaled and moved."""
        if self.mode == "none":
            return "alignment: none (driving skeleton used as extracted, only framed to 9:16)"
        if not self.aligned:
            return f"alignment ({self.mode}): skipped, nothing to match; driving skeleton used as extracted"
        tx, ty = self.translation
        text = (
            f"alignment ({self.mode}): scale x{self.scale:.3f} from {', '.join(self.matched)}; "
            f"moved {tx:+.0f},{ty:+.0f} px (x on the {self.anchors[0]}, y on the {self.anchors[1]})"
        )
        if self.limb_factors:
            text += "; limbs " + ", ".join(f"{k} x{v:.2f}" for k, v in self.limb_factors.items())
        if self.driving_only:
            text += f"; only in the driving video: {', '.join(self.driving_only)}"
        if self.reference_only:
            text += f"; only in the reference: {', '.join(self.reference_only)}"
        return text


def _first_common(
    order: tuple[str, ...], ref: dict[str, tuple[float, float]], drv: dict[str, tuple[float, float]], axis: int
) -> str | None:
    for name in order:
        if name in ref and name in drv and np.isfinite(ref[name][axis]) and np.isfinite(drv[name][axis]):
            return name
    return None


def fit_alignment(
    ref_pose: PersonPose | None,
    driving_keypoints: np.ndarray,
    driving_scores: np.ndarray,
    mode: str = "auto",
    *,
    threshold: float = BODY_THRESHOLD,
) -> Alignment:
    """The transform that puts the driving body where the reference body is (both in one pixel frame).

    Scale is the ratio of the summed lengths both bodies show among shoulders, torso, legs and head;
    the offset puts the driving anchors (hip centre for x; feet line, else hip centre, neck, nose for y)
    on the reference's. ``limbs`` also fits one factor per limb from the remaining ratios.
    """
    if mode not in ALIGN_MODES:
        raise ValueError(f"align mode {mode!r} is not one of {ALIGN_MODES}")
    if mode == "none":
        return Alignment(mode="none")
    if ref_pose is None:
        raise ValueError("fit_alignment needs the reference pose unless mode is 'none'")
    ref = body_statistics(ref_pose.keypoints, ref_pose.scores, threshold)
    drv = body_statistics(driving_keypoints, driving_scores, threshold)
    named = [*SCALE_PARTS, *(p for p in LIMB_PARTS if p not in SCALE_PARTS)]
    driving_only = tuple(p for p in named if p in drv.lengths and p not in ref.lengths)
    reference_only = tuple(p for p in named if p in ref.lengths and p not in drv.lengths)
    matched = tuple(p for p in SCALE_PARTS if p in ref.lengths and p in drv.lengths)
    x_anchor = _first_common(X_ANCHORS, ref.anchors, drv.anchors, 0)
    y_anchor = _first_common(Y_ANCHORS, ref.anchors, drv.anchors, 1)
    if not matched or x_anchor is None or y_anchor is None:
        return Alignment(mode=mode, driving_only=driving_only, reference_only=reference_only)
    scale = sum(ref.lengths[p] for p in matched) / sum(drv.lengths[p] for p in matched)
    tx = ref.anchors[x_anchor][0] - scale * drv.anchors[x_anchor][0]
    ty = ref.anchors[y_anchor][1] - scale * drv.anchors[y_anchor][1]
    alignment = Alignment(
        mode=mode,
        scale=float(scale),
        translation=(float(tx), float(ty)),
        matched=matched,
        anchors=(x_anchor, y_anchor),
        driving_only=driving_only,
        reference_only=reference_only,
    )
    if mode == "auto":
        return alignment
    factors: dict[str, float] = {}
    clamped = []
    for part in LIMB_PARTS:
        if part in ref.lengths and part in drv.lengths:
            raw = ref.lengths[part] / (scale * drv.lengths[part])
            factors[part] = float(np.clip(raw, *LIMB_FACTOR_RANGE))
            if factors[part] != raw:
                clamped.append(part)
    limbed = replace(alignment, limb_factors=factors, clamped=tuple(clamped))
    moved = body_statistics(apply_alignment(limbed, driving_keypoints, driving_scores, threshold=threshold), driving_scores, threshold)
    ox = ref.anchors[x_anchor][0] - moved.anchors[x_anchor][0] if x_anchor in moved.anchors else 0.0
    oy = ref.anchors[y_anchor][1] - moved.anchors[y_anchor][1] if y_anchor in moved.anchors else 0.0
    return replace(limbed, limb_offset=(float(np.nan_to_num(ox)), float(np.nan_to_num(oy))))


def _rescale_limbs(ext: np.ndarray, vis: np.ndarray, factors: dict[str, float]) -> np.ndarray:
    """Walk the tree from the neck, giving each bone its factor and keeping its direction.

    A bone with an unseen end keeps its length, so unseen (possibly garbage) positions never leak
    into their children: those just follow the nearest seen ancestor.
    """
    out = ext.copy()
    for parent, child, part in BONES:
        f = np.where(vis[:, parent] & vis[:, child], factors.get(part, 1.0), 1.0)[:, None]
        out[:, child] = out[:, parent] + (ext[:, child] - ext[:, parent]) * f
    for joint, points, part in ATTACHED:
        idx = list(points)
        f = np.where(vis[:, joint, None] & vis[:, idx], factors.get(part, 1.0) if part else 1.0, 1.0)[..., None]
        out[:, idx] = out[:, joint, None] + (ext[:, idx] - ext[:, joint, None]) * f
    return out


def apply_alignment(alignment: Alignment, keypoints: np.ndarray, scores: np.ndarray, *, threshold: float = BODY_THRESHOLD) -> np.ndarray:
    """The driving keypoints (F, 133, 2) moved by ``alignment``, float32; scores are unchanged."""
    pts = np.asarray(keypoints, dtype=np.float64)
    if pts.ndim != 3 or pts.shape[1:] != (NUM_KEYPOINTS, 2):
        raise ValueError(f"apply_alignment needs keypoints (F, 133, 2), got {pts.shape}")
    moved = pts * alignment.scale + np.asarray(alignment.translation)
    if alignment.limb_factors:
        ext, vis = _extend(moved, scores, threshold)
        moved = _rescale_limbs(ext, vis, alignment.limb_factors)[:, :NUM_KEYPOINTS] + np.asarray(alignment.limb_offset)
    return moved.astype(np.float32)


def align_hand_frame(hand_frame: np.ndarray, alignment: Alignment, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """One framed hand-normal frame (model canvas) moved with the skeleton, so normals stay on the hands.

    Each hand is warped by the similarity transform plus its own wrist's extra shift (``limbs`` moves the
    wrists by the arm factors; hands ride on them rigidly). The video does not tell the hands apart, so
    every hand pixel goes with the nearer wrist of ``before``. ``before``/``after`` are that frame's
    (133, 2) keypoints in the model frame, as given to and returned by :func:`apply_alignment`.
    """
    if not alignment.aligned:
        return hand_frame
    h, w = hand_frame.shape[:2]
    s, (tx, ty) = alignment.scale, alignment.translation
    before = np.nan_to_num(np.asarray(before, dtype=np.float64))
    after = np.nan_to_num(np.asarray(after, dtype=np.float64))
    # Nearer to the left wrist = on its side of the perpendicular bisector: one linear test per pixel.
    (lx, ly), (rx, ry) = before[L_WRIST], before[R_WRIST]
    xs, ys = np.arange(w) + 0.5, np.arange(h)[:, None] + 0.5
    nearer_left = (xs - (lx + rx) / 2) * (lx - rx) + (ys - (ly + ry) / 2) * (ly - ry) >= 0
    shift = (s - 1) * 0.5  # keypoints put pixel centres at i + 0.5, OpenCV at i
    out = np.zeros_like(hand_frame)
    for wrist, side in ((L_WRIST, nearer_left), (R_WRIST, ~nearer_left)):
        dx, dy = after[wrist] - (s * before[wrist] + (tx, ty))
        part = np.where(side[..., None], hand_frame, 0).astype(hand_frame.dtype)
        matrix = np.array([[s, 0, tx + dx + shift], [0, s, ty + dy + shift]], np.float64)
        moved = cv2.warpAffine(part, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out = np.where((moved[..., 0] | moved[..., 1] | moved[..., 2])[..., None] > 0, moved, out)
    return out


def first_visible_frame(scores: np.ndarray, threshold: float = BODY_THRESHOLD) -> int:
    """Index of the first frame with a visible body point (0 if none has any)."""
    seen = (np.asarray(scores)[:, :23] >= threshold).any(axis=1)
    return int(np.argmax(seen)) if seen.any() else 0


def _panel(background: np.ndarray, skeleton: np.ndarray, guide: np.ndarray | None, label: str) -> np.ndarray:
    """Skeleton over a dimmed photo, with the reference skeleton in grey underneath as a guide."""
    canvas = background.copy() if guide is None else (background.astype(np.float32) * 0.45).astype(np.uint8)
    if guide is not None:
        canvas[guide.any(axis=2)] = (150, 150, 150)
    drawn = skeleton.any(axis=2)
    canvas[drawn] = skeleton[drawn]
    h, w = canvas.shape[:2]
    canvas = cv2.resize(canvas, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    cv2.rectangle(canvas, (0, 0), (w // 2, 34), (0, 0, 0), thickness=-1)
    cv2.putText(canvas, label, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def alignment_panels(
    reference_frame: np.ndarray,
    reference_pose: PersonPose | None,
    before: tuple[np.ndarray, np.ndarray],
    after: tuple[np.ndarray, np.ndarray],
    alignment: Alignment,
) -> np.ndarray:
    """The ``alignment.png`` picture, RGB uint8 (H/2, 3W/2, 3): the reference with its skeleton, then one driving
    skeleton before and after alignment.

    The two driving panels draw the reference skeleton in grey underneath, so a mismatch in size or position is
    visible at a glance. Points are (133, 2) keypoints and (133,) scores in the model frame of ``reference_frame``.
    """
    h, w = reference_frame.shape[:2]
    ref_skeleton = (
        render_pose(reference_pose.keypoints, reference_pose.scores, w, h) if reference_pose is not None else np.zeros_like(reference_frame)
    )
    panels = [
        _panel(reference_frame, ref_skeleton, None, "reference"),
        _panel(reference_frame, render_pose(*before, w, h), ref_skeleton, "driving, as extracted"),
        _panel(reference_frame, render_pose(*after, w, h), ref_skeleton, f"driving, aligned ({alignment.mode}, x{alignment.scale:.2f})"),
    ]
    return np.concatenate(panels, axis=1)


@dataclass(frozen=True)
class AlignedPoses:
    """Driving keypoints in the model frame, ready to render at the reference frame's size."""

    keypoints: np.ndarray  # (F, 133, 2) float32
    scores: np.ndarray  # (F, 133) float32
    alignment: Alignment
    reference_pose: PersonPose | None
    framed: np.ndarray  # (F, 133, 2) float32: the driving keypoints on the canvas before alignment

    def preview(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
        """(points, scores) of the first frame with a visible body, before and after alignment; None for no frames."""
        if not len(self.keypoints):
            return None
        k = first_visible_frame(self.scores)
        return (self.framed[k], self.scores[k]), (self.keypoints[k], self.scores[k])


def align_driving_poses(
    reference_frame: np.ndarray,
    driving_keypoints: np.ndarray,
    driving_scores: np.ndarray,
    driving_size: tuple[int, int],
    *,
    mode: str = "auto",
    reporter: Reporter,
    reference_pose: PersonPose | None = None,
    reference_name: str = "the reference image",
) -> AlignedPoses:
    """Frame the driving keypoints (F, 133, 2) to the model canvas and retarget them onto the reference person.

    ``reference_frame`` is the reference image already framed (``frame_to_model``), (H, W, 3) uint8, and
    ``reference_pose`` the person detected on it (None: nobody was found, so nothing is aligned and a warning says
    so). ``driving_size`` is the driving video's (width, height). Nothing is detected or written here: the caller
    detects the reference person and may draw :meth:`AlignedPoses.preview` (``alignment.png``).
    Raises ValueError for an unknown ``mode``.
    """
    if mode not in ALIGN_MODES:
        raise ValueError(f"align mode {mode!r} is not one of {ALIGN_MODES}")
    height, width = reference_frame.shape[:2]
    framed = map_points_to_model(driving_keypoints, driving_size[0], driving_size[1], (height, width))
    scores = np.asarray(driving_scores, dtype=np.float32)
    if reference_pose is None and mode != "none":
        reporter.warn(
            f"no person found in {reference_name}; the driving skeleton is not aligned (pass {option('align')} none to silence this)"
        )
    alignment = fit_alignment(reference_pose, framed, scores, mode) if reference_pose is not None else Alignment(mode=mode)
    if mode != "none" and reference_pose is not None and not alignment.aligned:
        reporter.warn(
            f"cannot align: {reference_name} and the driving video show no body part in common "
            "(shoulders, torso, legs or head); the driving skeleton is used as extracted"
        )
    aligned = apply_alignment(alignment, framed, scores)
    reporter.info(alignment.describe())
    for part in alignment.clamped:
        reporter.warn(f"{option('align')} limbs: the {part} ratio was out of range and was clamped (a foreshortened limb in one of the poses?)")
    return AlignedPoses(keypoints=aligned, scores=scores, alignment=alignment, reference_pose=reference_pose, framed=framed)

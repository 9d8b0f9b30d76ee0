"""Retargeting the driving skeleton onto the reference: synthetic bodies with known transforms, and the real photo."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from posegen_cli.pose.align import (
    Alignment,
    align_driving_poses,
    align_hand_frame,
    apply_alignment,
    body_statistics,
    fit_alignment,
)
from posegen_cli.pose.render import render_pose
from posegen_cli.pose.stream import write_alignment_png, write_alignment_preview
from posegen_cli.pose.types import PersonPose
from posegen_cli.report import Reporter
from posegen_cli.video.framing import crop_box_9x16, map_points_to_model

REF_PROPORTIONS = {
    "shoulders": 160.0, "torso": 240.0, "hips": 100.0, "upper_arm": 120.0, "forearm": 110.0,
    "thigh": 180.0, "shin": 170.0, "neck": 90.0, "head": 70.0, "hand": 40.0,
}  # fmt: skip
STANDING = {"l_upper": -0.2, "l_fore": -0.1, "r_upper": 0.2, "r_fore": 0.1, "l_thigh": 0.0, "l_shin": 0.0, "r_thigh": 0.0, "r_shin": 0.0}
NECK_AT = np.array([360.0, 420.0])


def _dir(angle: float) -> np.ndarray:
    """Unit vector; angle 0 points down the image, positive turns towards +x."""
    return np.array([math.sin(angle), math.cos(angle)])


def make_body(p: dict[str, float], angles: dict[str, float], neck: np.ndarray = NECK_AT) -> tuple[np.ndarray, np.ndarray]:
    """A front-facing COCO-WholeBody skeleton built from bone lengths and absolute bone angles."""
    k = np.zeros((133, 2))
    right = np.array([1.0, 0.0])
    k[5], k[6] = neck + right * p["shoulders"] / 2, neck - right * p["shoulders"] / 2
    hip_centre = neck + np.array([0.0, p["torso"]])
    k[11], k[12] = hip_centre + right * p["hips"] / 2, hip_centre - right * p["hips"] / 2
    for side, (sh, el, wr, hp, kn, an) in (("l", (5, 7, 9, 11, 13, 15)), ("r", (6, 8, 10, 12, 14, 16))):
        k[el] = k[sh] + p["upper_arm"] * _dir(angles[f"{side}_upper"])
        k[wr] = k[el] + p["forearm"] * _dir(angles[f"{side}_fore"])
        k[kn] = k[hp] + p["thigh"] * _dir(angles[f"{side}_thigh"])
        k[an] = k[kn] + p["shin"] * _dir(angles[f"{side}_shin"])
    k[0] = neck - np.array([0.0, p["neck"]])
    k[1], k[2] = k[0] + np.array([0.2, -0.15]) * p["head"], k[0] + np.array([-0.2, -0.15]) * p["head"]
    k[3], k[4] = k[0] + np.array([0.5, 0.0]) * p["head"], k[0] - np.array([0.5, 0.0]) * p["head"]
    for i, a in enumerate(np.linspace(0, 2 * np.pi, 68, endpoint=False)):
        k[23 + i] = k[0] + 0.4 * p["head"] * np.array([math.cos(a), 1.2 * math.sin(a)])
    for ankle, start, sign in ((15, 17, 1.0), (16, 20, -1.0)):
        k[start : start + 3] = k[ankle] + np.array([[sign * 30.0, 25.0], [sign * 45.0, 20.0], [-sign * 5.0, 12.0]])
    for wrist, start in ((9, 91), (10, 112)):
        fan = np.array([[0.0, 0.0]] + [[(f - 2) * 0.25, 0.3 + 0.18 * j] for f in range(5) for j in range(4)])
        k[start : start + 21] = k[wrist] + fan * p["hand"]
    return k.astype(np.float32), np.full(133, 0.9, np.float32)


def motion(n: int, legs: bool, seed: int = 0) -> list[dict[str, float]]:
    """``n`` poses: the standing pose first, then random swings of the arms (and legs if asked)."""
    rng = np.random.default_rng(seed)
    poses = [dict(STANDING)]
    for _ in range(n - 1):
        pose = {key: value + rng.uniform(-1.2, 1.2) for key, value in STANDING.items()}
        if not legs:
            pose.update({key: STANDING[key] for key in STANDING if "thigh" in key or "shin" in key})
        poses.append(pose)
    return poses


def clip(p: dict[str, float], poses: list[dict[str, float]]) -> tuple[np.ndarray, np.ndarray]:
    bodies = [make_body(p, a) for a in poses]
    return np.stack([b[0] for b in bodies]), np.stack([b[1] for b in bodies])


def person(keypoints: np.ndarray, scores: np.ndarray) -> PersonPose:
    return PersonPose(keypoints=keypoints, scores=scores, box=np.zeros(4, np.float32), box_score=1.0)


def _to_driving(points: np.ndarray, scale: float, offset: tuple[float, float]) -> np.ndarray:
    """Driving points such that ``scale * driving + offset`` is ``points``."""
    return ((points - np.asarray(offset)) / scale).astype(np.float32)


REFERENCE = person(*make_body(REF_PROPORTIONS, STANDING))


@pytest.mark.parametrize("scale,offset", [(1.37, (25.0, -60.0)), (0.62, (180.0, 350.0)), (2.5, (-400.0, -900.0))])
def test_auto_recovers_known_scale_and_offset(scale: float, offset: tuple[float, float]) -> None:
    truth, scores = clip(REF_PROPORTIONS, motion(9, legs=False))
    driving = _to_driving(truth, scale, offset)
    alignment = fit_alignment(REFERENCE, driving, scores, "auto")
    assert alignment.scale == pytest.approx(scale, rel=1e-6)
    assert alignment.translation == pytest.approx(offset, abs=1e-3)
    assert alignment.matched == ("shoulders", "torso", "legs", "head")
    assert alignment.anchors == ("hip_centre", "feet_line")
    assert np.allclose(apply_alignment(alignment, driving, scores), truth, atol=2e-3)


def test_auto_uses_medians_so_a_few_wild_frames_do_not_move_it() -> None:
    truth, scores = clip(REF_PROPORTIONS, motion(11, legs=False))
    driving = _to_driving(truth, 1.5, (40.0, 90.0))
    driving[2:4] = driving[2:4] * 1.8 + 300  # two frames of a detector gone wrong (a bigger person elsewhere)
    alignment = fit_alignment(REFERENCE, driving, scores, "auto")
    assert alignment.scale == pytest.approx(1.5, rel=1e-6)
    assert alignment.translation == pytest.approx((40.0, 90.0), abs=1e-3)


def _bone_vectors(k: np.ndarray) -> dict[str, np.ndarray]:
    """(F, 2) vectors of every rescaled bone, named by the measurement that sets its length."""
    neck, hips = (k[:, 5] + k[:, 6]) / 2, (k[:, 11] + k[:, 12]) / 2
    return {
        "shoulders/2 L": k[:, 5] - neck, "shoulders/2 R": k[:, 6] - neck, "torso": hips - neck,
        "hips/2 L": k[:, 11] - hips, "hips/2 R": k[:, 12] - hips, "neck": k[:, 0] - neck,
        "upper_arm L": k[:, 7] - k[:, 5], "forearm L": k[:, 9] - k[:, 7],
        "upper_arm R": k[:, 8] - k[:, 6], "forearm R": k[:, 10] - k[:, 8],
        "thigh L": k[:, 13] - k[:, 11], "shin L": k[:, 15] - k[:, 13],
        "thigh R": k[:, 14] - k[:, 12], "shin R": k[:, 16] - k[:, 14],
    }  # fmt: skip


def _expected_length(name: str) -> float:
    part = name.split()[0]
    return REF_PROPORTIONS[part.removesuffix("/2")] / (2 if part.endswith("/2") else 1)


def test_limbs_keeps_every_angle_and_takes_the_reference_lengths() -> None:
    proportions = dict(REF_PROPORTIONS, shoulders=140.0, torso=270.0, hips=110.0, upper_arm=100.0, forearm=130.0,
                       thigh=205.0, shin=150.0, neck=115.0, head=60.0, hand=35.0)  # fmt: skip
    driving_body, scores = clip(proportions, motion(15, legs=True, seed=3))
    driving = _to_driving(driving_body, 1.8, (-90.0, 130.0))
    alignment = fit_alignment(REFERENCE, driving, scores, "limbs")
    assert set(alignment.limb_factors) == {"shoulders", "torso", "hips", "upper_arm", "forearm", "thigh", "shin", "neck", "head"}
    assert alignment.clamped == ()
    out = apply_alignment(alignment, driving, scores).astype(np.float64)
    before, after = _bone_vectors(driving.astype(np.float64)), _bone_vectors(out)
    for name, vectors in after.items():
        lengths = np.linalg.norm(vectors, axis=1)
        assert np.allclose(lengths, _expected_length(name), rtol=1e-4), name
        cos = (vectors * before[name]).sum(axis=1) / (lengths * np.linalg.norm(before[name], axis=1))
        assert np.all(cos > 1 - 1e-7), name  # same direction: every joint angle is kept
    assert np.allclose(np.linalg.norm(out[:, 3] - out[:, 4], axis=1), REF_PROPORTIONS["head"], rtol=1e-4)
    for wrist, start in ((9, 91), (10, 112)):  # hands ride rigidly on the wrists, at the global scale
        moved = out[:, start : start + 21] - out[:, wrist, None]
        assert np.allclose(moved, alignment.scale * (driving[:, start : start + 21] - driving[:, wrist, None]), atol=1e-3)
    feet_line = np.median(out[:, [15, 16], 1].max(axis=1))  # the feet stand where the reference's do
    assert feet_line == pytest.approx(REFERENCE.keypoints[[15, 16], 1].max(), abs=1e-3)
    assert np.median((out[:, 11, 0] + out[:, 12, 0]) / 2) == pytest.approx(
        (REFERENCE.keypoints[11, 0] + REFERENCE.keypoints[12, 0]) / 2, abs=1e-3
    )


def test_limbs_on_matching_proportions_is_auto() -> None:
    truth, scores = clip(REF_PROPORTIONS, motion(7, legs=True, seed=5))
    driving = _to_driving(truth, 0.8, (10.0, 20.0))
    limbs = fit_alignment(REFERENCE, driving, scores, "limbs")
    assert all(f == pytest.approx(1.0, abs=1e-6) for f in limbs.limb_factors.values())
    assert np.allclose(
        apply_alignment(limbs, driving, scores),
        apply_alignment(fit_alignment(REFERENCE, driving, scores, "auto"), driving, scores),
        atol=2e-3,
    )


@pytest.mark.parametrize("mode", ["auto", "limbs", "none"])
def test_already_aligned_input_is_unchanged(mode: str) -> None:
    driving, scores = clip(REF_PROPORTIONS, motion(8, legs=False, seed=7))
    alignment = fit_alignment(REFERENCE, driving, scores, mode)
    assert alignment.scale == pytest.approx(1.0, abs=1e-9)
    assert alignment.translation == pytest.approx((0.0, 0.0), abs=1e-6)
    assert np.allclose(apply_alignment(alignment, driving, scores), driving, atol=1e-3)


def test_unseen_parent_does_not_drag_its_children() -> None:
    proportions = dict(REF_PROPORTIONS, upper_arm=90.0, forearm=140.0)
    driving, scores = clip(proportions, motion(6, legs=False, seed=2))
    alignment = fit_alignment(REFERENCE, driving, scores, "limbs")
    broken, broken_scores = driving.copy(), scores.copy()
    broken[3, 7] = (5000.0, -7000.0)  # left elbow: garbage position, not detected
    broken_scores[3, 7] = 0.0
    out = apply_alignment(alignment, broken, broken_scores)
    offset = out[3, 9] - out[3, 5]  # the wrist keeps its offset from the shoulder, at the global scale
    assert np.allclose(offset, alignment.scale * (driving[3, 9] - driving[3, 5]), atol=1e-3)
    assert np.abs(out[3, 91:112]).max() < 2000  # and the left hand follows it, not the garbage


def test_reference_cropped_at_the_waist() -> None:
    ref_k, ref_s = make_body(REF_PROPORTIONS, STANDING)
    ref_s[11:23] = 0.0  # hips, legs and feet out of the photo
    truth, scores = clip(REF_PROPORTIONS, motion(9, legs=True, seed=11))
    driving = _to_driving(truth, 1.25, (30.0, -20.0))
    alignment = fit_alignment(person(ref_k, ref_s), driving, scores, "auto")
    assert alignment.matched == ("shoulders", "head")
    assert alignment.anchors == ("neck", "neck")
    assert {"torso", "legs", "thigh", "shin", "hips"} <= set(alignment.driving_only)
    assert alignment.scale == pytest.approx(1.25, rel=1e-6)
    assert alignment.translation == pytest.approx((30.0, -20.0), abs=1e-3)
    assert "only in the driving video: torso, legs" in alignment.describe()
    assert alignment.summary()["align_matched"] == ["shoulders", "head"]


def test_driving_cropped_at_the_waist() -> None:
    truth, scores = clip(REF_PROPORTIONS, motion(9, legs=False, seed=13))
    scores[:, 13:23] = 0.0  # knees down never in the driving frames; hips are
    driving = _to_driving(truth, 0.9, (-15.0, 45.0))
    alignment = fit_alignment(REFERENCE, driving, scores, "limbs")
    assert alignment.matched == ("shoulders", "torso", "head")
    assert alignment.anchors == ("hip_centre", "hip_centre")
    assert "legs" in alignment.reference_only and "thigh" not in alignment.limb_factors
    assert alignment.scale == pytest.approx(0.9, rel=1e-6)
    out = apply_alignment(alignment, driving, scores)
    assert np.allclose(out[:, :13], truth[:, :13], atol=2e-3)


def test_parts_seen_in_too_few_frames_are_not_trusted() -> None:
    truth, scores = clip(REF_PROPORTIONS, motion(10, legs=False, seed=17))
    driving = _to_driving(truth, 1.1, (5.0, 5.0))
    driving[:2, 13:17] += 300.0  # legs seen (wrongly) in 2 of 10 frames only
    scores[2:, 13:23] = 0.0
    alignment = fit_alignment(REFERENCE, driving, scores, "auto")
    assert "legs" not in alignment.matched and alignment.anchors[1] == "hip_centre"
    assert alignment.scale == pytest.approx(1.1, rel=1e-6)


def test_nothing_in_common_leaves_poses_alone() -> None:
    ref_k, ref_s = make_body(REF_PROPORTIONS, STANDING)
    ref_s[:11] = 0.0  # only the legs are in the photo
    ref_s[23:] = 0.0
    driving, scores = clip(REF_PROPORTIONS, motion(4, legs=False))
    scores[:, 11:23] = 0.0  # only the upper body in the video
    alignment = fit_alignment(person(ref_k, ref_s), driving * 0.5, scores, "auto")
    assert not alignment.aligned and alignment.scale == 1.0
    assert np.array_equal(apply_alignment(alignment, driving * 0.5, scores), (driving * 0.5).astype(np.float32))
    assert "skipped" in alignment.describe()


def test_body_statistics_and_bad_arguments() -> None:
    stats = body_statistics(REFERENCE.keypoints, REFERENCE.scores)
    assert stats.frames == 1
    assert stats.lengths["legs"] == pytest.approx(REF_PROPORTIONS["thigh"] + REF_PROPORTIONS["shin"], rel=1e-5)
    assert stats.lengths["shoulders"] == pytest.approx(160.0, rel=1e-5)
    assert stats.anchors["feet_line"][1] == pytest.approx(NECK_AT[1] + 240 + 180 + 170, rel=1e-5)
    with pytest.raises(ValueError, match="align mode"):
        fit_alignment(REFERENCE, REFERENCE.keypoints[None], REFERENCE.scores[None], "stretch")
    with pytest.raises(ValueError, match="reference pose"):
        fit_alignment(None, REFERENCE.keypoints[None], REFERENCE.scores[None], "auto")
    with pytest.raises(ValueError, match=r"\(F, 133, 2\)"):
        apply_alignment(Alignment(mode="none"), REFERENCE.keypoints, REFERENCE.scores)


def _native_landscape(model_points: np.ndarray) -> np.ndarray:
    """Model-frame points back in a 1920x1080 driving frame (the inverse of the 9:16 framing)."""
    x0, y0, w, h = crop_box_9x16(1920, 1080)
    return np.stack([model_points[..., 0] * w / 720 + x0, model_points[..., 1] * h / 1280 + y0], axis=-1).astype(np.float32)


def _grey_pixels(panel: np.ndarray) -> int:
    return int((np.abs(panel[40:].astype(int) - 150).max(axis=2) <= 4).sum())  # below the label


def test_align_driving_poses_frames_aligns_and_draws(tmp_path) -> None:
    truth, scores = clip(REF_PROPORTIONS, motion(6, legs=False, seed=19))
    native = _native_landscape(_to_driving(truth, 1.6, (-50.0, 120.0)))
    assert np.allclose(map_points_to_model(native, 1920, 1080), _to_driving(truth, 1.6, (-50.0, 120.0)), atol=1e-3)
    reference_frame = np.full((1280, 720, 3), 90, np.uint8)
    reporter = Reporter(quiet=False)
    reporter.console.begin_capture()
    png = tmp_path / "alignment.png"
    result = align_driving_poses(reference_frame, native, scores, (1920, 1080), mode="auto", reporter=reporter, reference_pose=REFERENCE)
    write_alignment_preview(png, reference_frame, result)
    text = reporter.console.end_capture()
    assert "alignment (auto): scale x1.600 from shoulders, torso, legs, head" in text
    assert np.allclose(result.keypoints, truth, atol=5e-3)
    assert result.alignment.scale == pytest.approx(1.6, rel=1e-5)
    image = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB)
    assert image.shape == (640, 1080, 3)
    reference_panel, before_panel, after_panel = image[:, :360], image[:, 360:720], image[:, 720:]
    skeleton = render_pose(REFERENCE.keypoints, REFERENCE.scores, 720, 1280)
    overlaid = np.where(skeleton.any(axis=2, keepdims=True), skeleton, reference_frame)
    expected = cv2.resize(overlaid, (360, 640), interpolation=cv2.INTER_AREA)
    assert np.array_equal(reference_panel[40:], expected[40:])  # below the label: the reference with its skeleton
    # The grey reference skeleton shows beside the unaligned driving skeleton but hides under the aligned one
    # (what stays grey in the aligned panel are white hand dots blended with the dark photo by the downscale).
    assert _grey_pixels(before_panel) > 2000 and _grey_pixels(after_panel) * 20 < _grey_pixels(before_panel)


def test_align_none_only_frames_the_points(tmp_path) -> None:
    truth, scores = clip(REF_PROPORTIONS, motion(3, legs=False))
    native = _native_landscape(truth)
    result = align_driving_poses(
        np.zeros((1280, 720, 3), np.uint8), native, scores, (1920, 1080), mode="none", reporter=Reporter(quiet=True)
    )
    assert result.alignment.mode == "none" and result.reference_pose is None
    assert np.allclose(result.keypoints, map_points_to_model(native, 1920, 1080))


def test_write_alignment_png_is_atomic_and_decodes(tmp_path) -> None:
    frame = np.zeros((128, 72, 3), np.uint8)
    k, s = REFERENCE.keypoints * 0.1, REFERENCE.scores
    path = write_alignment_png(tmp_path / "out" / "alignment.png", frame, person(k, s), (k, s), (k, s), Alignment(mode="auto"))
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["alignment.png"]
    assert cv2.imread(str(path)).shape == (64, 108, 3)


def test_reference_photo_against_a_shifted_scaled_copy(shared_data) -> None:
    """MediaPipe on the real photo and on a copy shrunk by 0.8 and moved: the fit undoes the warp."""
    pytest.importorskip("mediapipe")
    from posegen_cli.pose.backends import extract_reference_pose

    photo = cv2.cvtColor(cv2.imread(str(shared_data / "reference_person.png")), cv2.COLOR_BGR2RGB)
    s, tx, ty = 0.8, 70.0, 200.0
    warp = np.array([[s, 0, tx], [0, s, ty]])
    copy = cv2.warpAffine(photo, warp, (720, 1280), flags=cv2.INTER_AREA, borderValue=(128, 128, 128))
    ref = extract_reference_pose(photo, "mediapipe")
    moved = extract_reference_pose(copy, "mediapipe")
    assert ref is not None and moved is not None
    for mode in ("auto", "limbs"):
        alignment = fit_alignment(ref, moved.keypoints[None], moved.scores[None], mode)
        assert alignment.scale == pytest.approx(1 / s, rel=0.04)
        out = apply_alignment(alignment, moved.keypoints[None], moved.scores[None])[0]
        seen = (ref.scores[:17] >= 0.3) & (moved.scores[:17] >= 0.3)
        error = np.linalg.norm(out[:17][seen] - ref.keypoints[:17][seen], axis=1)
        unaligned = np.linalg.norm(moved.keypoints[:17][seen] - ref.keypoints[:17][seen], axis=1)
        assert seen.sum() >= 11 and np.median(error) < 8.0 and np.median(unaligned) > 80.0


def test_reference_without_a_person_warns_and_leaves_poses_framed() -> None:
    pytest.importorskip("mediapipe")
    truth, scores = clip(REF_PROPORTIONS, motion(3, legs=False))
    native = _native_landscape(truth)
    from posegen_cli.pose.backends import extract_reference_pose

    reporter = Reporter(quiet=True)
    reporter.console.begin_capture()
    frame = np.zeros((1280, 720, 3), np.uint8)
    person = extract_reference_pose(frame, "mediapipe")  # alignment never detects: the caller does
    result = align_driving_poses(
        frame, native, scores, (1920, 1080), mode="limbs", reporter=reporter, reference_pose=person,
        reference_name="reference image empty.png",
    )  # fmt: skip
    text = reporter.console.end_capture()
    assert "no person found in reference image empty.png" in text
    assert result.reference_pose is None and not result.alignment.aligned and result.alignment.mode == "limbs"
    assert np.allclose(result.keypoints, map_points_to_model(native, 1920, 1080))


def _blobs(centres: np.ndarray, sigma: float, h: int = 1280, w: int = 720) -> np.ndarray:
    """A stand-in hand-normal frame: one Gaussian blob per hand centre, black elsewhere."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    value = sum(np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2)) for cx, cy in centres)
    return np.repeat((np.clip(value, 0, 1) * 250).round().astype(np.uint8)[..., None], 3, axis=2)


def _centroid_near(frame: np.ndarray, point: np.ndarray, radius: float = 40.0) -> np.ndarray:
    ys, xs = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]] + 0.5
    weight = frame[..., 0].astype(np.float64) * ((xs - point[0]) ** 2 + (ys - point[1]) ** 2 < radius**2)
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


@pytest.mark.parametrize("mode", ["auto", "limbs"])
def test_hand_video_moves_with_the_hands(mode: str) -> None:
    proportions = dict(REF_PROPORTIONS, upper_arm=95.0, forearm=135.0, shoulders=150.0)
    body, scores = clip(proportions, motion(5, legs=False, seed=23))
    driving = _to_driving(body, 1.3, (60.0, 150.0))
    alignment = fit_alignment(REFERENCE, driving, scores, mode)
    after = apply_alignment(alignment, driving, scores)
    k = 2
    centres_before = np.stack([driving[k, 91:112].mean(axis=0), driving[k, 112:133].mean(axis=0)])
    centres_after = np.stack([after[k, 91:112].mean(axis=0), after[k, 112:133].mean(axis=0)])
    global_only = alignment.scale * centres_before + np.asarray(alignment.translation)
    assert np.abs(centres_after - global_only).max() > (10.0 if mode == "limbs" else -1.0)  # limbs moved the hands further
    moved = align_hand_frame(_blobs(centres_before, 8.0), alignment, driving[k], after[k])
    for centre in centres_after:  # each hand's normals sit on that hand of the aligned skeleton
        assert np.abs(_centroid_near(moved, centre) - centre).max() < 0.05
    expected = _blobs(centres_after, 8.0 * alignment.scale)  # and keep their shape, scaled like the body
    assert np.abs(moved.astype(int) - expected.astype(int)).max() <= 6
    frame = _blobs(centres_before, 8.0)
    assert align_hand_frame(frame, Alignment(mode="none"), driving[k], driving[k]) is frame

"""`extract_pose` end to end with the MediaPipe backend on real frames, plus its COCO-WholeBody mapping."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
from rich.console import Console

from posegen_cli.errors import InputError, MissingModelError
from posegen_cli.pose import extract as extract_module
from posegen_cli.pose import stream as stream_module
from posegen_cli.pose.backends import extract_reference_pose, resolve_backend, resolve_hand_normals
from posegen_cli.pose.extract import ExtractResult
from posegen_cli.pose.settings import PoseOptions
from posegen_cli.pose.keypoints import KeypointTrack, load_npz, save_npz
from posegen_cli.pose.mediapipe_backend import MediaPipePoseBackend, assign_hands, coco_from_mediapipe
from posegen_cli.pose.render import render_pose
from posegen_cli.pose.types import PersonPose
from posegen_cli.report import Reporter
from posegen_cli.video import iter_frames, load_image, probe_video, write_video


def extract_pose(video: Path, out_dir: Path | None = None, **kwargs) -> ExtractResult:
    """``extract_module.extract_pose`` with the :class:`PoseOptions` fields given as keywords beside its own."""
    fields = {f.name for f in dataclasses.fields(PoseOptions)}
    options = PoseOptions(**{k: v for k, v in kwargs.items() if k in fields})
    return extract_module.extract_pose(video, out_dir, options, **{k: v for k, v in kwargs.items() if k not in fields})

SIZE = (360, 640)  # W, H: the reference photo at half size keeps the test fast
HOLD = 5  # frames per pose of the clip; MediaPipe's video tracker settles within a hold
MOVES = 4
FPS = Fraction(25)

# Agreement with the transformed reference detection on the last frame of each hold, at 360x640 (the
# person is ~480 px tall). Hips sit under a loose cardigan and wander more in tracking mode.
HEAD_ARMS_TOLERANCE_PX = 12.0
HIPS_TOLERANCE_PX = 28.0
HAND_MEAN_TOLERANCE_PX = 3.0
HAND_MAX_TOLERANCE_PX = 10.0


def quiet() -> Reporter:
    return Reporter(console=Console(file=io.StringIO(), width=200))


def affine(step: int) -> np.ndarray:
    """Scale 1 + 2%, rotation 2 degrees (about the centre) and a shift of (4, -3) px per step."""
    w, h = SIZE
    s, a = 1 + 0.02 * step, np.deg2rad(2.0 * step)
    rot = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    centre = np.array([w / 2, h / 2])
    shift = centre - rot @ centre + np.array([4.0 * step, -3.0 * step])
    return np.hstack([rot, shift[:, None]]).astype(np.float32)


@pytest.fixture(scope="module")
def person_image(reference_image_path: Path) -> np.ndarray:
    return cv2.resize(load_image(reference_image_path), SIZE, interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def moving_clip(tmp_path_factory: pytest.TempPathFactory, person_image: np.ndarray) -> Path:
    frames = [cv2.warpAffine(person_image, affine(i // HOLD * 3), SIZE) for i in range(HOLD * MOVES)]
    return write_video(tmp_path_factory.mktemp("clip") / "moving.mp4", frames, FPS, lossless=True)


@pytest.fixture(scope="module")
def extracted(moving_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> ExtractResult:
    out = tmp_path_factory.mktemp("out") / "pose"
    return extract_pose(moving_clip, out, backend="mediapipe", lossless=True, use_cache=False, reporter=quiet())


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory: pytest.TempPathFactory, person_image: np.ndarray) -> Path:
    """Four frames of the person, then two empty frames, at quarter size."""
    small = cv2.resize(person_image, (180, 320), interpolation=cv2.INTER_AREA)
    frames = [small] * 4 + [np.full_like(small, 128)] * 2
    return write_video(tmp_path_factory.mktemp("small") / "small.mp4", frames, 30, lossless=True)


# --- mapping (pure) ------------------------------------------------------------------------------


def test_body_mapping_follows_the_spec_table():
    body = np.zeros((33, 3), np.float32)
    body[:, 0] = np.arange(33) * 10  # x encodes the MediaPipe index
    body[:, 1] = 500
    body[:, 2] = np.linspace(0.1, 0.99, 33)
    kp, sc = coco_from_mediapipe(body, [], [])
    expected = {0: 0, 1: 2, 2: 5, 3: 7, 4: 8, 5: 11, 6: 12, 7: 13, 8: 14, 9: 15, 10: 16, 11: 23, 12: 24,
                13: 25, 14: 26, 15: 27, 16: 28, 17: 31, 19: 29, 20: 32, 22: 30}  # fmt: skip
    for coco, mp_index in expected.items():
        assert kp[coco, 0] == mp_index * 10 and sc[coco] == body[mp_index, 2]
    assert sc[18] == 0 and sc[21] == 0  # small toes: no counterpart
    assert not sc[23:].any()  # face not filled, hands absent


def test_hands_go_to_the_nearest_wrist_not_the_label():
    body = np.zeros((33, 3), np.float32)
    body[15] = (300, 400, 0.9)  # MP LEFT_WRIST -> COCO 9 (subject's left, image right)
    body[16] = (100, 400, 0.9)  # MP RIGHT_WRIST -> COCO 10
    near_left = np.tile([[305.0, 420.0]], (21, 1)).astype(np.float32)
    near_right = np.tile([[95.0, 415.0]], (21, 1)).astype(np.float32)
    kp, sc = coco_from_mediapipe(body, [near_right, near_left], [0.91, 0.98])
    assert kp[91].tolist() == [305, 420] and sc[91:112].tolist() == pytest.approx([0.98] * 21)
    assert kp[112].tolist() == [95, 415] and sc[112:].tolist() == pytest.approx([0.91] * 21)
    # one hand: the nearer wrist only
    kp, sc = coco_from_mediapipe(body, [near_right], [0.8])
    assert not sc[91:112].any() and kp[112].tolist() == [95, 415]
    # two hands near the same wrist: the pair with the smaller total distance wins
    assert assign_hands([near_left + 30, near_left], np.array([300, 400]), np.array([100, 400])) == (1, 0)


def test_missing_mediapipe_is_a_missing_model_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    with pytest.raises(MissingModelError, match="pip install") as info:
        MediaPipePoseBackend()
    assert info.value.exit_code == 3


# --- backend choice ------------------------------------------------------------------------------


def test_auto_backend_without_gpu_is_mediapipe(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    name, why = resolve_backend("auto")
    assert name == "mediapipe" and "no CUDA GPU" in why
    assert resolve_backend("sapiens") == ("sapiens", "requested")
    assert resolve_hand_normals("auto", "mediapipe") == "none"
    assert resolve_hand_normals("auto", "sapiens") == "sapiens"
    assert resolve_hand_normals("sapiens", "mediapipe") == "sapiens"
    with pytest.raises(InputError, match="--backend 'openpose'"):
        resolve_backend("openpose")
    with pytest.raises(InputError, match="--hand-normals"):
        resolve_hand_normals("dwpose", "mediapipe")


# --- real frames ---------------------------------------------------------------------------------


def test_reference_pose_finds_the_face_and_both_hands(person_image):
    found = extract_reference_pose(person_image, "mediapipe")
    assert found is not None
    # Read off the photo (half size): nose near (166, 204), wrists low at both sides.
    assert abs(found.keypoints[0, 0] - 166) < 8 and abs(found.keypoints[0, 1] - 204) < 8
    assert found.scores[91:133].min() > 0.7  # both hands, scored by handedness
    assert found.keypoints[91, 0] > found.keypoints[112, 0]  # subject's left hand is on the image's right


def test_joints_follow_the_known_affine_motion(extracted, person_image):
    base = extract_reference_pose(person_image, "mediapipe")
    track = load_npz(extracted.keypoints)
    confident = base.scores > 0.8
    for move in range(MOVES):
        t = move * HOLD + HOLD - 1
        m = affine(move * 3)
        expected = base.keypoints @ m[:, :2].T + m[:, 2]
        err = np.linalg.norm(track.keypoints[t] - expected, axis=1)
        seen = confident & (track.scores[t] > 0.8)
        head_arms = seen.copy()
        head_arms[11:] = False
        assert head_arms[[0, 5, 6, 7, 8, 9, 10]].all(), f"frame {t}: face/arms not confidently found"
        assert err[head_arms].max() < HEAD_ARMS_TOLERANCE_PX, f"frame {t}: {err[head_arms].round(1)}"
        assert err[[11, 12]][seen[[11, 12]]].max(initial=0) < HIPS_TOLERANCE_PX
        hands = slice(91, 133)
        assert (track.scores[t, hands] > 0.7).all(), f"frame {t}: a hand was lost"
        assert err[hands].mean() < HAND_MEAN_TOLERANCE_PX and err[hands].max() < HAND_MAX_TOLERANCE_PX


def test_outputs_keep_frame_count_fps_and_size(extracted, moving_clip):
    source = probe_video(moving_clip)
    assert (extracted.frame_count, extracted.fps, extracted.width, extracted.height) == (20, FPS, 360, 640)
    assert extracted.backend == "mediapipe" and extracted.frames_without_person == 0 and not extracted.cached
    for path in (extracted.pose_video, extracted.hand_video, extracted.overlay):
        info = probe_video(path)
        assert (info.frame_count, info.fps, info.width, info.height) == (source.frame_count, source.fps, source.width, source.height)
    track = load_npz(extracted.keypoints)
    assert track.keypoints.shape == (20, 133, 2) and track.scores.shape == (20, 133)
    assert (track.fps, track.width, track.height, track.backend) == (FPS, 360, 640, "mediapipe")


def test_lossless_pose_video_is_the_renderer_output(extracted):
    track = load_npz(extracted.keypoints)
    for t, frame in enumerate(iter_frames(extracted.pose_video)):
        assert np.array_equal(frame, render_pose(track.keypoints[t], track.scores[t], 360, 640)), f"frame {t}"
    assert all(not frame.any() for frame in iter_frames(extracted.hand_video))  # no normal model: black


def test_overlay_shows_the_skeleton_over_the_source(extracted, moving_clip):
    pose = next(iter_frames(extracted.pose_video))
    overlay = next(iter_frames(extracted.overlay)).astype(int)
    source = next(iter_frames(moving_clip)).astype(int)
    drawn = pose.any(axis=2)
    assert drawn.sum() > 1000
    # lossy preview: the skeleton dominates where drawn, the photo elsewhere
    assert np.abs(overlay[drawn] - pose[drawn]).mean() < 20
    assert np.abs(overlay[~drawn] - source[~drawn]).mean() < 6


def test_frames_without_anyone_are_counted_and_black(small_clip, tmp_path):
    result = extract_pose(small_clip, tmp_path / "out", backend="mediapipe", lossless=True, reporter=quiet())
    assert result.frame_count == 6 and result.frames_without_person == 2
    frames = list(iter_frames(result.pose_video))
    assert all(f.any() for f in frames[:4]) and not any(f.any() for f in frames[4:])
    assert not load_npz(result.keypoints).scores[4:].any()


def test_a_video_with_nobody_is_an_error(tmp_path):
    empty = write_video(tmp_path / "empty.mp4", [np.full((320, 180, 3), 90, np.uint8)] * 3, 30)
    with pytest.raises(InputError, match="nobody was found in any of the 3 frames"):
        extract_pose(empty, tmp_path / "out", backend="mediapipe", reporter=quiet())
    assert not (tmp_path / "out" / "pose.mp4").exists()


def test_cache_returns_the_same_files_without_detecting(small_clip, tmp_path, monkeypatch):
    first = extract_pose(small_clip, tmp_path / "a", backend="mediapipe", reporter=quiet())
    assert not first.cached

    def no_detection(*args, **kwargs):
        raise AssertionError("the cached run must not build a detector")

    monkeypatch.setattr(stream_module, "make_pose_backend", no_detection)
    second = extract_pose(small_clip, tmp_path / "b", backend="mediapipe", reporter=quiet())
    assert second.cached and second.frames_without_person == first.frames_without_person
    for a, b in ((first.pose_video, second.pose_video), (first.keypoints, second.keypoints), (first.hand_video, second.hand_video)):
        assert a.read_bytes() == b.read_bytes() and b.parent == tmp_path / "b"
    # a setting that changes the output is a different cache entry
    with pytest.raises(AssertionError, match="must not build"):
        extract_pose(small_clip, tmp_path / "c", backend="mediapipe", hand_threshold=0.5, reporter=quiet())


def test_default_output_folder_sits_next_to_the_video(small_clip, tmp_path):
    clip = tmp_path / "dance.mp4"
    clip.write_bytes(small_clip.read_bytes())
    result = extract_pose(clip, backend="mediapipe", reporter=quiet())
    assert result.pose_video == tmp_path / "dance_pose" / "pose.mp4" and result.pose_video.is_file()


def test_render_from_edited_keypoints_and_openpose_json(extracted, moving_clip, tmp_path):
    track = load_npz(extracted.keypoints)
    shifted = KeypointTrack(track.keypoints + np.float32(12.5), track.scores, track.fps, track.width, track.height, "edited")
    edited = save_npz(shifted, tmp_path / "edited.npz")
    result = extract_pose(
        moving_clip, tmp_path / "from_npz", from_keypoints=edited, lossless=True, output_format="openpose-json", reporter=quiet()
    )
    assert result.backend == "edited" and result.frame_count == 20
    frames = list(iter_frames(result.pose_video))
    for t in (0, 19):
        assert np.array_equal(frames[t], render_pose(shifted.keypoints[t], shifted.scores[t], 360, 640))
    json_files = sorted(result.openpose_dir.glob("*.json"))
    assert len(json_files) == 20 and json.loads(json_files[0].read_text())["people"]
    # the JSON folder renders the same pixels again (an exact round trip)
    again = extract_pose(moving_clip, tmp_path / "from_json", from_keypoints=result.openpose_dir, lossless=True, reporter=quiet())
    assert again.backend == "openpose-json"
    assert all(np.array_equal(a, b) for a, b in zip(frames, iter_frames(again.pose_video)))


def test_keypoints_must_match_the_video(extracted, moving_clip, tmp_path):
    track = load_npz(extracted.keypoints)
    short = save_npz(KeypointTrack(track.keypoints[:6], track.scores[:6], track.fps, 360, 640, "x"), tmp_path / "short.npz")
    with pytest.raises(InputError, match="6 frames of keypoints but .* has 20"):
        extract_pose(moving_clip, tmp_path / "x", from_keypoints=short, reporter=quiet())
    other = save_npz(KeypointTrack(track.keypoints, track.scores, track.fps, 720, 1280, "x"), tmp_path / "big.npz")
    with pytest.raises(InputError, match="720x1280 frames but .* is 360x640"):
        extract_pose(moving_clip, tmp_path / "y", from_keypoints=other, reporter=quiet())
    with pytest.raises(InputError, match="keypoints not found"):
        extract_pose(moving_clip, tmp_path / "z", from_keypoints=tmp_path / "nope.npz", reporter=quiet())
    with pytest.raises(InputError, match="--format"):
        extract_pose(moving_clip, tmp_path / "z", output_format="csv", reporter=quiet())


# --- orchestration with stand-in backends --------------------------------------------------------


class StripeNormals:
    """A NormalBackend stand-in: a hand class on the top rows, fixed normals that depend on the frame."""

    name = "stand-in"

    def __init__(self) -> None:
        self.calls = 0

    def normals_and_segmentation(self, frames):
        out = []
        for frame in frames:
            h, w = frame.shape[:2]
            normals = np.zeros((h, w, 3), np.float32)
            normals[..., 0] = 1.0
            normals[..., 2] = float(self.calls % 3) - 1.0
            seg = np.zeros((h, w), np.int64)
            seg[: h // 4] = 5
            seg[h // 4 : h // 2] = 14
            seg[h // 2 : 3 * h // 4] = 21  # torso: dropped
            out.append((normals, seg))
            self.calls += 1
        return out


def test_hand_video_comes_from_the_normal_backend(extracted, moving_clip, tmp_path, monkeypatch):
    from posegen_cli.pose.render import render_hand_normals

    monkeypatch.setattr(stream_module, "make_normal_backend", lambda **kwargs: StripeNormals())
    result = extract_pose(
        moving_clip, tmp_path / "o", from_keypoints=extracted.keypoints, hand_normals="sapiens", lossless=True, reporter=quiet()
    )
    assert result.hand_normals == "sapiens"
    reference = StripeNormals()
    for frame, (normals, seg) in zip(iter_frames(result.hand_video), reference.normals_and_segmentation([np.zeros((640, 360, 3))] * 20)):
        assert np.array_equal(frame, render_hand_normals(normals, seg))


class TwoPeople:
    """A PoseBackend stand-in: two people who swap detector scores every other frame."""

    name = "stand-in"

    def __init__(self) -> None:
        self.frame = 0

    def detect(self, frames):
        out = []
        for _ in frames:
            people = []
            for who, x in ((0, 60.0), (1, 240.0)):
                kp = np.zeros((133, 2), np.float32)
                kp[0] = (x + self.frame, 100.0)  # nose
                sc = np.zeros(133, np.float32)
                sc[0] = 0.9
                box = np.array([x - 40 + self.frame, 50, x + 40 + self.frame, 400], np.float32)
                people.append(PersonPose(kp, sc, box, 0.9 if (self.frame + who) % 2 == 0 else 0.5))
            self.frame += 1
            out.append(sorted(people, key=lambda p: -p.box_score))
        return out


@pytest.mark.parametrize("track", [False, True])
def test_track_follows_one_person_across_frames(moving_clip, tmp_path, monkeypatch, track):
    monkeypatch.setattr(stream_module, "make_pose_backend", lambda *args, **kwargs: TwoPeople())
    result = extract_pose(
        moving_clip, tmp_path / "o", backend="sapiens", hand_normals="none", track=track, use_cache=False, reporter=quiet()
    )
    noses = load_npz(result.keypoints).keypoints[:, 0, 0] - np.arange(20)
    if track:
        assert (noses == 60).all()
    else:  # the release's choice: the top score, which alternates
        assert noses.tolist() == [60.0, 240.0] * 10


class FailsOnSecondBatch:
    name = "stand-in"

    def __init__(self) -> None:
        self.batches = 0

    def detect(self, frames):
        self.batches += 1
        if self.batches == 2:
            raise RuntimeError("detector crashed")
        return [[] for _ in frames]


def test_a_failing_backend_stops_cleanly(moving_clip, tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(stream_module, "make_pose_backend", lambda *args, **kwargs: FailsOnSecondBatch())
    with pytest.raises(RuntimeError, match="detector crashed"):
        extract_pose(moving_clip, tmp_path / "o", backend="sapiens", hand_normals="none", batch_size=4, use_cache=False, reporter=quiet())
    assert not [t for t in threading.enumerate() if t.name.startswith(("posegen-decode", "posegen-encode"))]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial work folders left


def test_large_sources_get_a_half_size_overlay(tmp_path):
    clip = write_video(tmp_path / "tall.mp4", [np.full((1000, 540, 3), 70, np.uint8)] * 2, 24)
    kp = np.zeros((2, 133, 2), np.float32)
    kp[:, 0] = (270, 300)
    sc = np.zeros((2, 133), np.float32)
    sc[:, 0] = 0.9
    keypoints = save_npz(KeypointTrack(kp, sc, Fraction(24), 540, 1000, "edited"), tmp_path / "k.npz")
    result = extract_pose(clip, tmp_path / "o", from_keypoints=keypoints, reporter=quiet())
    assert (probe_video(result.pose_video).width, probe_video(result.pose_video).height) == (540, 1000)
    assert (probe_video(result.overlay).width, probe_video(result.overlay).height) == (270, 500)


def test_align_to_renders_the_retargeted_skeleton_on_the_model_canvas(extracted, moving_clip, reference_image_path, tmp_path):
    from posegen_cli.video.framing import frame_to_model, map_points_to_model

    kwargs = {"from_keypoints": extracted.keypoints, "align_to": reference_image_path, "lossless": True, "reporter": quiet()}
    none = extract_pose(moving_clip, tmp_path / "none", align="none", **kwargs)
    raw = load_npz(extracted.keypoints)
    framed = load_npz(none.aligned_keypoints)
    assert (framed.width, framed.height) == (720, 1280)
    assert np.allclose(framed.keypoints, map_points_to_model(raw.keypoints, 360, 640))  # 9:16 source: a 2x resize
    assert none.keypoints.read_bytes() == extracted.keypoints.read_bytes()  # keypoints.npz stays in the source frame
    # --align none is the release's path: drawn at the source size (360x640 here), then framed to 720x1280
    for t, frame in enumerate(iter_frames(none.pose_video)):
        assert np.array_equal(frame, frame_to_model(render_pose(raw.keypoints[t], raw.scores[t], 360, 640))), f"frame {t}"

    auto = extract_pose(moving_clip, tmp_path / "auto", align="auto", **kwargs)
    assert (auto.width, auto.height, auto.frame_count) == (720, 1280, 20) and not auto.cached
    assert auto.alignment["align"] == "auto" and auto.alignment["align_matched"]
    for path in (auto.pose_video, auto.hand_video):
        info = probe_video(path)
        assert (info.width, info.height, info.frame_count, info.fps) == (720, 1280, 20, FPS)
    aligned = load_npz(auto.aligned_keypoints)
    assert not np.allclose(aligned.keypoints, framed.keypoints)  # the fit moved the skeleton
    for t, frame in enumerate(iter_frames(auto.pose_video)):
        assert np.array_equal(frame, render_pose(aligned.keypoints[t], aligned.scores[t], 720, 1280)), f"frame {t}"
    assert not any(f.any() for f in iter_frames(auto.hand_video))
    assert cv2.imread(str(auto.alignment_png)) is not None
    # the overlay stays in the source frame
    assert (probe_video(auto.overlay).width, probe_video(auto.overlay).height) == (360, 640)

    again = extract_pose(moving_clip, tmp_path / "again", align="auto", **kwargs)
    assert again.cached and again.pose_video.read_bytes() == auto.pose_video.read_bytes()


def test_align_to_uses_a_given_reference_pose_and_video_info(extracted, moving_clip, reference_image_path, tmp_path, monkeypatch):
    """``animate`` has already detected the reference and probed the video; neither is done again."""
    from posegen_cli.video.framing import frame_to_model

    kwargs = {"from_keypoints": extracted.keypoints, "align_to": reference_image_path, "use_cache": False, "reporter": quiet()}
    detected = extract_pose(moving_clip, tmp_path / "detected", **kwargs)
    person = extract_reference_pose(frame_to_model(load_image(reference_image_path)), "mediapipe")
    info = probe_video(moving_clip)

    def refuse(*args, **kwargs):
        raise AssertionError("given, so not computed again")

    monkeypatch.setattr(extract_module, "extract_reference_pose", refuse)
    monkeypatch.setattr(extract_module, "probe_video", refuse)
    given = extract_pose(moving_clip, tmp_path / "given", info=info, reference_pose=person, **kwargs)
    assert given.alignment == detected.alignment
    assert load_npz(given.aligned_keypoints).keypoints.tolist() == load_npz(detected.aligned_keypoints).keypoints.tolist()


def test_align_to_checks_its_inputs(moving_clip, tmp_path):
    with pytest.raises(InputError, match="reference image .*not found"):
        extract_pose(moving_clip, tmp_path / "o", align_to=tmp_path / "missing.png", reporter=quiet())
    photo = tmp_path / "p.png"
    cv2.imwrite(str(photo), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="--align 'bones'"):
        extract_pose(moving_clip, tmp_path / "o", align_to=photo, align="bones", reporter=quiet())


def test_align_to_frames_the_hand_video_too(extracted, moving_clip, reference_image_path, tmp_path, monkeypatch):
    from posegen_cli.video.framing import frame_to_model
    from posegen_cli.pose.render import render_hand_normals

    monkeypatch.setattr(stream_module, "make_normal_backend", lambda **kwargs: StripeNormals())
    result = extract_pose(
        moving_clip, tmp_path / "o", from_keypoints=extracted.keypoints, hand_normals="sapiens", align_to=reference_image_path,
        align="none", lossless=True, reporter=quiet(),
    )  # fmt: skip
    expected = StripeNormals().normals_and_segmentation([np.zeros((640, 360, 3))] * 20)
    for t, frame in enumerate(iter_frames(result.hand_video)):
        assert np.array_equal(frame, frame_to_model(render_hand_normals(*expected[t]))), f"frame {t}"

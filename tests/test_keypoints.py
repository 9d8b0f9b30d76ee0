"""Keypoint files (npz, OpenPose JSON) and the per-frame person choice."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from posegen_cli.errors import InputError
from posegen_cli.pose.keypoints import (
    KeypointTrack,
    PersonFollower,
    box_from_points,
    box_iou,
    load_keypoints,
    load_npz,
    person_from_openpose,
    person_to_openpose,
    read_openpose_frame,
    save_npz,
    select_person,
    write_openpose_json,
)
from posegen_cli.pose.types import PersonPose


def person(box: tuple[float, float, float, float], score: float, marker: float = 0.0) -> PersonPose:
    kp = np.full((133, 2), marker, np.float32)
    return PersonPose(keypoints=kp, scores=np.full(133, 0.9, np.float32), box=np.array(box, np.float32), box_score=score)


def random_track(frames: int = 4, seed: int = 0) -> KeypointTrack:
    rng = np.random.default_rng(seed)
    kp = rng.uniform(-20, 740, (frames, 133, 2)).astype(np.float32)
    sc = rng.uniform(0.01, 1.0, (frames, 133)).astype(np.float32)
    sc[1] = 0.0  # nobody in frame 1
    return KeypointTrack(kp, sc, Fraction(30000, 1001), 720, 1280, "mediapipe")


# --- person choice -------------------------------------------------------------------------------


def test_box_iou_hand_computed():
    a = np.array([0, 0, 10, 10], np.float32)
    assert box_iou(a, a) == pytest.approx(1.0)
    assert box_iou(a, np.array([5, 0, 15, 10])) == pytest.approx(50 / 150)
    assert box_iou(a, np.array([2, 2, 4, 4])) == pytest.approx(4 / 100)
    assert box_iou(a, np.array([10, 0, 20, 10])) == 0.0  # touching edges
    assert box_iou(np.zeros(4), np.zeros(4)) == 0.0  # empty boxes


def test_select_person_takes_highest_box_score_like_the_release():
    people = [person((0, 0, 10, 10), 0.5, 1), person((50, 50, 60, 60), 0.9, 2), person((20, 20, 30, 30), 0.7, 3)]
    assert select_person(people).keypoints[0, 0] == 2
    assert select_person([]) is None


def test_select_person_tracks_by_overlap_and_falls_back_when_lost():
    people = [person((0, 0, 10, 10), 0.5, 1), person((50, 50, 60, 60), 0.9, 2)]
    assert select_person(people, np.array([1, 1, 11, 11]), track=True).keypoints[0, 0] == 1
    # without --track the previous box is ignored
    assert select_person(people, np.array([1, 1, 11, 11]), track=False).keypoints[0, 0] == 2
    # no overlap with anyone: back to the highest score
    assert select_person(people, np.array([200, 200, 210, 210]), track=True).keypoints[0, 0] == 2


def test_follower_keeps_the_same_person_when_scores_swap():
    frames = [
        [person((0, 0, 10, 10), 0.9, 1), person((50, 0, 60, 10), 0.8, 2)],
        [person((52, 0, 62, 10), 0.95, 2), person((1, 0, 11, 10), 0.6, 1)],
        [],  # nobody: the tracker keeps its last box
        [person((54, 0, 64, 10), 0.99, 2), person((2, 0, 12, 10), 0.5, 1)],
    ]
    tracked = PersonFollower(track=True)
    picks = [tracked.pick(f) for f in frames]
    assert [p.keypoints[0, 0] if p else None for p in picks] == [1, 1, None, 1]
    plain = PersonFollower(track=False)
    assert [p.keypoints[0, 0] if p else None for p in map(plain.pick, frames)] == [1, 2, None, 2]


def test_box_from_points_ignores_zero_scores():
    kp = np.zeros((133, 2), np.float32)
    sc = np.zeros(133, np.float32)
    kp[3], kp[7], kp[9] = (10, 40), (30, 5), (999, 999)
    sc[3], sc[7] = 0.2, 0.9
    assert box_from_points(kp, sc).tolist() == [10, 5, 30, 40]
    assert box_from_points(kp, np.zeros(133, np.float32)).tolist() == [0, 0, 0, 0]


# --- npz -----------------------------------------------------------------------------------------


def test_npz_round_trip_is_exact(tmp_path):
    track = random_track()
    path = save_npz(track, tmp_path / "keypoints.npz")
    with np.load(path) as raw:
        assert {"keypoints", "scores", "fps", "width", "height", "backend"} <= set(raw.files)
        assert raw["keypoints"].dtype == np.float64 and raw["keypoints"].shape == (4, 133, 2)
        assert raw["scores"].dtype == np.float64 and raw["scores"].shape == (4, 133)
        assert float(raw["fps"]) == pytest.approx(29.97002997)
    back = load_npz(path)
    assert np.array_equal(back.keypoints, track.keypoints) and np.array_equal(back.scores, track.scores)
    assert back.fps == Fraction(30000, 1001)
    assert (back.width, back.height, back.backend) == (720, 1280, "mediapipe")
    assert back.frames_without_person() == 1
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_track_keeps_float64_like_the_release_pickle(tmp_path):
    # float32 would turn 99.999999 into 100.0 (one pixel further right once truncated) and 0.7 into 0.69999998.
    kp = np.zeros((1, 133, 2))
    sc = np.zeros((1, 133))
    kp[0, 0], sc[0, 0] = (99.999999, 20.0), 0.7
    back = load_npz(save_npz(KeypointTrack(kp, sc, Fraction(30), 200, 40, "sapiens"), tmp_path / "k.npz"))
    assert back.keypoints[0, 0, 0] == 99.999999 and back.scores[0, 0] == 0.7
    folder = write_openpose_json(back, tmp_path / "openpose")
    again = load_keypoints(folder, fps=Fraction(30), width=200, height=40)
    assert again.keypoints[0, 0, 0] == 99.999999 and again.scores[0, 0] == 0.7


def test_npz_errors_name_the_file(tmp_path):
    bad = tmp_path / "other.npz"
    np.savez(bad, keypoints=np.zeros((1, 133, 2)))
    with pytest.raises(InputError, match="other.npz lacks scores"):
        load_npz(bad)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="junk.npz"):
        load_npz(junk)
    # a download or copy cut short: zipfile's BadZipFile, not an OSError or ValueError
    whole = save_npz(random_track(), tmp_path / "whole.npz").read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="cannot read keypoints from .*truncated.npz"):
        load_npz(truncated)


def test_track_shape_is_checked():
    with pytest.raises(ValueError, match="133"):
        KeypointTrack(np.zeros((2, 17, 2)), np.zeros((2, 17)), Fraction(30), 10, 10, "x")


# --- OpenPose JSON -------------------------------------------------------------------------------


def test_openpose_entry_layout():
    kp = np.zeros((133, 2), np.float32)
    sc = np.zeros(133, np.float32)
    kp[0], sc[0] = (100, 50), 0.9  # nose
    kp[5], sc[5] = (140, 120), 0.8  # left shoulder
    kp[6], sc[6] = (60, 120), 0.6  # right shoulder
    kp[11], sc[11] = (130, 300), 0.5  # left hip
    kp[12], sc[12] = (70, 300), 0.7  # right hip
    kp[17], sc[17] = (150, 600), 0.4  # left big toe
    kp[22], sc[22] = (50, 610), 0.3  # right heel
    kp[23], sc[23] = (80, 40), 0.2  # face-0
    kp[91], sc[91] = (200, 350), 0.95  # left hand root
    kp[132], sc[132] = (10, 360), 0.85  # right pinky tip
    entry = person_to_openpose(kp, sc)
    body = np.array(entry["pose_keypoints_2d"]).reshape(25, 3)
    face = np.array(entry["face_keypoints_2d"]).reshape(70, 3)
    left = np.array(entry["hand_left_keypoints_2d"]).reshape(21, 3)
    right = np.array(entry["hand_right_keypoints_2d"]).reshape(21, 3)
    np.testing.assert_allclose(body[0], (100, 50, 0.9), rtol=1e-6)
    np.testing.assert_allclose(body[1], (100, 120, 0.7), rtol=1e-6)  # neck = mean of shoulders
    np.testing.assert_allclose(body[2], (60, 120, 0.6), rtol=1e-6)  # BODY_25 2 = right shoulder
    np.testing.assert_allclose(body[5], (140, 120, 0.8), rtol=1e-6)
    np.testing.assert_allclose(body[8], (100, 300, 0.6), rtol=1e-6)  # mid-hip
    np.testing.assert_allclose(body[9], (70, 300, 0.7), rtol=1e-6)  # right hip
    np.testing.assert_allclose(body[12], (130, 300, 0.5), rtol=1e-6)
    np.testing.assert_allclose(body[19], (150, 600, 0.4), rtol=1e-6)  # left big toe
    np.testing.assert_allclose(body[24], (50, 610, 0.3), rtol=1e-6)  # right heel
    np.testing.assert_allclose(face[0], (80, 40, 0.2), rtol=1e-6)
    assert not face[68:].any()  # pupils: no COCO counterpart
    np.testing.assert_allclose(left[0], (200, 350, 0.95), rtol=1e-6)
    np.testing.assert_allclose(right[20], (10, 360, 0.85), rtol=1e-6)


def test_openpose_folder_round_trip_is_exact(tmp_path):
    track = random_track(frames=3)
    folder = write_openpose_json(track, tmp_path / "openpose")
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"frame_{i:012d}_keypoints.json" for i in range(3)]
    assert json.loads(files[1].read_text())["people"] == []
    back = load_keypoints(folder, fps=Fraction(25), width=720, height=1280)
    assert np.array_equal(back.keypoints[[0, 2]], track.keypoints[[0, 2]])
    assert np.array_equal(back.scores, track.scores)
    assert not back.keypoints[1].any()
    assert (back.fps, back.width, back.backend) == (Fraction(25), 720, "openpose-json")


def test_openpose_coco18_body_and_frame_order(tmp_path):
    for index in (10, 2):  # "2" must sort before "10"
        body = np.zeros((18, 3))
        body[2] = (index, 20, 0.9)  # COCO-18 index 2 = right shoulder
        body[13] = (5, index, 0.8)  # left ankle
        (tmp_path / f"clip_{index}_keypoints.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": body.ravel().tolist()}]}))
    track = load_keypoints(tmp_path, fps=Fraction(30), width=64, height=64)
    assert track.keypoints[:, 6, 0].tolist() == [2, 10]
    assert track.keypoints[:, 15, 1].tolist() == [2, 10]
    assert track.scores[0, 6] == pytest.approx(0.9) and track.scores[0, 15] == pytest.approx(0.8)
    assert track.scores[0, 91:].sum() == 0


def test_openpose_picks_the_most_confident_person(tmp_path):
    low = np.zeros((25, 3))
    low[0] = (1, 1, 0.2)
    high = np.zeros((25, 3))
    high[0] = (9, 9, 0.9)
    path = tmp_path / "f_0.json"
    path.write_text(json.dumps({"people": [{"pose_keypoints_2d": low.ravel().tolist()}, {"pose_keypoints_2d": high.ravel().tolist()}]}))
    people = read_openpose_frame(path)
    assert people[0].keypoints[0].tolist() == [9, 9]
    assert load_keypoints(path, fps=Fraction(30), width=20, height=20).keypoints[0, 0].tolist() == [9, 9]


def test_openpose_errors(tmp_path):
    with pytest.raises(InputError, match="pose_keypoints_2d has 6 numbers"):
        person_from_openpose({"pose_keypoints_2d": [0.0] * 6}, tmp_path / "a.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InputError, match="broken.json"):
        read_openpose_frame(broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"frames": []}))
    with pytest.raises(InputError, match='no "people" list'):
        read_openpose_frame(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no .json files"):
        load_keypoints(empty, fps=Fraction(30), width=1, height=1)
    with pytest.raises(InputError, match="not found"):
        load_keypoints(tmp_path / "missing.npz", fps=Fraction(30), width=1, height=1)

"""Real-world people (issue 16): several people, off-centre and transparent references, partial bodies."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
from rich.console import Console

from posegen_cli.errors import InputError
from posegen_cli.pose import extract as extract_module
from posegen_cli.pose import stream as stream_module
from posegen_cli.pose.align import fit_alignment, frames_outside_canvas
from posegen_cli.pose.extract import ExtractResult, reference_framing
from posegen_cli.pose.keypoints import PersonChoice, PersonFollower, identity_switches, load_npz, parse_person
from posegen_cli.pose.mediapipe_backend import MediaPipePoseBackend
from posegen_cli.pose.reference import CENTRE, PERSON, UNCHECKED
from posegen_cli.pose.settings import PoseOptions
from posegen_cli.pose.types import PersonPose
from posegen_cli.report import Reporter
from posegen_cli.video import load_image, parse_color, read_image, write_video
from posegen_cli.video.framing import crop_box_9x16, frame_to_model, frame_with_box, person_crop_box

HALF = (180, 320)  # W, H of one person in the two-person clip


def extract_pose(video: Path, out_dir: Path | None = None, **kwargs) -> ExtractResult:
    """``extract_module.extract_pose`` with the :class:`PoseOptions` fields given as keywords beside its own."""
    fields = {f.name for f in dataclasses.fields(PoseOptions)}
    options = PoseOptions(**{k: v for k, v in kwargs.items() if k in fields})
    return extract_module.extract_pose(video, out_dir, options, **{k: v for k, v in kwargs.items() if k not in fields})


def capture() -> tuple[Reporter, io.StringIO]:
    out = io.StringIO()
    return Reporter(console=Console(file=out, width=400)), out


@pytest.fixture(scope="module")
def photo(reference_image_path: Path) -> np.ndarray:
    return load_image(reference_image_path)


# --- several people ------------------------------------------------------------------------------


def box_person(x1: float, x2: float, score: float = 0.9) -> PersonPose:
    kp = np.zeros((133, 2))
    kp[:, 0], kp[:, 1] = np.tile(np.linspace(x1, x2, 23), 6)[:133], np.tile(np.linspace(10, 90, 23), 6)[:133]
    return PersonPose(kp, np.full(133, 0.9), np.array([x1, 10, x2, 90], np.float32), score)


def test_person_choice_rule() -> None:
    small_left, large_right = box_person(0, 20, 0.99), box_person(50, 90, 0.5)
    assert PersonFollower().pick([small_left, large_right]) is large_right  # the largest, whatever its score
    assert PersonFollower(choice=parse_person("1")).pick([large_right, small_left]) is small_left  # left to right
    assert PersonFollower(choice=parse_person("10,50")).pick([small_left, large_right]) is small_left
    assert PersonFollower(choice=parse_person("45,50")).pick([small_left, large_right]) is large_right  # nearest centre
    with pytest.raises(InputError, match="--person 3: frame 0, the first with anyone in it, shows 2 people"):
        PersonFollower(choice=PersonChoice(index=3)).pick([small_left, large_right])
    for bad in ("0", "left", "1,2,3"):
        with pytest.raises(InputError, match="--person"):
            parse_person(bad)


def test_identity_switches_are_found_where_the_body_jumps() -> None:
    frames = [box_person(0, 20)] * 5 + [box_person(1, 21)] * 3 + [box_person(60, 80)] * 4
    kp = np.stack([p.keypoints for p in frames])
    sc = np.stack([p.scores for p in frames])
    sc[3] = 0  # nobody in frame 3: skipped, not a switch
    assert identity_switches(kp, sc) == [8]


class SideBySide:
    """A multi-person stand-in built from real MediaPipe: one detection per half of the frame.

    ``only`` keeps one person per frame (as MediaPipe does), the left half before ``switch_at`` and the
    right half from there: the identity switch the issue saw.
    """

    name = "mediapipe"

    def __init__(self, switch_at: int | None = None) -> None:
        self.backend = MediaPipePoseBackend(static_image_mode=True)
        self.switch_at = switch_at
        self.frame = 0

    def detect(self, frames: list[np.ndarray]) -> list[list[PersonPose]]:
        out = []
        for frame in frames:
            half = frame.shape[1] // 2
            people = []
            for x0 in (0, half):
                for p in self.backend.detect([np.ascontiguousarray(frame[:, x0 : x0 + half])])[0]:  # (360, 180): one person
                    people.append(PersonPose(p.keypoints + (x0, 0), p.scores, p.box + np.float32([x0, 0, x0, 0]), p.box_score))
            if self.switch_at is not None:
                people = people[:1] if self.frame < self.switch_at else people[1:]
            self.frame += 1
            out.append(sorted(people, key=lambda p: -p.box_score))
        return out

    def close(self) -> None:
        self.backend.close()


@pytest.fixture(scope="module")
def two_dancers(tmp_path_factory: pytest.TempPathFactory, photo: np.ndarray) -> Path:
    """Two copies of the reference side by side in the lower half of a 9:16 frame, the left one a little larger
    (nearer the camera), 12 frames."""
    big = cv2.resize(photo, HALF, interpolation=cv2.INTER_AREA)
    small = cv2.resize(photo, (150, 267), interpolation=cv2.INTER_AREA)
    frames = []
    for i in range(12):
        frame = np.full((2 * HALF[1], 2 * HALF[0], 3), 200, np.uint8)
        frame[HALF[1] :, :180] = np.roll(big, i - 6, axis=1)
        frame[2 * HALF[1] - 267 :, 195:345] = small
        frames.append(frame)
    return write_video(tmp_path_factory.mktemp("dancers") / "dancers.mp4", frames, 12, lossless=True)


@pytest.mark.parametrize(("person", "side"), [(None, "left"), ("2", "right"), ("270,200", "right")])
def test_one_person_is_followed_for_the_whole_clip(two_dancers, tmp_path, monkeypatch, person, side) -> None:
    monkeypatch.setattr(stream_module, "make_pose_backend", lambda *args, **kwargs: SideBySide())
    reporter, text = capture()
    result = extract_pose(two_dancers, tmp_path / "o", backend="mediapipe", person=person, use_cache=False, reporter=reporter)
    noses = load_npz(result.keypoints).keypoints[:, 0, 0]
    assert ((noses < HALF[0]) if side == "left" else (noses > HALF[0])).all()
    assert result.people_seen == 2 and result.identity_switches == ()
    assert "2 people in frame 0 (left to right: 1 at x=" in text.getvalue()
    assert result.summary()["people_seen"] == 2


def driving_only(stand_in: SideBySide):
    """``make_pose_backend`` giving the stand-in for the video and real MediaPipe for the reference photo."""
    return lambda *args, static=False, **kwargs: MediaPipePoseBackend(static_image_mode=True) if static else stand_in


def test_identity_switch_and_off_canvas_frames_are_reported(two_dancers, tmp_path, monkeypatch, reference_image_path) -> None:
    monkeypatch.setattr(stream_module, "make_pose_backend", driving_only(SideBySide(switch_at=8)))
    reporter, text = capture()
    result = extract_pose(
        two_dancers, tmp_path / "o", backend="mediapipe", align_to=reference_image_path, use_cache=False, reporter=reporter
    )
    messages = " ".join(text.getvalue().split())
    assert result.identity_switches == (8,) and result.people_seen == 2
    assert "the followed person seems to change at frame(s) 8 of dancers.mp4" in messages
    assert "MediaPipe follows one person at a time" in messages
    # alignment fits the left dancer (8 of 12 frames); the same move puts the right one off the canvas
    assert result.frames_outside_canvas == (8, 9, 10, 11)
    assert "the aligned pose is mostly outside the 720x1280 canvas in frame(s) 8-11 (4 of 12;" in messages
    aligned = load_npz(result.aligned_keypoints)
    assert frames_outside_canvas(aligned.keypoints, aligned.scores, 720, 1280) == [8, 9, 10, 11]


# --- off-centre and landscape references ---------------------------------------------------------


def test_person_crop_rule() -> None:
    # the person in the right third of a 1920x1080 photo: the centre crop's size, moved onto them
    assert crop_box_9x16(1920, 1080) == (656, 0, 608, 1080)
    assert person_crop_box(1920, 1080, np.array([1400, 200, 1600, 1000])) == (1196, 0, 608, 1080)
    # at the photo's edge: kept inside the photo
    assert person_crop_box(1920, 1080, np.array([1800, 200, 1900, 1000])) == (1312, 0, 608, 1080)
    # wider than the crop (arms out): grown to hold them at 9:16, padded above and below
    x0, y0, w, h = person_crop_box(1920, 1080, np.array([500, 100, 1300, 1000]))
    assert (w, h) == (round(h * 9 / 16), h) and w >= 800 + 2 * 0.08 * 900 - 1 and y0 < 0 < y0 + h - 1080
    framed = frame_with_box(np.zeros((1080, 1920, 3), np.uint8), (x0, y0, w, h), (1280, 720), fill=(0, 255, 0))
    assert framed[0, 360].tolist() == [0, 255, 0] and framed[640, 360].tolist() == [0, 0, 0]
    photo = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), np.uint8)
    assert np.array_equal(frame_with_box(photo, crop_box_9x16(1920, 1080)), frame_to_model(photo))


@pytest.fixture(scope="module")
def landscape(photo: np.ndarray) -> np.ndarray:
    """A 1138x640 landscape photo with the person in its right third."""
    canvas = np.full((640, 1138, 3), 90, np.uint8)
    canvas[:, 738:1098] = cv2.resize(photo, (360, 640), interpolation=cv2.INTER_AREA)
    return canvas


def test_landscape_reference_is_framed_around_the_person(landscape: np.ndarray, tmp_path: Path, monkeypatch) -> None:
    framing = reference_framing(landscape, "mediapipe")
    assert framing.rule == PERSON and framing.person is not None
    x0, y0, w, h = framing.box
    assert (w, h, y0) == (360, 640, 0) and abs(x0 - 738) <= 12  # the release's centre crop would start at 389
    assert abs(framing.person.keypoints[0, 0] - 360) < 40  # the nose is near the canvas's middle
    photo_png = tmp_path / "landscape.png"
    cv2.imwrite(str(photo_png), cv2.cvtColor(landscape, cv2.COLOR_RGB2BGR))
    clip = write_video(tmp_path / "d.mp4", [cv2.resize(landscape[:, 738:1098], (180, 320))] * 3, 12, lossless=True)
    result = extract_pose(clip, tmp_path / "o", backend="mediapipe", align_to=photo_png, use_cache=False, reporter=capture()[0])
    assert result.reference_framing == {"rule": PERSON, "box": list(framing.box)}
    panel = cv2.cvtColor(cv2.imread(str(result.alignment_png)), cv2.COLOR_BGR2RGB)[40:, :360].astype(int)
    framed = cv2.resize(framing.frame(landscape), (360, 640), interpolation=cv2.INTER_AREA)[40:].astype(int)
    centre = cv2.resize(frame_to_model(landscape), (360, 640), interpolation=cv2.INTER_AREA)[40:].astype(int)
    assert np.median(np.abs(panel - framed)) < np.median(np.abs(panel - centre)) / 4  # alignment.png shows the framed one


def test_centred_reference_keeps_the_release_crop(photo: np.ndarray) -> None:
    framing = reference_framing(photo, "mediapipe")
    assert framing.rule == CENTRE and framing.box == crop_box_9x16(720, 1280)
    assert np.array_equal(framing.frame(photo), frame_to_model(photo))


def test_reference_without_a_person_is_refused(tmp_path: Path) -> None:
    empty = np.full((640, 1138, 3), 90, np.uint8)
    with pytest.raises(InputError, match=r"no person found in empty.png .*--no-person-check") as info:
        reference_framing(empty, "mediapipe", name="empty.png")
    assert info.value.exit_code == 2
    assert reference_framing(empty, "mediapipe", person_check=False).rule == UNCHECKED


def test_cli_refuses_a_reference_without_a_person_and_the_advice_works(tmp_path: Path, photo: np.ndarray) -> None:
    empty = tmp_path / "empty.png"
    cv2.imwrite(str(empty), np.full((640, 1138, 3), 90, np.uint8))
    clip = write_video(tmp_path / "c.mp4", [cv2.resize(photo, HALF, interpolation=cv2.INTER_AREA)] * 2, 12)
    run = [
        sys.executable,
        "-c",
        "from posegen_cli.cli import run; run()",
        "extract-pose",
        str(clip),
        "--backend",
        "mediapipe",
        "--no-cache",
    ]
    refused = subprocess.run([*run, "-o", str(tmp_path / "a"), "--align-to", str(empty)], capture_output=True, text=True, check=False)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and lines[-1].startswith("error: no person found in") and "--no-person-check" in lines[-1]
    assert not (tmp_path / "a").exists()
    forced = subprocess.run(
        [*run, "-o", str(tmp_path / "b"), "--align-to", str(empty), "--no-person-check"], capture_output=True, text=True, check=False
    )
    assert forced.returncode == 0, forced.stderr
    assert "going on because of --no-person-check" in " ".join(forced.stderr.split()) and (tmp_path / "b" / "pose.mp4").is_file()


def test_person_needs_tracking(two_dancers: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--no-track follows nobody"):
        extract_pose(two_dancers, tmp_path / "o", backend="mediapipe", track=False, person="2", reporter=capture()[0])


# --- partial bodies with MediaPipe ---------------------------------------------------------------


def partial_views(photo: np.ndarray) -> dict[str, np.ndarray]:
    """Upper-body views of the reference at 360x640: lower half blacked out, letterboxed, cropped at the waist."""
    small = cv2.resize(photo, (360, 640), interpolation=cv2.INTER_AREA)
    cut = small.copy()
    cut[320:] = 0
    letterbox = np.zeros_like(small)
    letterbox[160:480] = small[:320]
    waist = cv2.resize(small[:330], (360, 330), interpolation=cv2.INTER_AREA)
    return {"lower half cut away": cut, "letterboxed": letterbox, "cropped at the waist": waist}


@pytest.mark.parametrize("view", ["lower half cut away", "letterboxed", "cropped at the waist"])
def test_mediapipe_drops_points_it_does_not_see(photo: np.ndarray, tmp_path: Path, view: str) -> None:
    frame = partial_views(photo)[view]
    clip = write_video(tmp_path / "v.mp4", [frame] * 4, 12, lossless=True)
    result = extract_pose(clip, tmp_path / "o", backend="mediapipe", lossless=True, use_cache=False, reporter=capture()[0])
    track = load_npz(result.keypoints)
    assert track.scores[:, [0, 5, 6]].min() > 0.5  # head and shoulders are found ...
    assert not track.scores[:, 13:23].any()  # ... knees, ankles and feet are not there: score 0, not drawn
    seen = track.scores > 0
    pts = track.keypoints[seen]
    assert (pts[:, 0] >= 0).all() and (pts[:, 0] < frame.shape[1]).all() and (pts[:, 1] >= 0).all() and (pts[:, 1] < frame.shape[0]).all()
    if view == "letterboxed":  # nothing drawn in the black bars
        assert ((pts[:, 1] >= 160) & (pts[:, 1] < 480)).all()


def test_drop_unseen_zeroes_off_frame_and_guessed_points() -> None:
    from posegen_cli.pose.mediapipe_backend import drop_unseen

    kp = np.full((133, 2), 50.0, np.float32)
    sc = np.full(133, 0.9, np.float32)
    kp[15], kp[16] = (50, 130), (-1, 50)  # ankles below and left of a 100x120 frame
    sc[13] = 0.49  # a knee MediaPipe barely sees (guessed)
    kp[100] = (100, 10)  # one finger tip past the right edge (x = width is outside)
    out = drop_unseen(kp, sc, 100, 120)
    assert out[[13, 15, 16, 100]].tolist() == [0, 0, 0, 0]
    assert (np.delete(out, [13, 15, 16, 100]) == np.float32(0.9)).all()
    sc[110] = 0.3  # hand points keep their handedness score, however low: only the frame limits them
    assert drop_unseen(kp, sc, 100, 120)[110] == np.float32(0.3)


def _standing(hip_score: float, shift: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    kp = np.zeros((133, 2))
    sc = np.zeros(133)
    points = {0: (360, 300), 3: (380, 290), 4: (340, 290), 5: (430, 420), 6: (290, 420), 7: (450, 560), 8: (270, 560),
              9: (460, 680), 10: (260, 680), 11: (410, 760), 12: (310, 760)}  # fmt: skip
    for i, (x, y) in points.items():
        kp[i] = (x + shift[0], y + shift[1])
        sc[i] = hip_score if i in (11, 12) else 0.95
    return kp, sc


def test_alignment_anchors_only_on_confident_scale_parts() -> None:
    """Half-body driving clip, hips at the bottom edge with scores 0.15-0.35: anchor on the neck, not the hips."""
    ref_kp, ref_sc = _standing(0.95)
    reference = PersonPose(ref_kp, ref_sc, np.zeros(4, np.float32), 0.9)
    frames = [_standing(s, (-50.0, -30.0)) for s in (0.15, 0.35, 0.15, 0.35, 0.15, 0.35, 0.15, 0.15)]
    kp = np.stack([f[0] for f in frames])
    sc = np.stack([f[1] for f in frames])
    kp[:, [11, 12], 1] += 60  # the guessed hips sit lower than the real ones would
    alignment = fit_alignment(reference, kp, sc, "auto")
    assert "torso" in alignment.matched and alignment.anchors == ("neck", "neck")
    assert alignment.skipped_anchors == ("hip_centre",)
    assert alignment.summary()["align_anchors_skipped"] == ["hip_centre"]
    neck = (kp[0, 5] + kp[0, 6]) / 2 * alignment.scale + alignment.translation
    assert neck == pytest.approx((360, 420), abs=1e-6)  # on the reference's shoulders, not ~66 px away
    confident = fit_alignment(reference, *(np.stack(a) for a in zip(*[_standing(0.9, (-50.0, -30.0))] * 8)), "auto")
    assert confident.anchors == ("hip_centre", "hip_centre") and confident.skipped_anchors == ()


# --- transparent references ----------------------------------------------------------------------


def test_transparent_reference_is_composited_onto_the_background(tmp_path: Path, photo: np.ndarray) -> None:
    bgr = cv2.cvtColor(cv2.resize(photo, (90, 160)), cv2.COLOR_RGB2BGR)
    alpha = np.zeros((160, 90), np.uint8)
    alpha[20:140, 20:70] = 255
    alpha[0:10] = 128
    rgba = np.dstack([bgr, alpha])
    rgba[alpha == 0, :3] = 0  # what editors store under transparent pixels: black
    path = tmp_path / "cutout.png"
    cv2.imwrite(str(path), rgba)
    loaded = read_image(path)
    assert loaded.transparent
    assert loaded.pixels[150, 5].tolist() == [255, 255, 255]  # transparent: white
    assert loaded.pixels[80, 45].tolist() == photo_pixel(bgr, 80, 45)  # opaque: unchanged
    half = np.round(bgr[5, 5].astype(np.float32) * (128 / 255) + 255 * (127 / 255)).astype(int)[::-1]
    assert loaded.pixels[5, 5].tolist() == half.tolist()
    assert read_image(path, parse_color("green")).pixels[150, 5].tolist() == [0, 255, 0]
    opaque = tmp_path / "opaque.png"
    cv2.imwrite(str(opaque), bgr)
    plain = read_image(opaque)
    assert not plain.transparent and np.array_equal(plain.pixels, cv2.cvtColor(cv2.imread(str(opaque)), cv2.COLOR_BGR2RGB))


def photo_pixel(bgr: np.ndarray, y: int, x: int) -> list[int]:
    return bgr[y, x, ::-1].tolist()


def test_parse_color() -> None:
    assert parse_color("white") == (255, 255, 255) and parse_color("#00ff7f") == (0, 255, 127) and parse_color("10, 20,30") == (10, 20, 30)
    for bad in ("teal", "#12345", "300,0,0"):
        with pytest.raises(InputError, match="--background"):
            parse_color(bad)


def test_animate_summary_says_the_reference_was_composited(tmp_path: Path, photo: np.ndarray) -> None:
    from posegen_cli.longvideo.engine import prepare_reference
    from posegen_cli.longvideo.options import AnimateOptions
    from posegen_cli.video.image import ReferenceImage

    rgba = np.dstack([cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), np.full(photo.shape[:2], 255, np.uint8)])
    rgba[:, :100, 3] = 0
    path = tmp_path / "cutout.png"
    cv2.imwrite(str(path), rgba)
    reporter, text = capture()
    options = AnimateOptions(pose_backend="mediapipe", background="black", device="cpu")
    image = ReferenceImage.load(path, background=parse_color(options.background))
    framing, notes = prepare_reference(image, options, (1280, 720), reporter)
    assert image.pixels[0, 0].tolist() == [0, 0, 0] and framing.fill == (0, 0, 0)
    assert notes["reference_background"] == "black" and notes["reference_framing"]["rule"] == CENTRE
    assert "cutout.png is transparent: composited onto black" in text.getvalue()


def test_summary_is_json_serialisable(two_dancers, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(stream_module, "make_pose_backend", lambda *args, **kwargs: SideBySide(switch_at=8))
    result = extract_pose(two_dancers, tmp_path / "o", backend="mediapipe", use_cache=False, reporter=capture()[0])
    data = json.loads(json.dumps(result.summary()))
    assert data["identity_switches"] == [8] and data["people_seen"] == 2 and Fraction(data["fps"]) == 12

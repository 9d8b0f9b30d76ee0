"""``animate --pose-video`` (own condition videos, used as they are) and ``--camera`` end to end on tiny models."""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from animate_inputs import TEST_OPTIONS, write_tone
from typer.testing import CliRunner

from posegen_cli.cli import app
from posegen_cli.errors import InputError
from posegen_cli.longvideo import AnimateOptions, animate
from posegen_cli.longvideo.engine import check_hand_video
from posegen_cli.longvideo.plan import plan_segments, segment_frame_indices
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline
from posegen_cli.pose import backends as backends_module
from posegen_cli.pose import extract as extract_module
from posegen_cli.pose.camera import CameraMotion, camera_pattern
from posegen_cli.report import Reporter
from posegen_cli.video import VideoInfo, iter_frames, probe_video, write_video
from posegen_cli.video.framing import frame_to_model

torch.set_num_threads(1)
FRAMES, FPS = 20, 10
SOURCE_SIZE = (128, 72)
"""(height, width) of the condition videos: 9:16, framed down to the tiny run's 64x112."""


def condition_frames(seed: int) -> list[np.ndarray]:
    """A made-up 'skeleton' of any shape: coloured bars that move, on black."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(64, 256, (4, 3))
    out = []
    for i in range(FRAMES):
        frame = np.zeros((*SOURCE_SIZE, 3), np.uint8)
        for k, colour in enumerate(colours):
            y = 20 + 25 * k
            frame[y : y + 6, 5 + 2 * i : 40 + 2 * i] = colour
        out.append(frame)
    return out


@pytest.fixture(scope="module")
def condition_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("conditions")
    tone = write_tone(folder / "tone.wav", FRAMES / FPS + 0.5)
    return {
        "pose_with_audio": write_video(folder / "pose.mp4", condition_frames(1), FPS, lossless=True, audio_from=tone),
        "pose": write_video(folder / "pose-silent.mp4", condition_frames(1), FPS, lossless=True),
        "hand": write_video(folder / "hand.mp4", condition_frames(2), FPS, lossless=True),
        "tone": tone,
    }


def recorded_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every segment call of the pipeline, with its keyword arguments."""
    calls: list[dict[str, Any]] = []
    real: Callable[..., np.ndarray] = PoseGenPipeline.__call__

    def call(self: PoseGenPipeline, **kwargs: Any) -> np.ndarray:
        calls.append(kwargs)
        return real(self, **kwargs)

    monkeypatch.setattr(PoseGenPipeline, "__call__", call)
    return calls


def no_extraction(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("given condition videos must not be extracted")

    monkeypatch.setattr(extract_module, "extract_pose", fail)
    monkeypatch.setattr(backends_module, "extract_reference_pose", fail)


def test_pose_video_without_a_driving_video(
    tmp_path: Path, reference_image_path: Path, tiny_models: Path, condition_videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    no_extraction(monkeypatch)
    calls = recorded_calls(monkeypatch)
    pose_video = condition_videos["pose_with_audio"]
    output = tmp_path / "own.mp4"
    options = AnimateOptions(**TEST_OPTIONS, models_dir=tiny_models, shot="half-body", pose_video=pose_video)
    result = animate(reference_image_path, None, output, options=options, reporter=Reporter(quiet=True))

    info = probe_video(output)
    assert (info.frame_count, info.fps, info.has_audio) == (FRAMES, Fraction(FPS), True)
    assert (info.width, info.height) == (64, 112) and result.audio
    assert "no extraction, no alignment" in result.summary()["conditions"] and "black hands" in result.summary()["conditions"]
    # each segment got the pose video's frames as they are, framed like any render, and black hands; both branches alike
    framed = frame_to_model(np.stack(list(iter_frames(pose_video))), (112, 64))
    plan = plan_segments(FRAMES, 13, 5, 4)
    assert len(calls) == len(plan) == 3
    for seg, call in zip(plan, calls):
        np.testing.assert_array_equal(call["pose_frames"], framed[segment_frame_indices(seg, FRAMES)])
        assert call["hand_frames"].shape == (13, 112, 64, 3) and not call["hand_frames"].any()
        assert call["negative_pose_frames"] is None and call["negative_hand_frames"] is None
    assert calls[1]["kv_share"] is not None  # the other base replays the anchor's K/V, as with a driving video
    assert not (tmp_path / "own.camera.mp4").exists()


def test_camera_goes_to_the_negative_branch_only(
    tmp_path: Path, reference_image_path: Path, tiny_models: Path, condition_videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    no_extraction(monkeypatch)
    calls = recorded_calls(monkeypatch)
    output = tmp_path / "pan.mp4"
    options = AnimateOptions(
        **TEST_OPTIONS, models_dir=tiny_models, pose_video=condition_videos["pose"], hand_video=condition_videos["hand"],
        audio_file=condition_videos["tone"], camera="pan-left", camera_speed=6.0, crf=1,
    )  # fmt: skip
    result = animate(reference_image_path, None, output, options=options, reporter=Reporter(quiet=True))

    assert probe_video(output).has_audio  # from --audio: the pose video itself is silent
    summary = result.summary()
    assert (summary["kv_steps"], summary["kv_blocks"], summary["shot"]) == ("off", "off", None)
    assert summary["camera"] == "pan-left at 6" and summary["camera_video"] == str(tmp_path / "pan.camera.mp4")
    motion = CameraMotion("pan-left", 6.0, Fraction(FPS))
    hands = frame_to_model(np.stack(list(iter_frames(condition_videos["hand"]))), (112, 64))
    for seg, call in zip(plan_segments(FRAMES, 13, 5, 4), calls):
        expected = np.stack([camera_pattern(i, motion, (112, 64)) for i in range(seg.start, seg.stop)])
        np.testing.assert_array_equal(call["negative_pose_frames"], expected)
        assert not call["negative_hand_frames"].any()
        np.testing.assert_array_equal(call["hand_frames"], hands[segment_frame_indices(seg, FRAMES)])
        assert call["kv_share"] is None  # no background K/V sharing with a moving camera
    # camera.mp4 shows the injected pattern over the output's frames
    camera = probe_video(result.camera_video)
    assert (camera.frame_count, camera.fps, camera.width, camera.height) == (FRAMES, Fraction(FPS), 64, 112)
    # in luma (4:2:0 H.264 keeps it at full resolution; chroma bleeds around 1 px strokes): each decoded frame is
    # closest to the pattern of its own frame index
    luma = np.array([0.299, 0.587, 0.114])
    decoded = np.stack(list(iter_frames(result.camera_video))) @ luma
    drawn = np.stack([camera_pattern(i, motion, (112, 64)) for i in range(FRAMES)]) @ luma
    distances = np.abs(decoded[:, None] - drawn[None]).mean(axis=(2, 3))
    assert list(distances.argmin(axis=1)) == list(range(FRAMES)) and distances.diagonal().max() < 6


def test_camera_with_a_driving_video(
    tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Extraction and alignment run as usual; only the negative branch and K/V sharing change."""
    calls = recorded_calls(monkeypatch)
    output = tmp_path / "zoom.mp4"
    options = AnimateOptions(**TEST_OPTIONS, models_dir=tiny_models, camera="zoom-in", camera_speed=10.0)
    result = animate(reference_image_path, driving_clip, output, options=options, reporter=Reporter(quiet=True))
    driving = probe_video(driving_clip)
    out = probe_video(output)
    assert (out.frame_count, out.fps, out.has_audio) == (driving.frame_count, driving.fps, True)
    assert result.conditions.startswith("extracted from driving.mp4") and result.kv is None
    motion = CameraMotion("zoom-in", 10.0, driving.fps)
    for seg, call in zip(plan_segments(driving.frame_count, 13, 5, 4), calls):
        assert call["kv_share"] is None and call["pose_frames"].any()
        np.testing.assert_array_equal(call["negative_pose_frames"][-1], camera_pattern(seg.stop - 1, motion, (112, 64)))
    assert probe_video(tmp_path / "zoom.camera.mp4").frame_count == driving.frame_count


def info(path: str, frames: int = FRAMES, size: tuple[int, int] = (72, 128), fps: int = FPS) -> VideoInfo:
    return VideoInfo(Path(path), size[0], size[1], Fraction(fps), frames, False)


@pytest.mark.parametrize("hand", [info("h.mp4", frames=19), info("h.mp4", size=(144, 256)), info("h.mp4", fps=12)])
def test_a_hand_video_must_match_its_pose_video(hand: VideoInfo) -> None:
    with pytest.raises(InputError, match=r"hand video h\.mp4 is .* but pose video p\.mp4 is 20 frames of 72x128 at 10 fps"):
        check_hand_video(hand, info("p.mp4"))
    check_hand_video(info("h.mp4"), info("p.mp4"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--hand-video", "{short}"], "hand video .*short.mp4 is 12 frames"),
        (["--hand-video", "{tmp}/missing.mp4"], "hand video not found"),
        (["--audio", "{tmp}/notes.txt"], "audio file .*notes.txt has no audio track"),
        (["--audio", "{tmp}/missing.wav"], "audio file not found"),
        (["--camera", "pan-up", "--guidance", "1"], "negative guidance branch"),
        (["--camera", "zoom-in", "--kv-steps", "0-1"], "K/V sharing off"),
        (["--camera", "zoom-in", "--shot", "close-up"], "drop --shot"),
        (["--camera", "zoom-in", "--camera-speed", "0"], "--camera-speed 0"),
        (["--audio", "{tone}", "--no-audio"], "contradict"),
        (["--align", "limbs"], "--align limbs does nothing with --pose-video"),
    ],
)
def test_bad_condition_inputs_exit_2_with_one_line(
    tmp_path: Path, reference_image_path: Path, condition_videos: dict[str, Path], extra: list[str], message: str
) -> None:
    short = write_video(tmp_path / "short.mp4", condition_frames(3)[:12], FPS, lossless=True)
    (tmp_path / "notes.txt").write_text("not audio")
    values = {"tmp": tmp_path, "short": short, "tone": condition_videos["tone"]}
    args = ["animate", str(reference_image_path), "--pose-video", str(condition_videos["pose"]), "-o", str(tmp_path / "out.mp4")]
    result = CliRunner().invoke(app, args + [a.format(**values) for a in extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pose-video", "{tmp}/notes.mp4"], "notes.mp4"),
        (["--pose-video", "{tmp}/missing.mp4"], "pose video not found"),
        (["{driving}", "--pose-video", "{pose}"], "not both"),
        ([], "nothing to follow"),
        (["{driving}", "--hand-video", "{pose}"], "--hand-video needs --pose-video"),
    ],
)
def test_which_video_drives_is_checked(
    tmp_path: Path, reference_image_path: Path, condition_videos: dict[str, Path], args: list[str], message: str
) -> None:
    (tmp_path / "notes.mp4").write_text("not a video")
    values = {"tmp": tmp_path, "driving": condition_videos["pose_with_audio"], "pose": condition_videos["pose"]}
    command = ["animate", str(reference_image_path), *[a.format(**values) for a in args], "-o", str(tmp_path / "out.mp4")]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not (tmp_path / "out.mp4").exists()


def test_help_calls_the_camera_experimental() -> None:
    result = CliRunner().invoke(app, ["animate", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for option in ("--pose-video", "--hand-video", "--audio", "--camera", "--camera-speed"):
        assert option in text
    assert "EXPERIMENTAL" in text and "PoseAnything" in text and "unverified" in text
    assert "ε = ε(∅s, zc) + s·(ε(zs, ∅c) − ε(∅s, zc))" in text


def test_work_folder_keys_change_only_when_the_new_options_are_used(reference_image_path: Path) -> None:
    """Jobs without --pose-video or --camera keep their work folders (and so resume across this change)."""
    from posegen_cli.longvideo.engine import work_settings
    from posegen_cli.longvideo.options import resolve_settings
    from posegen_cli.video.image import ReferenceImage

    reference = ReferenceImage.load(reference_image_path)

    def settings(**changes: Any) -> dict[str, Any]:
        options = AnimateOptions(**changes, device="cpu")
        return work_settings(options, resolve_settings(options), reference, [])

    plain = settings()
    assert "camera" not in plain and "conditions" not in plain
    assert settings(camera="pan-up") == {**plain, "camera": ["pan-up", 4.0]}
    assert settings(camera="pan-up", camera_speed=2.0)["camera"] == ["pan-up", 2.0]
    assert settings(pose_video=Path("p.mp4")) == {**plain, "conditions": "given"}

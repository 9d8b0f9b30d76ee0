"""Real-world timing (issue 16): variable frame rate, picture after sound, GIF delays, rotated phone clips."""

from __future__ import annotations

import json
import shlex
import subprocess
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image
from real_world_inputs import (
    CLIP_H,
    CLIP_W,
    audio_onset,
    ffmpeg,
    mux_with_offset,
    sliding_photo,
    stream_start,
    tone_after_silence,
    variable_rate_clip,
)

from posegen_cli.video import iter_frames, probe_video, write_video
from posegen_cli.video.decode import AVERAGE, CONSTANT, NOMINAL, constant_rate_command, snap_rate, timeline_rate


@pytest.fixture(scope="module")
def vfr_clip(tmp_path_factory: pytest.TempPathFactory, reference_image_path: Path) -> Path:
    return variable_rate_clip(reference_image_path, tmp_path_factory.mktemp("vfr") / "phone.mp4")


def test_timeline_rule() -> None:
    even = np.arange(10) / 25
    assert timeline_rate(even, 10 / 25, Fraction(25)) == (Fraction(25), CONSTANT)
    ntsc = np.arange(10) * 1001 / 30000
    assert timeline_rate(ntsc, 10 * 1001 / 30000, Fraction(30000, 1001)) == (Fraction(30000, 1001), CONSTANT)
    millis = np.cumsum([0, 33, 33, 34, 33, 33, 34, 33, 33]) / 1000  # 30 fps in a millisecond time base (MKV)
    assert timeline_rate(millis, millis[-1] + 0.034, Fraction(30)) == (Fraction(30), CONSTANT)
    gappy = np.cumsum([0, 33, 34, 33, 100, 33, 34, 33]) / 1000
    assert timeline_rate(gappy, gappy[-1] + 0.033) == (Fraction(30), NOMINAL)
    dropped = np.array([0, 1, 2, 3, 6, 7, 8, 9]) / 30  # low light: three frames missing
    assert timeline_rate(dropped, 10 / 30) == (Fraction(30), NOMINAL)
    jittery = np.cumsum([0, 0.03, 0.05, 0.02, 0.07, 0.04, 0.06, 0.035, 0.045])  # no common interval
    rate, rule = timeline_rate(jittery, jittery[-1] + 0.04)
    assert rule == AVERAGE and rate == snap_rate(len(jittery) / (jittery[-1] + 0.04))
    assert snap_rate(30.2) == 30 and snap_rate(29.9) == Fraction(30000, 1001) and snap_rate(29.97) == Fraction(30000, 1001) and snap_rate(17.0) == 17


def test_variable_frame_rate_is_decoded_onto_the_nominal_timeline(vfr_clip: Path) -> None:
    info = probe_video(vfr_clip)
    # 50 stored frames over 2 s, 10 of them missing: a constant 30 fps timeline of 60 frames, duration kept.
    assert (info.fps, info.frame_count, info.source_frames, info.timeline) == (Fraction(30), 60, 50, NOMINAL)
    assert info.duration == pytest.approx(2.0)
    frames = list(iter_frames(info))
    assert len(frames) == 60
    # Frame 9 (t = 0.3 s) is the last before the gap: the fps filter repeats it until frame 20 arrives at 0.667 s.
    for k in range(10, 20):
        assert np.array_equal(frames[k], frames[9])
    assert not np.array_equal(frames[20], frames[9])
    assert "variable frame rate (50 frames over 2.000 s)" in info.timing_note()


def test_constant_rate_advice_works_when_followed(vfr_clip: Path, tmp_path: Path) -> None:
    """The command the decode-mismatch error suggests really gives a constant-rate copy with the same timeline."""
    info = probe_video(vfr_clip)
    work = tmp_path / vfr_clip.name
    work.write_bytes(vfr_clip.read_bytes())
    command = constant_rate_command(probe_video(work))
    args = shlex.split(command)
    assert args[0] == "ffmpeg"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", *args[1:]], check=True)
    fixed = probe_video(Path(args[-1]))
    assert (fixed.timeline, fixed.fps, fixed.frame_count) == (CONSTANT, info.fps, info.frame_count)


def test_constant_rate_video_is_untouched(tmp_path: Path) -> None:
    frames = [np.full((32, 48, 3), 10 * i, np.uint8) for i in range(7)]
    path = write_video(tmp_path / "cfr.mp4", frames, Fraction(30000, 1001), lossless=True)
    info = probe_video(path)
    assert (info.fps, info.frame_count, info.timeline, info.start_time) == (Fraction(30000, 1001), 7, CONSTANT, 0.0)
    assert info.timing_note() is None
    assert all(np.array_equal(a, b) for a, b in zip(iter_frames(info), frames, strict=True))


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory, reference_image_path: Path) -> Path:
    return sliding_photo(reference_image_path, tmp_path_factory.mktemp("pic") / "picture.mp4", fps=12, seconds=1.5)


@pytest.mark.parametrize("delay", [0.021, 0.5])
def test_picture_starting_after_the_sound_stays_in_sync(picture: Path, tmp_path: Path, delay: float) -> None:
    """The tone starts 0.8 s into the file; with the picture starting ``delay`` later, its first frame is at ``delay``."""
    tone = tone_after_silence(tmp_path / "tone.wav", onset=0.8, seconds=2.5)
    clip = mux_with_offset(picture, tone, tmp_path / "late.mp4", video_delay=delay)
    info = probe_video(clip)
    assert info.start_time == pytest.approx(delay, abs=0.002)
    assert (info.frame_count, info.fps, info.timeline) == (18, Fraction(12), CONSTANT)
    assert len(list(iter_frames(info))) == 18
    out = write_video(tmp_path / "out.mp4", iter_frames(info), info.fps, audio_from=clip, audio_start=info.start_time)
    # The output's first frame is the driving video's first frame, so the tone must start 0.8 - delay after it.
    assert stream_start(out, "v") == 0.0
    assert audio_onset(out) == pytest.approx(0.8 - delay, abs=0.01)
    assert probe_video(out).duration == pytest.approx(1.5)


def test_sound_starting_after_the_picture_keeps_its_delay(picture: Path, tmp_path: Path) -> None:
    tone = tone_after_silence(tmp_path / "tone.wav", onset=0.0, seconds=2.0)
    clip = mux_with_offset(picture, tone, tmp_path / "early.mp4", audio_delay=0.4)
    info = probe_video(clip)
    assert info.start_time == 0.0
    out = write_video(tmp_path / "out.mp4", iter_frames(info), info.fps, audio_from=clip, audio_start=info.start_time)
    assert audio_onset(out) == pytest.approx(0.4, abs=0.01)


def test_gif_timing_comes_from_the_frame_delays(tmp_path: Path, reference_image_path: Path) -> None:
    """25 frames of 40 ms and 20 of 50 ms add up to 2.000 s: a 25 fps timeline of 50 frames, not 45 at 25 fps."""
    photo = Image.open(reference_image_path).convert("RGB").resize((CLIP_W + 64, 2 * CLIP_H))
    frames = [photo.crop((i, 0, i + CLIP_W, CLIP_H)) for i in range(45)]
    delays = [40, 50] * 20 + [40] * 5
    assert sum(delays) == 2000
    gif = tmp_path / "dance.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=delays, loop=0, optimize=False, disposal=1)
    info = probe_video(gif)
    assert (info.fps, info.frame_count, info.source_frames) == (Fraction(25), 50, 45)
    assert info.duration == pytest.approx(2.0)
    assert len(list(iter_frames(info))) == 50


def test_rotated_phone_clip_decodes_upright_without_library_noise(
    picture: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    rotated = tmp_path / "rotated.mp4"
    ffmpeg("-display_rotation", "90", "-i", str(picture), "-c", "copy", str(rotated))
    capfd.readouterr()
    info = probe_video(rotated)
    frames = list(iter_frames(info))
    frames_by_path = list(iter_frames(rotated, 0, 2))
    captured = capfd.readouterr()
    assert (info.width, info.height) == (CLIP_H, CLIP_W)
    assert frames[0].shape == (CLIP_W, CLIP_H, 3) and frames_by_path[0].shape == frames[0].shape
    assert captured.err == "" and captured.out == ""


def test_animate_keeps_the_duration_and_sync_of_a_late_variable_rate_phone_clip(
    tmp_path: Path, reference_image_path: Path, tiny_models: Path
) -> None:
    """12 fps nominal, frames 8-11 dropped, the picture 0.25 s after the sound, a tone from 1.0 s into the file."""
    from animate_inputs import TEST_OPTIONS

    from posegen_cli.longvideo import AnimateOptions, animate
    from posegen_cli.report import Reporter

    picture = variable_rate_clip(reference_image_path, tmp_path / "phone-picture.mp4", (8, 11), fps=12, size=(180, 320))
    tone = tone_after_silence(tmp_path / "tone.wav", onset=1.0, seconds=3.0)
    driving = mux_with_offset(picture, tone, tmp_path / "phone.mp4", video_delay=0.25)
    info = probe_video(driving)
    assert (info.fps, info.frame_count, info.source_frames, info.start_time) == (Fraction(12), 24, 20, pytest.approx(0.25, abs=0.002))
    output = tmp_path / "out.mp4"
    result = animate(reference_image_path, driving, output, options=AnimateOptions(**TEST_OPTIONS, models_dir=tiny_models), reporter=Reporter(quiet=True))
    made = probe_video(output)
    assert (result.frames, made.frame_count, made.fps) == (24, 24, Fraction(12))
    assert made.duration == pytest.approx(2.0) and made.start_time == 0.0
    # the tone starts 0.75 s after the driving video's first frame, so 0.75 s into the output
    assert audio_onset(output) == pytest.approx(0.75, abs=0.01)
    assert result.summary()["people_seen"] == 1


def _posegen(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process, so native libraries' own writes to fd 2 are seen."""
    import sys

    return subprocess.run([sys.executable, "-c", "from posegen_cli.cli import run; run()", *args], capture_output=True, text=True, check=False)


def test_cli_on_a_rotated_phone_clip_prints_only_posegen_lines(tmp_path: Path, reference_image_path: Path) -> None:
    upright = sliding_photo(reference_image_path, tmp_path / "upright.mp4", fps=12, seconds=0.5, size=(180, 320))
    rotated = tmp_path / "rotated.mp4"
    ffmpeg("-display_rotation", "-90", "-i", str(upright), "-c", "copy", str(rotated))
    result = _posegen("extract-pose", str(rotated), "--backend", "mediapipe", "--no-cache", "-o", str(tmp_path / "pose"), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["width"], summary["height"], summary["frame_count"]) == (320, 180, 6)
    ours = ("pose backend:", "hand-normal video:", "extracting pose")  # no crop advice: extraction does not frame (issue 10)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith(ours)]
    # every line is one of posegen's messages or the wrapped continuation of the one before it
    strays = [line for i, line in enumerate(lines) if i not in starts and not (line[:1].islower() or line[:1].isdigit())]
    assert len(starts) == 3 and strays == [], result.stderr
    assert not any(word in result.stderr for word in ("INFO:", "imageio", "frame size for reading", "XNNPACK", "Traceback"))


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--person", "first", "--person 'first' is neither a number"), ("--background", "teal", "--background 'teal' is not a colour")],
)
def test_cli_rejects_bad_person_and_background(tmp_path: Path, picture: Path, reference_image_path: Path, flag: str, value: str, message: str) -> None:
    from typer.testing import CliRunner

    from posegen_cli.cli import app

    args = ["extract-pose", str(picture), "--backend", "mediapipe", "--align-to", str(reference_image_path), flag, value, "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "o").exists()

"""Video layer: exact round trips, audio, atomic writes, and one-line errors for bad files."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from posegen_cli.errors import InputError, PosegenError
from posegen_cli.video import VideoWriter, iter_frames, load_image, mux_audio, probe_video, write_video
from posegen_cli.video._ffmpeg import run_ffmpeg


def _noise_frames(n: int, h: int = 48, w: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _smooth_frames(n: int, h: int = 96, w: int = 128) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    return [np.stack([(xx * 2 + t * 5) % 256, (yy * 2) % 256, np.full_like(xx, 128)], axis=-1).astype(np.uint8) for t in range(n)]


@pytest.fixture(scope="module")
def tone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three seconds of a 440 Hz tone in an audio-only file."""
    path = tmp_path_factory.mktemp("audio") / "tone.m4a"
    result = run_ffmpeg(["-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=3", "-c:a", "aac", str(path)])
    assert result.returncode == 0, result.stderr
    return path


def test_lossless_round_trip_is_bit_exact(tmp_path: Path) -> None:
    frames = _noise_frames(12)
    out = write_video(tmp_path / "clip.mp4", frames, Fraction(30000, 1001), lossless=True)
    info = probe_video(out)
    assert (info.width, info.height, info.frame_count, info.fps, info.has_audio) == (64, 48, 12, Fraction(30000, 1001), False)
    assert np.array_equal(np.stack(list(iter_frames(out))), np.stack(frames))


def test_lossy_round_trip_within_tolerance(tmp_path: Path) -> None:
    frames = _smooth_frames(10)
    out = write_video(tmp_path / "clip.mp4", frames, 25, crf=18)
    decoded = np.stack(list(iter_frames(out))).astype(np.int16)
    assert decoded.shape == (10, 96, 128, 3)
    # H.264 4:2:0 at CRF 18 on smooth content: mean error under 2 levels of 255.
    assert np.abs(decoded - np.stack(frames)).mean() < 2.0
    assert probe_video(out).fps == Fraction(25)


def test_odd_sizes_are_padded_to_even(tmp_path: Path) -> None:
    frames = _smooth_frames(3, h=47, w=33)
    out = write_video(tmp_path / "odd.mp4", frames, 24)
    info = probe_video(out)
    assert (info.width, info.height) == (34, 48)


def test_audio_is_muxed_and_trimmed(tmp_path: Path, tone: Path) -> None:
    out = write_video(tmp_path / "with_audio.mp4", _smooth_frames(25), 25, audio_from=tone)
    info = probe_video(out)
    assert info.has_audio and info.frame_count == 25
    header = run_ffmpeg(["-i", str(out)]).stderr
    duration = header.split("Duration: ")[1].split(",")[0]
    hours, minutes, seconds = duration.split(":")
    # One second of video: the three-second tone is cut to it (AAC frames allow ~0.05 s of slack).
    assert float(seconds) < 1.1 and hours == "00" and minutes == "00"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["with_audio.mp4"]


def test_short_audio_never_shortens_the_video(tmp_path: Path) -> None:
    short = tmp_path / "short.m4a"
    assert run_ffmpeg(["-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=1.35", "-c:a", "aac", str(short)]).returncode == 0
    out = write_video(tmp_path / "v.mp4", _smooth_frames(36), 25, audio_from=short)
    info = probe_video(out)
    assert info.frame_count == 36 and info.has_audio


def test_mux_without_audio_source_keeps_video(tmp_path: Path) -> None:
    silent = write_video(tmp_path / "a.mp4", _noise_frames(4), 10, lossless=True)
    out = mux_audio(silent, silent, tmp_path / "b.mp4")
    assert probe_video(out).frame_count == 4 and not probe_video(out).has_audio


def test_ffmpeg_failure_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PosegenError, match=r"ffmpeg failed writing .*out\.mp4: .*preset"):
        with VideoWriter(tmp_path / "out.mp4", 25, preset="no-such-preset") as writer:
            for frame in _noise_frames(30):
                writer.write(frame)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(target, 25) as writer:
        for frame in _noise_frames(3):
            writer.write(frame)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_empty_write_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no frames"), VideoWriter(tmp_path / "out.mp4", 25):
        pass
    assert list(tmp_path.iterdir()) == []


def test_bad_video_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        probe_video(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(InputError, match="no video stream"):
        probe_video(text)
    empty = tmp_path / "empty.mp4"
    result = run_ffmpeg(["-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-frames:v", "0", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(empty)])
    assert result.returncode == 0
    with pytest.raises(InputError, match=str(empty)):
        probe_video(empty)


def test_load_image(tmp_path: Path, reference_image_path: Path) -> None:
    image = load_image(reference_image_path)
    assert image.shape == (1280, 720, 3) and image.dtype == np.uint8
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    with pytest.raises(InputError, match="cannot read image"):
        load_image(broken)

"""Inputs shaped like real-world footage, made from the reference photo with ffmpeg's filters (issue 16).

Every clip is tiny (a 64x112 crop, a second or two) so the tests stay fast.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np

CLIP_W, CLIP_H = 64, 112


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly; a failure shows its log."""
    result = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def sliding_photo(
    reference: Path, out: Path, *, fps: int = 30, seconds: float = 2.0, extra_filters: str = "", codec: tuple[str, ...] = (),
    size: tuple[int, int] = (CLIP_W, CLIP_H),
) -> Path:
    """The photo scaled to ``size`` (W, H) plus 64 px and shifted one pixel per frame (every frame differs), as H.264."""
    width, height = size
    chain = f"scale={width + 64}:-2,crop={width}:{height}:x='min(n,63)':y=0"
    if extra_filters:
        chain += "," + extra_filters
    ffmpeg(
        "-loop", "1", "-framerate", str(fps), "-i", str(reference), "-t", f"{seconds}", "-vf", chain,
        *(codec or ("-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p")), str(out),
    )  # fmt: skip
    return out


def variable_rate_clip(
    reference: Path, out: Path, dropped: tuple[int, int] = (10, 19), *, fps: int = 30, size: tuple[int, int] = (CLIP_W, CLIP_H)
) -> Path:
    """A ``fps`` phone-style clip of 2 s whose frames ``dropped[0]..dropped[1]`` are missing (real timestamps kept)."""
    a, b = dropped
    return sliding_photo(
        reference, out, fps=fps, size=size, extra_filters=f"select='not(between(n,{a},{b}))'",
        codec=("-fps_mode", "vfr", "-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p"),
    )  # fmt: skip


def tone_after_silence(out: Path, *, onset: float, seconds: float) -> Path:
    """A WAV that is silent until ``onset`` seconds, then a 440 Hz tone."""
    ffmpeg("-f", "lavfi", "-i", f"aevalsrc='0.3*sin(2*PI*440*t)*gte(t,{onset})':s=16000:d={seconds}", str(out))
    return out


def mux_with_offset(video: Path, audio: Path, out: Path, *, video_delay: float = 0.0, audio_delay: float = 0.0) -> Path:
    """``video`` and ``audio`` in one MP4, each stream starting ``*_delay`` seconds into the file."""
    ffmpeg(
        "-itsoffset", f"{video_delay}", "-i", str(video), "-itsoffset", f"{audio_delay}", "-i", str(audio),
        "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", str(out),
    )  # fmt: skip
    return out


def audio_onset(path: Path, threshold: float = 0.05) -> float:
    """Seconds from the file's time 0 to the first audible sample (gaps before the audio are filled by timestamp)."""
    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path), "-map", "0:a:0",
         "-af", "aresample=async=1:first_pts=0", "-ac", "1", "-ar", "16000", "-f", "s16le", "-"],
        capture_output=True, check=True,
    )  # fmt: skip
    samples = np.frombuffer(result.stdout, np.int16).astype(np.float32) / 32768
    loud = np.flatnonzero(np.abs(samples) > threshold)
    assert len(loud), f"no sound in {path}"
    return float(loud[0] / 16000)


def stream_start(path: Path, kind: str) -> float:
    """The first packet time of the first ``kind`` ("v" or "a") stream, in seconds."""
    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-map", f"0:{kind}:0", "-c", "copy", "-f", "framecrc", "-"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    base = next(line for line in lines if line.startswith("#tb"))
    num, den = base.split(":")[1].strip().split("/")
    first = next(line for line in lines if not line.startswith("#"))
    return int(first.split(",")[2]) * int(num) / int(den)

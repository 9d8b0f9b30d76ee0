"""The ffmpeg binary every video stage shares (the one imageio-ffmpeg ships, so no system install is needed)."""

from __future__ import annotations

import re
import subprocess
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg

_NTSC_BASES = (24, 30, 48, 60, 120, 240)


def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


def run_ffmpeg(args: list[str]) -> subprocess.CompletedProcess:
    """Run ffmpeg quietly; the caller decides what a non-zero exit means."""
    return subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", *args], capture_output=True, text=True, check=False)


def stream_header(path: Path) -> str:
    """ffmpeg's description of the container (what ffprobe would say; imageio-ffmpeg ships no ffprobe)."""
    return run_ffmpeg(["-i", str(path)]).stderr


def parse_fps(header: str) -> Fraction | None:
    """The video stream's frame rate as an exact fraction (29.97 -> 30000/1001)."""
    for line in header.splitlines():
        if "Video:" not in line:
            continue
        match = re.search(r"([\d.]+) fps", line) or re.search(r"([\d.]+) tbr", line)
        if not match:
            return None
        value = float(match.group(1))
        for base in _NTSC_BASES:
            ntsc = Fraction(base * 1000, 1001)
            if abs(value - float(ntsc)) < 0.006:
                return ntsc
        return Fraction(value).limit_denominator(1000)
    return None


def has_audio_stream(header: str) -> bool:
    return any(re.search(r"Stream #\d+:\d+.*: Audio:", line) for line in header.splitlines())


def fps_arg(fps: Fraction | float) -> str:
    """ffmpeg's exact rational form, so 30000/1001 is not rounded to 29.97."""
    frac = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    return f"{frac.numerator}/{frac.denominator}"

"""Streaming video decode: frames one at a time, never the whole video in memory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from posegen_cli.errors import InputError, require_file
from posegen_cli.video._ffmpeg import has_audio_stream, parse_fps, stream_header


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: Fraction
    frame_count: int
    has_audio: bool

    @property
    def duration(self) -> float:
        return float(self.frame_count / self.fps)


def _open(path: Path) -> tuple[Iterator, dict]:
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as exc:
        reader.close()
        raise InputError(f"cannot decode video {path}: {str(exc).splitlines()[0] if str(exc) else 'no video stream'} (re-encode it, e.g. with ffmpeg -i IN -c:v libx264 OUT.mp4)") from None
    return reader, meta


def probe_video(path: str | Path) -> VideoInfo:
    """Size, exact fps, exact frame count (by decoding) and audio presence; InputError for anything unusable."""
    path = require_file(path, "video")
    header = stream_header(path)
    if "Video:" not in header:
        raise InputError(f"{path} has no video stream ffmpeg can read (is it really a video? re-encode it with ffmpeg)")
    reader, meta = _open(path)
    reader.close()
    fps = parse_fps(header) or Fraction(meta["fps"]).limit_denominator(1000)
    try:
        frame_count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot count frames of {path}: {exc} (re-encode it with ffmpeg)") from None
    if frame_count <= 0:
        raise InputError(f"{path} has no frames (export it again; the file may be truncated)")
    width, height = meta["size"]
    return VideoInfo(path, int(width), int(height), fps, int(frame_count), has_audio_stream(header))


def iter_frames(path: str | Path, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 (H, W, 3) frames ``start <= i < stop`` in order."""
    path = require_file(path, "video")
    reader, meta = _open(path)
    width, height = meta["size"]
    try:
        for index, raw in enumerate(reader):
            if stop is not None and index >= stop:
                break
            if index >= start:
                yield np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
    finally:
        reader.close()

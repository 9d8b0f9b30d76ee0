"""Streaming video decode: frames one at a time, never the whole video in memory.

Frame counts and times come from the decoded frames' own timestamps (ffmpeg's ``showinfo``), never from
container metadata, which phone footage, screen recorders and GIFs get wrong. A stream whose frames are
not evenly spaced (variable frame rate) is put on a constant-rate timeline by ffmpeg's ``fps`` filter,
which duplicates or drops frames by timestamp; every decode of that video then goes through the same
filter, so the count ``probe_video`` reports is the count ``iter_frames`` yields.

The timeline rate (:func:`timeline_rate`): a stream whose intervals are all within 10 % of their median
keeps its own rate; otherwise the nominal rate, 1 / the mean of the intervals within 10 % of the median
(the rate the camera recorded at: frames dropped in low light only lengthen some intervals), when at least
half the intervals are such; else the average rate, frames over duration. Nominal and average rates snap to the
standard rate (24, 25, 29.97, 30, 50, 60, ...) within 1 %.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from posegen_cli.errors import InputError, require_file
from posegen_cli.video._ffmpeg import ffmpeg_exe, fps_arg, has_audio_stream, parse_fps, run_ffmpeg, stream_header

REGULAR_TOLERANCE = 0.10
"""An interval within this share of the median interval counts as the nominal one."""
NOMINAL_SHARE = 0.5
"""The nominal rate is used when at least this share of the intervals are nominal; else the average rate."""
SNAP_TOLERANCE = 0.01
STANDARD_RATES = tuple(
    Fraction(r) for r in ("24000/1001", "24", "25", "30000/1001", "30", "48", "50", "60000/1001", "60", "100", "120000/1001", "120", "240")
)
CONSTANT, NOMINAL, AVERAGE = "constant", "nominal", "average"

_SHOWINFO = re.compile(r"\bn:\s*\d+\s+pts:\s*(-?\d+)\s+pts_time:\S+\s+duration:\s*(-?\d+|N/A)\b.*?\bs:(\d+)x(\d+)")
_TIME_BASE = re.compile(r"config in time_base:\s*(\d+)/(\d+)")


@dataclass(frozen=True)
class VideoInfo:
    """What decoding a video gives: the size after rotation, the timeline's exact rate and frame count.

    ``start_time`` is when the first frame plays, in seconds after the file's earliest stream (a picture
    that starts after the sound has ``start_time > 0``). ``timeline`` says how the rate was chosen:
    ``constant`` (evenly spaced frames, decoded as they are), ``nominal`` or ``average`` (a variable frame
    rate put on a constant-rate timeline); ``source_frames`` is the stream's own frame count.
    """

    path: Path
    width: int
    height: int
    fps: Fraction
    frame_count: int
    has_audio: bool
    start_time: float = 0.0
    timeline: str = CONSTANT
    source_frames: int | None = None

    @property
    def duration(self) -> float:
        return float(self.frame_count / self.fps)

    @property
    def resampled(self) -> bool:
        """Whether frames are duplicated or dropped to make the timeline constant."""
        return self.timeline != CONSTANT

    def timing_note(self) -> str | None:
        """One line for people when the timing needed handling (variable rate, late picture), else None."""
        notes = []
        if self.resampled:
            notes.append(
                f"{self.path.name} has a variable frame rate ({self.source_frames} frames over {self.duration:.3f} s): "
                f"decoded at a constant {float(self.fps):g} fps, its {self.timeline} rate ({self.frame_count} frames)"
            )
        if self.start_time > 0:
            notes.append(
                f"{self.path.name}'s picture starts {self.start_time:.3f} s after its sound: "
                "the output starts at the first frame with the sound that plays with it"
            )
        return "; ".join(notes) or None


def snap_rate(rate: float) -> Fraction:
    """``rate`` as the standard rate within 1 % of it (30 for 29.9, 30000/1001 for 29.97), else a close fraction."""
    nearest = min(STANDARD_RATES, key=lambda standard: abs(rate / float(standard) - 1))
    if abs(rate / float(nearest) - 1) <= SNAP_TOLERANCE:
        return nearest
    return Fraction(rate).limit_denominator(1001)


def timeline_rate(times: np.ndarray, end: float, header_fps: Fraction | None = None) -> tuple[Fraction, str]:
    """The constant rate to decode at and how it was chosen (see the module docstring).

    ``times`` are the frames' start times in seconds, in presentation order; ``end`` is when the last one
    stops. ``header_fps`` (the container's rate) is kept for evenly spaced streams it describes to within 1 %,
    so 30000/1001 stays exact.
    """
    times = np.asarray(times, dtype=np.float64)
    intervals = np.append(np.diff(times), end - times[-1]) if len(times) else np.zeros(0)
    intervals = intervals[intervals > 0]
    if len(intervals) == 0:
        return (header_fps or Fraction(25)), CONSTANT
    median = float(np.median(intervals))
    nominal = np.abs(intervals - median) <= REGULAR_TOLERANCE * median
    # The mean of the nominal intervals, not their median: millisecond time bases store 30 fps as 33, 33, 34 ms.
    interval = float(intervals[nominal].mean())
    if nominal.all():
        if header_fps is not None and abs(float(header_fps) * interval - 1) <= SNAP_TOLERANCE:
            return header_fps, CONSTANT
        return snap_rate(1 / interval), CONSTANT
    if nominal.mean() >= NOMINAL_SHARE:
        return snap_rate(1 / interval), NOMINAL
    return snap_rate(len(times) / (end - times[0])), AVERAGE


def _decode_log(path: Path, filters: str | None) -> str:
    """ffmpeg's log of decoding every frame of ``path`` (through ``filters``) with ``showinfo`` at the end."""
    chain = f"{filters},showinfo=checksum=0" if filters else "showinfo=checksum=0"
    with tempfile.TemporaryFile() as log:
        # The log goes to a file: a long video writes megabytes, more than a pipe holds.
        proc = subprocess.run(
            [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "info", "-i", str(path), "-map", "0:v:0", "-an", "-sn", "-dn",
             "-vf", chain, "-fps_mode", "passthrough", "-f", "null", "-"],
            stdout=subprocess.DEVNULL, stderr=log, check=False,
        )  # fmt: skip
        log.seek(0)
        text = log.read().decode(errors="replace")
    if proc.returncode != 0:
        raise _decode_error(path, text)
    return text


def _decode_error(path: Path, log: str) -> InputError:
    """ffmpeg's last word on ``path`` (re-encoding cannot help: ffmpeg itself cannot read the file)."""
    lines = [line.strip() for line in log.splitlines() if line.strip() and "showinfo" not in line]
    return InputError(f"cannot decode video {path}: {lines[-1] if lines else 'ffmpeg failed'} (the file is damaged or not a video; export it again)")


def _frames_in(log: str) -> tuple[list[tuple[int, int | None]], Fraction, tuple[int, int] | None]:
    """(pts, duration) per decoded frame in the filter's time base, that time base, and the frame size."""
    base = _TIME_BASE.search(log)
    time_base = Fraction(int(base.group(1)), int(base.group(2))) if base else Fraction(1, 1)
    frames, size = [], None
    for match in _SHOWINFO.finditer(log):
        frames.append((int(match.group(1)), None if match.group(2) == "N/A" else int(match.group(2))))
        size = (int(match.group(3)), int(match.group(4)))
    return frames, time_base, size


def fps_filter(fps: Fraction, start_time: float) -> str:
    """ffmpeg's ``fps`` filter onto a ``fps`` grid starting at the first frame (nearest-timestamp rounding)."""
    return f"fps=fps={fps.numerator}/{fps.denominator}:start_time={start_time:.9f}:round=near"


def constant_rate_command(info: VideoInfo) -> str:
    """A shell command that rewrites ``info``'s video at its constant timeline rate, as advice for a decode that
    disagrees with its probe (``<name>_cfr.mp4`` beside it; sound re-encoded to AAC, which MP4 always takes)."""
    out = info.path.with_name(f"{info.path.stem}_cfr.mp4")
    return (
        f"ffmpeg -i {shlex.quote(str(info.path))} -vf fps={fps_arg(info.fps)} -c:v libx264 -crf 12 -pix_fmt yuv420p "
        f"-c:a aac {shlex.quote(str(out))}"
    )


def probe_video(path: str | Path) -> VideoInfo:
    """Size (after rotation), timeline rate, frame count (by decoding) and audio presence; InputError for anything unusable."""
    path = require_file(path, "video")
    header = stream_header(path)
    if not re.search(r"Stream #\d+:\d+.*: Video:", header):
        raise InputError(f"{path} has no video stream ffmpeg can read (is it really a video? pass an MP4/MOV/MKV/WebM/GIF file)")
    frames, time_base, size = _frames_in(_decode_log(path, None))
    if not frames or size is None:
        raise InputError(f"{path} has no frames (export it again; the file may be truncated)")
    pts = np.array([p for p, _ in frames], dtype=np.int64)
    order = np.argsort(pts, kind="stable")
    times = pts[order] * float(time_base)
    last_duration = frames[int(order[-1])][1]
    median = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    end = times[-1] + (last_duration * float(time_base) if last_duration and last_duration > 0 else median)
    fps, timeline = timeline_rate(times, end, parse_fps(header))
    start_time = max(0.0, float(times[0]))
    count = len(frames)
    if timeline != CONSTANT:
        count = len(_frames_in(_decode_log(path, fps_filter(fps, start_time)))[0])
    return VideoInfo(
        path, size[0], size[1], fps, count, has_audio_stream(header), start_time=start_time, timeline=timeline, source_frames=len(frames)
    )


def _frame_size(path: Path) -> tuple[int, int]:
    """(width, height) of the first decoded frame, rotation applied."""
    result = run_ffmpeg(["-loglevel", "info", "-i", str(path), "-map", "0:v:0", "-frames:v", "1", "-vf", "showinfo=checksum=0", "-f", "null", "-"])
    size = _frames_in(result.stderr)[2]
    if size is None:
        raise _decode_error(path, result.stderr)
    return size


def iter_frames(source: str | Path | VideoInfo, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 (H, W, 3) frames ``start <= i < stop`` in order.

    A :class:`VideoInfo` decodes on its timeline (the ``fps`` filter for a variable frame rate); a path
    decodes every frame as stored, which is right for posegen's own constant-rate videos.
    """
    if isinstance(source, VideoInfo):
        path, (width, height) = require_file(source.path, "video"), (source.width, source.height)
        filters = fps_filter(source.fps, source.start_time) if source.resampled else None
    else:
        path = require_file(source, "video")
        (width, height), filters = _frame_size(path), None
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path), "-map", "0:v:0", "-an", "-sn", "-dn"]
    if filters:
        cmd += ["-vf", filters]
    cmd += ["-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    frame_bytes = width * height * 3
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(tempfile.TemporaryFile())
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        stack.callback(proc.wait)
        stack.callback(proc.kill)
        assert proc.stdout is not None
        stack.callback(proc.stdout.close)
        index = 0
        while stop is None or index < stop:
            raw = proc.stdout.read(frame_bytes)
            if len(raw) < frame_bytes:
                break
            if index >= start:
                yield np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
            index += 1
        else:
            return
        if proc.wait() != 0 and index == 0:
            log.seek(0)
            raise _decode_error(path, log.read().decode(errors="replace"))

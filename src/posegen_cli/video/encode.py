"""H.264 encoding through a pipe to ffmpeg, written under a temporary name and renamed when complete."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import IO

import numpy as np

from posegen_cli.errors import InputError, OptionError, PosegenError, ResourceError, option
from posegen_cli.fsutil import atomic_path
from posegen_cli.video._ffmpeg import ffmpeg_exe, fps_arg
from posegen_cli.video.audio import mux_audio


class VideoWriter:
    """Context manager: ``write`` RGB uint8 frames; the file appears under ``path`` only after a clean exit.

    Lossy mode is libx264 yuv420p (odd sizes are padded by one edge-replicated row/column, since
    4:2:0 needs even sizes). Lossless mode is libx264rgb at QP 0: bit-exact RGB, for debugging and tests.
    ``audio_from`` muxes that file's first audio stream, trimmed to the video's length.
    """

    def __init__(
        self,
        path: str | Path,
        fps: Fraction | float,
        *,
        crf: int = 18,
        lossless: bool = False,
        audio_from: str | Path | None = None,
        preset: str = "medium",
    ) -> None:
        if not 0 <= crf <= 51:
            raise OptionError("crf", crf, problem=f"{crf} is out of range (use 0..51; 18 is visually lossless)")
        self.path = Path(path)
        self.fps = fps
        self.crf = crf
        self.lossless = lossless
        self.audio_from = Path(audio_from) if audio_from else None
        self.preset = preset
        self.frame_count = 0
        self._size: tuple[int, int] | None = None
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._stack = contextlib.ExitStack()
        self._tmp: Path | None = None

    def __enter__(self) -> VideoWriter:
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        return self

    def _start(self, height: int, width: int) -> None:
        if self.lossless:
            codec = ["-c:v", "libx264rgb", "-qp", "0", "-preset", "ultrafast", "-pix_fmt", "rgb24"]
        else:
            codec = ["-c:v", "libx264", "-crf", str(self.crf), "-preset", self.preset, "-pix_fmt", "yuv420p"]
        cmd = [
            ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", fps_arg(self.fps), "-i", "-",
            *codec, "-movflags", "+faststart", "-f", "mp4", str(self._video_target()),
        ]
        # ffmpeg's messages go to a file: an unread pipe could fill up and stall the writer.
        self._log = self._stack.enter_context(tempfile.TemporaryFile())
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=self._log)

    def _video_target(self) -> Path:
        assert self._tmp is not None
        return self._tmp.with_name(self._tmp.name + ".video.mp4") if self.audio_from else self._tmp

    def write(self, frame: np.ndarray) -> None:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frames must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
        if not self.lossless and (frame.shape[0] % 2 or frame.shape[1] % 2):
            frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
        if self._proc is None:
            self._size = frame.shape[:2]
            self._start(*self._size)
        elif frame.shape[:2] != self._size:
            raise ValueError(f"frame size changed from {self._size} to {frame.shape[:2]} in {self.path}")
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:
            raise self._failure() from None
        self.frame_count += 1

    def _failure(self) -> PosegenError:
        assert self._proc is not None and self._log is not None
        self._proc.wait()
        self._log.seek(0)
        err = self._log.read().decode(errors="replace").strip()
        if "No space left" in err:
            return ResourceError(f"disk full while writing {self.path} (free some space and run again)")
        reason = err.splitlines()[0] if err else f"exit code {self._proc.returncode}"  # the cause comes first
        return PosegenError(f"ffmpeg failed writing {self.path}: {reason} (check the folder is writable; {option('debug')} shows more)", exit_code=1)

    def _finish(self, ok: bool) -> None:
        """Close ffmpeg; on success check it and mux the audio into the temporary file."""
        try:
            if self._proc is not None:
                with contextlib.suppress(BrokenPipeError):
                    self._proc.stdin.close()
                if not ok:
                    self._proc.kill()
                self._proc.wait()
                if ok and self._proc.returncode != 0:
                    raise self._failure()
            if ok and self.frame_count == 0:
                raise ValueError(f"no frames were written to {self.path}")
            if ok and self.audio_from is not None:
                mux_audio(self._video_target(), self.audio_from, self._tmp, duration=float(self.frame_count / Fraction(self.fps)))
        finally:
            if self.audio_from is not None:
                self._video_target().unlink(missing_ok=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self._finish(ok=exc_type is None)
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        self._stack.__exit__(exc_type, exc, tb)


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: Fraction | float,
    **kwargs,
) -> Path:
    """Encode an iterable of RGB uint8 frames (see :class:`VideoWriter` for the options)."""
    with VideoWriter(path, fps, **kwargs) as writer:
        for frame in frames:
            writer.write(frame)
    return Path(path)


def available_bytes(folder: str | Path) -> int:
    """Free bytes on the disk holding ``folder`` (the nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free

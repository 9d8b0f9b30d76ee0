"""Conditioning frames of one segment at a time, read from the pose and hand videos without holding them in memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from posegen_cli.errors import InputError
from posegen_cli.video.framing import frame_to_model
from posegen_cli.video import iter_frames


class FrameSource:
    """Serves the frames of a video for index lists that mostly move forward, as segments in generation order do.

    A decoder is kept open and only advanced; it is restarted only when a segment asks for a frame already passed
    (the next generation phase, or the mirrored tail of the last segment), so a phase decodes the video once
    instead of once per segment. Frames are fitted to ``size`` (height, width) the way every model input is.
    """

    def __init__(self, path: Path, size: tuple[int, int]) -> None:
        self.path = path
        self.size = size
        self._frames: Iterator[np.ndarray] | None = None
        self._next = 0

    def _restart(self) -> None:
        self.close()
        self._frames = iter_frames(self.path)
        self._next = 0

    def _fit(self, frame: np.ndarray) -> np.ndarray:
        """The decoder's buffers are read-only; framing hands frames to torch, which wants writable memory."""
        return frame.copy() if frame.shape[:2] == self.size else frame_to_model(frame.copy(), self.size)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Frames at ``indices`` (repeats allowed) as uint8 [N, height, width, 3]."""
        wanted = sorted({int(i) for i in indices})
        if self._frames is None or wanted[0] < self._next:
            self._restart()
        found: dict[int, np.ndarray] = {}
        assert self._frames is not None
        while self._next <= wanted[-1]:
            frame = next(self._frames, None)
            if frame is None:
                raise InputError(f"{self.path} ends at frame {self._next}, but frame {wanted[-1]} is needed (extract the pose again)")
            if self._next in wanted:
                found[self._next] = self._fit(frame)
            self._next += 1
        return np.stack([found[int(i)] for i in indices])

    def close(self) -> None:
        if self._frames is not None:
            close = getattr(self._frames, "close", None)
            if close is not None:
                close()
            self._frames = None

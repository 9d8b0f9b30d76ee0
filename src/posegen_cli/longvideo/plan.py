"""Which driving frames each segment of a long video covers, and in which order segments are generated.

The timeline follows PoseGen's schedule (port spec §6): even segments are base segments of ``frames`` frames,
odd segments are transitions that overlap the base before them by ``head`` frames and the base after them by
``tail`` frames. Frames past the end of the driving video are taken from its mirror image (the last frame is
repeated, then the video plays backwards, then forwards again), which is what the release does for the last
segment, extended so that exact fits, very short videos and a last base that starts past the end all get
``frames`` real driving frames instead of the release's whole-clip, negative or short selections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from posegen_cli.errors import InputError

ANCHOR = "anchor"
BASE = "base"
TRANSITION = "transition"


@dataclass(frozen=True)
class Segment:
    """One generated clip: timeline position ``index``, and the frames ``[start, stop)`` of the output timeline it covers."""

    index: int
    kind: str
    start: int
    stop: int
    padding: int
    """Frames of this segment past the end of the driving video (filled from its mirror image)."""

    @property
    def frames(self) -> int:
        return self.stop - self.start


def segment_start(index: int, frames: int = 81, head: int = 21, tail: int = 20) -> int:
    """Timeline position of segment ``index``: start(2k) = k(2·frames − head − tail), start(2k+1) = start(2k) + frames − head."""
    return index * frames - math.ceil(index / 2) * head - (index // 2) * tail


def segment_count(total_frames: int, frames: int = 81, head: int = 21, tail: int = 20, pad: bool = True) -> int:
    """Odd number of segments: enough to cover every driving frame with ``pad``, else only whole periods.

    A video shorter than one segment still gets one (mirror-padded) segment, where the release computed a
    negative count and stopped.
    """
    period = 2 * frames - head - tail
    rounding = math.ceil if pad else math.floor
    pairs = rounding((total_frames - frames) / period)
    return 2 * max(pairs, 0) + 1


def _check_lengths(total_frames: int, frames: int, head: int, tail: int) -> None:
    if total_frames <= 0:
        raise InputError(f"the driving video has {total_frames} frames (it needs at least one; check the file decodes)")
    if head <= 0 or tail <= 0 or head + tail >= frames:
        raise InputError(
            f"segment of {frames} frames with head {head} and tail {tail}: head and tail must be positive and "
            "leave frames between them (PoseGen uses 81, 21, 20)"
        )


def plan_segments(
    total_frames: int,
    frames: int = 81,
    head: int = 21,
    tail: int = 20,
    pad: bool = True,
    anchor: int = 0,
) -> list[Segment]:
    """Segments in generation order: the anchor, the other bases left to right, then the transitions left to right.

    Bases share the anchor's background K/V, and a transition needs both neighbouring bases finished, so this is
    the order a single worker must follow.
    """
    _check_lengths(total_frames, frames, head, tail)
    count = segment_count(total_frames, frames, head, tail, pad)
    if anchor % 2 or not 0 <= anchor < count:
        raise InputError(f"anchor segment {anchor} does not exist: it must be an even index below {count} for this driving video")
    timeline = []
    for index in range(count):
        start = segment_start(index, frames, head, tail)
        stop = start + frames
        kind = TRANSITION if index % 2 else (ANCHOR if index == anchor else BASE)
        timeline.append(Segment(index, kind, start, stop, max(0, stop - max(start, total_frames))))
    rank = {ANCHOR: 0, BASE: 1, TRANSITION: 2}
    return sorted(timeline, key=lambda seg: (rank[seg.kind], seg.index))


def timeline_order(segments: list[Segment]) -> list[Segment]:
    """The same segments left to right, the order the merge reads them."""
    return sorted(segments, key=lambda seg: seg.index)


def covered_frames(segments: list[Segment]) -> int:
    """Length of the merged timeline before trimming to the driving video."""
    return max(seg.stop for seg in segments)


def output_frames(segments: list[Segment], total_frames: int) -> int:
    """Frames in the final video: the driving length, or less when ``pad=False`` leaves the end uncovered."""
    return min(total_frames, covered_frames(segments))


def mirror_index(position: np.ndarray | int, total_frames: int) -> np.ndarray:
    """Driving frame shown at timeline ``position``: 0…L−1, then L−1…0, then 0…L−1 again (edge frames repeated)."""
    phase = np.mod(np.asarray(position, dtype=np.int64), 2 * total_frames)
    return np.where(phase < total_frames, phase, 2 * total_frames - 1 - phase)


def segment_frame_indices(segment: Segment, total_frames: int) -> np.ndarray:
    """Driving-video frame indices (int64, length ``segment.frames``) that condition ``segment``."""
    return mirror_index(np.arange(segment.start, segment.stop), total_frames)


def overlap_before(segment: Segment, head: int = 21, tail: int = 20) -> int:
    """Frames ``segment`` shares with the segment before it on the timeline (0 for the first)."""
    if segment.index == 0:
        return 0
    return head if segment.index % 2 else tail

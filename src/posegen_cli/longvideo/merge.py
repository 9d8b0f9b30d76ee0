"""Join overlapping segments into one video with the release's linear cross-fade (merge.py, port spec §6).

Over an overlap of ``o`` frames, frame ``j`` is ``trunc(w_j·previous_j + (1 − w_j)·next_j)`` with
``w = linspace(1, 0, o)``, computed in float64 and truncated to uint8 as the release does: the first shared
frame is all previous segment, the last all next segment.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np


def crossfade(previous: np.ndarray, following: np.ndarray) -> np.ndarray:
    """Blend two equally long uint8 frame stacks [o, H, W, 3] that show the same ``o`` timeline frames."""
    if previous.shape != following.shape:
        raise ValueError(f"cannot cross-fade frames of shape {previous.shape} into {following.shape} (segments differ in size)")
    overlap = previous.shape[0]
    weights = np.linspace(1.0, 0.0, num=overlap, dtype=np.float64).reshape((overlap,) + (1,) * (previous.ndim - 1))
    blended = weights * previous.astype(np.float64) + (1.0 - weights) * following.astype(np.float64)
    return blended.astype(np.uint8)


def iter_merged(clips: Iterable[tuple[np.ndarray, int]], length: int | None = None) -> Iterator[np.ndarray]:
    """Frames of the merged timeline, one at a time, holding at most two segments in memory.

    ``clips`` gives, left to right, each segment's frames and how many of its first frames overlap the segment
    before it (0 for the first). At most ``length`` frames come out.
    """
    limit = length if length is not None else np.iinfo(np.int64).max
    emitted = 0
    pending: np.ndarray | None = None
    for frames, overlap in clips:
        if pending is None:
            if overlap:
                raise ValueError(f"the first segment cannot overlap a previous one (overlap {overlap})")
            pending = np.asarray(frames)
            continue
        if not 0 < overlap <= min(len(pending), len(frames)):
            raise ValueError(f"overlap of {overlap} frames does not fit segments of {len(pending)} and {len(frames)} frames")
        settled = len(pending) - overlap
        for frame in pending[:settled]:
            if emitted == limit:
                return
            yield frame
            emitted += 1
        pending = np.concatenate([crossfade(pending[settled:], frames[:overlap]), frames[overlap:]])
    for frame in pending if pending is not None else ():
        if emitted == limit:
            return
        yield frame
        emitted += 1


def merge_segments(clips: Sequence[np.ndarray], overlaps: Sequence[int], length: int | None = None) -> np.ndarray:
    """The whole merged video as one uint8 array [N, H, W, 3] (for short videos and tests; ``iter_merged`` streams)."""
    if len(clips) != len(overlaps):
        raise ValueError(f"{len(clips)} segments but {len(overlaps)} overlaps")
    return np.stack(list(iter_merged(zip(clips, overlaps), length)))

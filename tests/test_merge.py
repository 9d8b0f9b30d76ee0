"""The cross-fade merge against the release's formula (port spec §6, merge.py), frame by frame and pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest

from posegen_cli.longvideo.merge import crossfade, iter_merged, merge_segments
from posegen_cli.longvideo.plan import overlap_before, plan_segments, timeline_order


def reference_merge(chunks: list[np.ndarray], overlaps: list[int], length: int) -> np.ndarray:
    """The spec's loop: history grows by each chunk; over o frames, uint8(w·history + (1 − w)·chunk), w = linspace(1, 0, o)."""
    history = list(chunks[0])
    for chunk, o in zip(chunks[1:], overlaps[1:]):
        weights = np.linspace(1, 0, num=o).tolist()
        blended = []
        for j in range(o):
            mixed = weights[j] * history[len(history) - o + j] + (1 - weights[j]) * chunk[j]
            blended.append(mixed.astype(np.uint8))
        history = history[:-o] + blended + list(chunk[o:])
    return np.stack(history[:length])


def test_crossfade_formula_pixel_by_pixel() -> None:
    rng = np.random.default_rng(0)
    prev = rng.integers(0, 256, (21, 5, 3, 3), dtype=np.uint8)
    nxt = rng.integers(0, 256, (21, 5, 3, 3), dtype=np.uint8)
    out = crossfade(prev, nxt)
    assert out.dtype == np.uint8 and out.shape == prev.shape
    np.testing.assert_array_equal(out[0], prev[0])
    np.testing.assert_array_equal(out[-1], nxt[-1])
    for j in range(21):
        w = 1 - j / 20
        for y, x, c in [(0, 0, 0), (4, 2, 1), (2, 1, 2)]:
            assert out[j, y, x, c] == int(w * float(prev[j, y, x, c]) + (1 - w) * float(nxt[j, y, x, c]))


def test_crossfade_truncates_instead_of_rounding() -> None:
    prev = np.full((3, 1, 1, 3), 0, np.uint8)
    nxt = np.full((3, 1, 1, 3), 255, np.uint8)
    # middle weight 0.5: 127.5 truncates to 127 (rounding would give 128)
    assert crossfade(prev, nxt)[1, 0, 0, 0] == 127
    prev[:] = 10
    nxt[:] = 13
    # 0.5·10 + 0.5·13 = 11.5 -> 11
    assert crossfade(prev, nxt)[1, 0, 0, 0] == 11


def test_crossfade_rejects_mismatched_overlaps() -> None:
    with pytest.raises(ValueError, match="cannot cross-fade"):
        crossfade(np.zeros((3, 2, 2, 3), np.uint8), np.zeros((4, 2, 2, 3), np.uint8))


@pytest.mark.parametrize("length", [1, 81, 150, 203, 324, 400])
def test_merge_equals_the_reference_on_a_real_plan(length: int) -> None:
    rng = np.random.default_rng(length)
    line = timeline_order(plan_segments(length))
    chunks = [rng.integers(0, 256, (81, 4, 2, 3), dtype=np.uint8) for _ in line]
    overlaps = [overlap_before(s) for s in line]
    expected = reference_merge(chunks, overlaps, length)
    out = merge_segments(chunks, overlaps, length)
    assert out.shape == (length, 4, 2, 3)
    np.testing.assert_array_equal(out, expected)


def test_streaming_merge_matches_and_stops_at_length() -> None:
    rng = np.random.default_rng(7)
    line = timeline_order(plan_segments(324))
    chunks = [rng.integers(0, 256, (81, 2, 2, 3), dtype=np.uint8) for _ in line]
    overlaps = [overlap_before(s) for s in line]
    full = merge_segments(chunks, overlaps)
    assert len(full) == 81 * 7 - 41 * 3
    np.testing.assert_array_equal(full, reference_merge(chunks, overlaps, len(full)))
    consumed = []

    def lazy():
        for chunk, o in zip(chunks, overlaps):
            consumed.append(o)
            yield chunk, o

    head = list(iter_merged(lazy(), length=100))
    np.testing.assert_array_equal(np.stack(head), full[:100])
    # 100 frames lie within the first two segments' settled frames; the rest are never read
    assert len(consumed) == 3


def test_segment_frames_land_at_their_timeline_positions() -> None:
    """Frames outside every overlap come out unchanged at start(c) + j."""
    line = timeline_order(plan_segments(203))
    chunks = [np.full((81, 1, 1, 3), 40 * (k + 1), np.uint8) for k in range(len(line))]
    chunks = [c + np.arange(81, dtype=np.uint8).reshape(81, 1, 1, 1) % 3 for c in chunks]
    out = merge_segments(chunks, [overlap_before(s) for s in line], 203)
    for seg, chunk in zip(line, chunks):
        nxt_overlap = 21 if seg.index % 2 == 0 else 20
        lo = seg.start + overlap_before(seg)
        hi = min(seg.stop - nxt_overlap, 203)
        if lo < hi:
            np.testing.assert_array_equal(out[lo:hi], chunk[lo - seg.start : hi - seg.start])


def test_bad_overlaps() -> None:
    a = np.zeros((5, 1, 1, 3), np.uint8)
    with pytest.raises(ValueError, match="first segment"):
        merge_segments([a], [2])
    with pytest.raises(ValueError, match="does not fit"):
        merge_segments([a, a], [0, 6])
    with pytest.raises(ValueError, match="2 segments but 1"):
        merge_segments([a, a], [0])

"""The long-video planner against the release's index logic (port spec §6), and its documented bug fixes (§7.6)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from posegen_cli.errors import InputError
from posegen_cli.longvideo.plan import (
    ANCHOR,
    BASE,
    TRANSITION,
    covered_frames,
    mirror_index,
    output_frames,
    overlap_before,
    plan_segments,
    segment_count,
    segment_frame_indices,
    segment_start,
    timeline_order,
)
from posegen_cli.longvideo.presets import classify_shot, kv_share_ranges

N, HEAD, TAIL = 81, 21, 20


def release_count(length: int, pad: bool = True) -> int:
    """inference.py ``prepare_cond``: num_chunks from the pose video length."""
    fn = math.ceil if pad else math.floor
    return int(fn((length - N) / (2 * N - HEAD - TAIL))) * 2 + 1


def release_start(c: int) -> int:
    return c * N - math.ceil(c / 2) * HEAD - math.floor(c / 2) * TAIL


def release_indices(c: int, length: int) -> list[int]:
    """The frame list inference.py hands the pipeline for chunk ``c``, as written (bugs included)."""
    start = release_start(c)
    end = start + N
    if c % 2 == 0:
        if end >= length:
            frames = list(range(release_start(c - 1), length))
            pad = end - length
            frames = frames + frames[-pad:][::-1]
            return frames[-N:]
        return list(range(start, end))
    frames = list(range(start, min(end, length)))
    if len(frames) < N:
        pad = N - len(frames)
        frames = frames + frames[-pad:][::-1]
    return frames


def test_segment_start_matches_the_release_formula() -> None:
    for c in range(40):
        assert segment_start(c) == release_start(c)
    assert [segment_start(c) for c in range(5)] == [0, 60, 121, 181, 242]


@pytest.mark.parametrize(("length", "count"), [(150, 3), (202, 3), (203, 5), (324, 7)])
def test_segment_count_examples_from_the_spec(length: int, count: int) -> None:
    assert segment_count(length) == count
    segs = plan_segments(length)
    assert len(segs) == count
    assert covered_frames(segs) == N * count - 41 * (count - 1) // 2


def test_segment_count_equals_the_release_wherever_the_release_has_segments() -> None:
    for length in range(81, 2000):
        for pad in (True, False):
            assert segment_count(length, pad=pad) == release_count(length, pad)


def test_short_videos_get_one_segment_where_the_release_stopped() -> None:
    for length in (1, 2, 40, 41, 80):
        assert release_count(length, pad=False) < 1
        for pad in (True, False):
            segs = plan_segments(length, pad=pad)
            assert [(s.index, s.kind, s.start, s.stop) for s in segs] == [(0, ANCHOR, 0, 81)]
            assert segs[0].padding == 81 - length
            assert output_frames(segs, length) == length


def test_indices_equal_the_release_wherever_the_release_is_right() -> None:
    """Every chunk the release selects correctly is unchanged.

    The release is wrong for a base chunk reaching the end when nothing needs padding (exact fit), and when the
    padding is longer than the frames it reverses (the chunk then starts before its timeline position, or past
    the end, or comes out short); and for any chunk when its indices leave the video.
    """
    compared = 0
    for length in range(81, 1300):
        segs = plan_segments(length)
        for seg in segs:
            theirs = release_indices(seg.index, length)
            pad = seg.stop - length
            release_buggy = seg.index % 2 == 0 and seg.stop >= length and not 0 < pad <= length - release_start(seg.index - 1)
            if len(theirs) != N or min(theirs) < 0 or max(theirs) >= length or release_buggy:
                continue
            np.testing.assert_array_equal(segment_frame_indices(seg, length), theirs)
            compared += 1
    assert compared > 5000


def test_exact_fit_uses_the_chunk_own_frames() -> None:
    """L = 202: the release's ``x[-0:]`` made chunk 2 the reversed frames of the previous chunk."""
    length = 202
    last = timeline_order(plan_segments(length))[-1]
    assert (last.index, last.start, last.stop, last.padding) == (2, 121, 202, 0)
    np.testing.assert_array_equal(segment_frame_indices(last, length), np.arange(121, 202))
    assert release_indices(2, length) != list(range(121, 202))


def test_short_video_mirrors_instead_of_negative_indices() -> None:
    length = 30
    assert min(release_indices(0, length)) < 0
    idx = segment_frame_indices(plan_segments(length)[0], length)
    expected = list(range(30)) + list(range(29, -1, -1)) + list(range(21))
    np.testing.assert_array_equal(idx, expected)


def test_last_base_past_the_end_continues_the_mirror() -> None:
    """L = 203: chunk 4 starts at 242 > L; the release built it from 44 frames, here it gets 81 mirrored ones."""
    length = 203
    segs = timeline_order(plan_segments(length))
    last = segs[-1]
    assert (last.index, last.start, last.padding) == (4, 242, 81)
    assert len(release_indices(4, length)) != N
    np.testing.assert_array_equal(segment_frame_indices(last, length), np.arange(163, 82, -1))


def test_base_with_long_padding_starts_at_its_own_position() -> None:
    """L = 122: base 2 must show frame 121 first; the release began 18 frames early, at 103."""
    length = 122
    base = timeline_order(plan_segments(length))[2]
    ours = segment_frame_indices(base, length)
    np.testing.assert_array_equal(ours[:4], [121, 121, 120, 119])
    assert release_indices(2, length)[0] == 103


def test_base_past_the_end_agrees_with_its_transition() -> None:
    """L = 101: the release fed base 2 forward frames 61..100 while transition 1 ended on mirrored ones."""
    length = 101
    line = timeline_order(plan_segments(length))
    transition, base = line[1], line[2]
    assert base.start >= length
    ours = segment_frame_indices(base, length)
    np.testing.assert_array_equal(ours[:TAIL], segment_frame_indices(transition, length)[-TAIL:])
    assert release_indices(2, length)[:TAIL] != release_indices(1, length)[-TAIL:]


def test_mirror_index_reflects_with_repeated_edges() -> None:
    np.testing.assert_array_equal(mirror_index(np.arange(12), 4), [0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3])
    assert int(mirror_index(5, 1)) == 0


@pytest.mark.parametrize("length", [1, 7, 80, 81, 82, 121, 141, 142, 150, 201, 202, 203, 242, 262, 263, 323, 324, 1000, 5001])
@pytest.mark.parametrize("pad", [True, False])
def test_plan_invariants(length: int, pad: bool) -> None:
    segs = plan_segments(length, pad=pad)
    kinds = [s.kind for s in segs]
    # generation order: the anchor, then bases left to right, then transitions left to right
    assert kinds[0] == ANCHOR
    assert kinds == [ANCHOR] + [BASE] * kinds.count(BASE) + [TRANSITION] * kinds.count(TRANSITION)
    assert [s.index for s in segs if s.kind == BASE] == sorted(s.index for s in segs if s.kind == BASE)
    line = timeline_order(segs)
    assert [s.index for s in line] == list(range(len(segs)))
    assert len(segs) % 2 == 1
    for seg in segs:
        assert seg.frames == N
        assert seg.kind == (TRANSITION if seg.index % 2 else seg.kind)
        idx = segment_frame_indices(seg, length)
        assert idx.shape == (N,) and idx.min() >= 0 and idx.max() < length
        in_range = np.arange(seg.start, seg.stop) < length
        np.testing.assert_array_equal(idx[in_range], np.arange(seg.start, seg.stop)[in_range])
        assert seg.padding == int((~in_range).sum())
    for prev, seg in itertools.pairwise(line):
        overlap = overlap_before(seg)
        assert overlap == (HEAD if seg.index % 2 else TAIL)
        assert prev.stop - seg.start == overlap
        # both segments are conditioned on the same driving frames where they overlap
        np.testing.assert_array_equal(segment_frame_indices(prev, length)[-overlap:], segment_frame_indices(seg, length)[:overlap])
    covered = covered_frames(segs)
    if pad:
        assert covered >= length
        assert output_frames(segs, length) == length
        # no wasted pair: one pair fewer would not reach the end (except when one segment is the minimum)
        assert len(segs) == 1 or covered - (2 * N - HEAD - TAIL) < length
    else:
        assert covered <= max(length, N)


def test_anchor_choice() -> None:
    segs = plan_segments(500, anchor=2)
    assert [(s.index, s.kind) for s in segs][:3] == [(2, ANCHOR), (0, BASE), (4, BASE)]
    with pytest.raises(InputError, match="anchor segment 3"):
        plan_segments(500, anchor=3)
    with pytest.raises(InputError, match="anchor segment 10"):
        plan_segments(500, anchor=10)


def test_bad_lengths() -> None:
    with pytest.raises(InputError, match="0 frames"):
        plan_segments(0)
    with pytest.raises(InputError, match="head and tail"):
        plan_segments(100, frames=41, head=21, tail=20)


def test_other_segment_geometry() -> None:
    """The same schedule with short segments (what tiny test runs use): 13 frames, head 5, tail 4."""
    segs = timeline_order(plan_segments(40, frames=13, head=5, tail=4))
    assert [(s.start, s.stop) for s in segs] == [(0, 13), (8, 21), (17, 30), (25, 38), (34, 47)]
    assert [overlap_before(s, 5, 4) for s in segs] == [0, 5, 4, 5, 4]


# --- K/V-sharing presets (the release README's table) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("shot", "steps", "blocks"),
    [("close-up", (0, 1), (34, 40)), ("half-body", (0, 2), (34, 40)), ("full-body", (0, 4), (32, 40)), ("distant", (0, 4), (30, 40))],
)
def test_presets_are_the_release_table_at_full_size(shot: str, steps: tuple[int, int], blocks: tuple[int, int]) -> None:
    kv = kv_share_ranges(shot, num_steps=25, num_blocks=40)
    assert (kv.steps, kv.blocks, kv.max_map_block) == (steps, blocks, 10)
    assert kv.step_list == list(range(*steps)) and kv.block_list == list(range(*blocks))


def test_preset_steps_are_step_indices_like_the_release_and_blocks_scale_to_shallower_models() -> None:
    # the release's -s 0 2 shares steps 0 and 1 whatever --num_inference_steps is
    assert kv_share_ranges("half-body", 8, 40).steps == (0, 2)
    assert kv_share_ranges("distant", 12, 40).steps == (0, 4)
    assert kv_share_ranges("close-up", 50, 40).steps == (0, 1)
    assert kv_share_ranges("full-body", 50, 40).step_list == [0, 1, 2, 3]
    # fewer steps than the preset: every step there is (the release's range simply runs out)
    assert kv_share_ranges("distant", 2, 40).steps == (0, 2)
    assert kv_share_ranges("half-body", 1, 40).steps == (0, 1)
    # a 4-block model: maps from block 0-1, sharing in the last block
    kv = kv_share_ranges("full-body", 25, 4)
    assert (kv.max_map_block, kv.blocks) == (1, (3, 4))
    # sharing always starts after the map blocks, even when scaling would overlap them
    assert kv_share_ranges("distant", 25, 2).blocks == (1, 2)


def test_preset_overrides_and_their_checks() -> None:
    kv = kv_share_ranges("close-up", 25, 40, steps=(0, 3), blocks=(20, 30))
    assert (kv.steps, kv.blocks) == ((0, 3), (20, 30))
    with pytest.raises(InputError, match="--kv-steps 0 30"):
        kv_share_ranges("close-up", 25, 40, steps=(0, 30))
    with pytest.raises(InputError, match="--kv-blocks 5 40: need 10 < start"):
        kv_share_ranges("close-up", 25, 40, blocks=(5, 40))
    with pytest.raises(InputError, match="--shot 'wide'"):
        kv_share_ranges("wide", 25, 40)


def _person(visible: list[int], top: float, bottom: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = np.zeros(133, np.float32)
    scores[visible] = 0.9
    return np.zeros((133, 2), np.float32), scores, np.array([100, top, 300, bottom], np.float32)


@pytest.mark.parametrize(
    ("visible", "top", "bottom", "shot"),
    [
        (list(range(17)), 100, 1200, "full-body"),
        (list(range(17)), 500, 1000, "distant"),
        (list(range(13)), 100, 1280, "half-body"),
        (list(range(7)), 200, 1280, "close-up"),
        ([0, 1, 2, 11, 16], 100, 1100, "full-body"),
    ],
)
def test_shot_from_visible_keypoints_and_height(visible: list[int], top: float, bottom: float, shot: str) -> None:
    assert classify_shot(*_person(visible, top, bottom), image_height=1280) == shot

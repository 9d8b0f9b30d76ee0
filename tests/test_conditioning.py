"""Conditioning layout of one segment (port.md §1.9): mask channels and head/tail frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from posegen_cli.errors import InputError
from posegen_cli.pipelines.conditioning import check_segment_frames, condition_mask, paste_head_tail, pixel_mask


def spec_mask(num_frames: int, head: int, tail: int) -> np.ndarray:
    """mask[c, t] = m_{p(t, c)} with p(0, c) = 0 and p(t, c) = 4t - 3 + c; m_p = 1 iff p < head or p >= F - tail."""
    latent_frames = (num_frames - 1) // 4 + 1
    out = np.zeros((4, latent_frames), dtype=np.float32)
    for t in range(latent_frames):
        for c in range(4):
            p = 0 if t == 0 else 4 * t - 3 + c
            out[c, t] = 1.0 if (p < head or p >= num_frames - tail) else 0.0
    return out


def test_transition_mask_marks_latent_frames_0_to_5_and_16_to_20():
    mask = condition_mask(81, 21, 20, 10, 6, torch.bfloat16)
    assert mask.shape == (4, 21, 10, 6) and mask.dtype == torch.bfloat16
    ones = [t for t in range(21) if bool((mask[:, t] == 1).all())]
    zeros = [t for t in range(21) if bool((mask[:, t] == 0).all())]
    assert ones == [0, 1, 2, 3, 4, 5, 16, 17, 18, 19, 20]
    assert zeros == list(range(6, 16))


@pytest.mark.parametrize(("head", "tail"), [(21, 20), (0, 0), (21, 0), (0, 20), (2, 3), (5, 7)])
def test_mask_matches_the_spec_formula(head, tail):
    mask = condition_mask(81, head, tail, 3, 2, torch.float32)
    expected = spec_mask(81, head, tail)
    for y in range(3):
        for x in range(2):
            np.testing.assert_array_equal(mask[:, :, y, x].numpy(), expected)


def test_base_segment_mask_is_all_zero_and_bad_lengths_fail():
    assert not condition_mask(81, 0, 0, 4, 4, torch.float32).any()
    assert not pixel_mask(81, 0, 0).any()
    assert pixel_mask(9, 2, 3).tolist() == [1, 1, 0, 0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="4k\\+1"):
        condition_mask(80, 0, 0, 4, 4, torch.float32)


def test_head_and_tail_frames_replace_the_ends_of_a_copy():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (81, 8, 6, 3), dtype=np.uint8)
    head = rng.integers(0, 256, (21, 8, 6, 3), dtype=np.uint8)
    tail = rng.integers(0, 256, (20, 8, 6, 3), dtype=np.uint8)
    before = frames.copy()
    out = paste_head_tail(frames, head, tail)
    np.testing.assert_array_equal(frames, before)
    np.testing.assert_array_equal(out[:21], head)
    np.testing.assert_array_equal(out[61:], tail)
    np.testing.assert_array_equal(out[21:61], frames[21:61])
    np.testing.assert_array_equal(paste_head_tail(frames, None, None), frames)
    np.testing.assert_array_equal(paste_head_tail(frames, None, tail[:0]), frames)


def test_head_frames_of_another_size_are_an_input_error():
    frames = np.zeros((81, 8, 6, 3), np.uint8)
    with pytest.raises(InputError, match="head frames have shape"):
        paste_head_tail(frames, np.zeros((21, 8, 8, 3), np.uint8), None)
    with pytest.raises(InputError, match="tail frames"):
        paste_head_tail(frames, None, np.zeros((82, 8, 6, 3), np.uint8))


def test_segment_frames_are_checked():
    check_segment_frames("pose frames", np.zeros((81, 16, 8, 3), np.uint8), 81, 16, 8)
    with pytest.raises(InputError, match="uint8 RGB"):
        check_segment_frames("pose frames", np.zeros((81, 16, 8, 3), np.float32), 81, 16, 8)
    with pytest.raises(InputError, match="needs 81 frames of 8x16"):
        check_segment_frames("hand frames", np.zeros((80, 16, 8, 3), np.uint8), 81, 16, 8)

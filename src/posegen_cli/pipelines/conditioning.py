"""The DiT's conditioning inputs of one segment (port.md §1.9): pose/hand pixels with head/tail frames, and the mask.

Transition segments get the neighbouring segments' generated frames pasted over the first ``head`` and last ``tail``
pose *and* hand frames before encoding; the 4 mask channels tell the model which pixel frames are given. The release
re-reads those frames from CRF-5 mp4 files; here they come straight from memory.
"""

from __future__ import annotations

import numpy as np
import torch

from posegen_cli.errors import InputError

MASK_CHANNELS = 4
"""One channel per pixel frame of a latent frame: the VAE compresses time by 4."""


def pixel_mask(num_frames: int, head: int, tail: int) -> np.ndarray:
    """m_p = 1 for the pixel frames given by the neighbours (the first ``head`` and the last ``tail``), else 0."""
    m = np.zeros(num_frames, dtype=np.float32)
    m[:head] = 1
    if tail:
        m[num_frames - tail :] = 1
    return m


def condition_mask(num_frames: int, head: int, tail: int, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Mask channels [4, (F+3)/4, height, width]: the first pixel frame repeated 4 times, then groups of 4 frames.

    Latent frame t, channel c reads pixel frame 0 for t = 0 and 4t-3+c after; the mask is constant over space.
    """
    if (num_frames - 1) % MASK_CHANNELS:
        raise ValueError(f"frame count must be 4k+1, got {num_frames}")
    m = pixel_mask(num_frames, head, tail)
    grouped = np.concatenate([np.repeat(m[:1], MASK_CHANNELS), m[1:]]).reshape(-1, MASK_CHANNELS).T
    mask = torch.from_numpy(np.ascontiguousarray(grouped))[:, :, None, None].expand(-1, -1, height, width)
    return mask.to(dtype).contiguous()


def paste_head_tail(frames: np.ndarray, head: np.ndarray | None, tail: np.ndarray | None) -> np.ndarray:
    """A copy of uint8 ``frames`` [F, H, W, 3] with ``head`` over the first frames and ``tail`` over the last ones."""
    out = frames.copy()
    for name, given in (("head", head), ("tail", tail)):
        if given is None:
            continue
        if given.ndim != 4 or given.shape[1:] != frames.shape[1:] or len(given) > len(frames):
            raise InputError(
                f"{name} frames have shape {tuple(given.shape)} but the segment's frames are {tuple(frames.shape)}; "
                "pass at most that many frames of the same size"
            )
        if name == "head":
            out[: len(given)] = given
        elif len(given):
            out[len(frames) - len(given) :] = given
    return out


def check_segment_frames(name: str, frames: np.ndarray, num_frames: int, height: int, width: int) -> None:
    """Raise an InputError unless ``frames`` is uint8 [num_frames, height, width, 3]."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise InputError(f"{name} must be uint8 RGB frames [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[0] != num_frames or frames.shape[1:3] != (height, width):
        raise InputError(
            f"{name} has {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]} (WxH); the segment needs "
            f"{num_frames} frames of {width}x{height} (frame it to the model size first)"
        )

"""Putting any frame into the model's 720x1280 portrait canvas exactly as the release does (port.md §4.6).

The release passes the reference image, the pose video and the hand video through
``torchvision.transforms.RandomResizedCrop((1280, 720), scale=(1, 1), ratio=(9/16, 9/16))`` (torchvision
0.20, v1 transforms, uint8 tensors). With a fixed area and a fixed aspect, that transform is a centre crop
to 9:16 followed by an antialiased bilinear resize. Reading torchvision's v1 ``_functional_tensor.resize``
shows that a uint8 tensor is first cast to float32, resized with
``interpolate(mode="bilinear", align_corners=False, antialias=True)``, then rounded half-to-even back to
uint8; the native uint8 kernel is only used by the v2 transforms. We reproduce the v1 path, because that
is what the release ran.

Keypoints go through the same crop and scale, so a skeleton drawn directly on the model canvas lands
where the cropped and resized frame puts the person.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from posegen_cli.report import Reporter

MODEL_SIZE = (1280, 720)
"""(height, width) of every frame the PoseGen model sees: portrait 9:16."""


def _float32_aspect(ratio: float) -> float:
    """``exp(log(ratio))`` in float32, the aspect torchvision's ``get_params`` really draws."""
    log_ratio = torch.log(torch.tensor([ratio], dtype=torch.float32))
    return float(torch.exp(log_ratio).item())


def crop_box_9x16(width: int, height: int, size: tuple[int, int] = MODEL_SIZE) -> tuple[int, int, int, int]:
    """The crop ``(x0, y0, w, h)`` that RandomResizedCrop(size, scale=(1, 1), ratio=(w/h, w/h)) takes.

    torchvision first tries ten times to fit a crop of the full area at the target aspect; with a
    degenerate scale and ratio range every try is the same, and it fits only when the frame is within a
    rounding step of the target aspect, in which case the offset is drawn at random from the (at most
    1 px) slack. Otherwise it falls back to a centre crop. We always take the centre offset, which is
    the release's result whenever it is deterministic and one of its possible results otherwise.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"crop_box_9x16 needs a positive frame size, got {width}x{height}")
    out_h, out_w = size
    ratio = out_w / out_h
    area = width * height
    aspect = _float32_aspect(ratio)
    w = round(math.sqrt(area * aspect))
    h = round(math.sqrt(area / aspect))
    if not (0 < w <= width and 0 < h <= height):
        in_ratio = float(width) / float(height)
        if in_ratio < ratio:
            w, h = width, round(width / ratio)
        elif in_ratio > ratio:
            w, h = round(height * ratio), height
        else:
            w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def frame_to_model(frame: np.ndarray, size: tuple[int, int] = MODEL_SIZE) -> np.ndarray:
    """Crop and resize RGB uint8 frames, (H, W, 3) or (F, H, W, 3), to ``size`` as the release does.

    Frames are resized one at a time so a long 1080p batch never needs gigabytes of float32.
    """
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim not in (3, 4) or frame.shape[-1] != 3:
        raise ValueError(f"frame_to_model needs uint8 RGB frames (H, W, 3) or (F, H, W, 3), got {frame.dtype} {frame.shape}")
    if frame.ndim == 4:
        return np.stack([frame_to_model(f, size) for f in frame]) if len(frame) else np.zeros((0, *size, 3), np.uint8)
    height, width = frame.shape[:2]
    x0, y0, w, h = crop_box_9x16(width, height, size)
    crop = frame[y0 : y0 + h, x0 : x0 + w]
    if (h, w) == tuple(size):
        return np.ascontiguousarray(crop)
    # Contiguous NCHW float32, the layout the release's rearrange(...).contiguous() hands torchvision; the
    # copy also frees decoder frames from their read-only buffers.
    tensor = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32)).unsqueeze(0)
    resized = F.interpolate(tensor, size=list(size), mode="bilinear", align_corners=False, antialias=True)
    return torch.round(resized).to(torch.uint8)[0].permute(1, 2, 0).contiguous().numpy()


def map_points_to_model(keypoints: np.ndarray, src_w: int, src_h: int, size: tuple[int, int] = MODEL_SIZE) -> np.ndarray:
    """Move pixel coordinates (..., 2) of a ``src_w`` x ``src_h`` frame into the model canvas.

    Coordinates are continuous with the frame's left/top edge at 0 (pixel i spans [i, i+1)), the
    convention under which the renderer's ``int()`` picks the pixel a point falls in; the resize then
    scales edges to edges, as ``align_corners=False`` does.
    """
    x0, y0, w, h = crop_box_9x16(src_w, src_h, size)
    out_h, out_w = size
    pts = np.asarray(keypoints, dtype=np.float64)
    mapped = np.empty_like(pts)
    mapped[..., 0] = (pts[..., 0] - x0) * (out_w / w)
    mapped[..., 1] = (pts[..., 1] - y0) * (out_h / h)
    return mapped.astype(np.float32)


def crop_warning(width: int, height: int, what: str, size: tuple[int, int] = MODEL_SIZE) -> str | None:
    """A one-line warning when framing ``what`` cuts pixels away, else None (a pure resize is fine)."""
    x0, y0, w, h = crop_box_9x16(width, height, size)
    if w == width and h == height:
        return None
    if w < width:
        where = f"{x0} px on the left and {width - w - x0} px on the right"
    else:
        where = f"{y0} px at the top and {height - h - y0} px at the bottom"
    out_h, out_w = size
    aspect = "9:16" if out_w * 16 == out_h * 9 else f"the {out_w}x{out_h} output's shape"
    return (
        f"{what} is {width}x{height}, not {aspect}: the model sees a {w}x{h} centre crop "
        f"({where} are cut); crop or pad it to {aspect} yourself to choose what stays"
    )


def warn_if_cropped(reporter: Reporter, width: int, height: int, what: str, size: tuple[int, int] = MODEL_SIZE) -> bool:
    """Tell the user when ``what`` loses pixels to the 9:16 framing; returns whether it does."""
    message = crop_warning(width, height, what, size)
    if message is not None:
        reporter.warn(message)
    return message is not None

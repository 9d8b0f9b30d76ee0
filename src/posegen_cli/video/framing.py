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

import cv2
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
    return _resize_like_release(frame[y0 : y0 + h, x0 : x0 + w], size)


def _resize_like_release(crop: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torchvision v1's uint8 resize: float32, antialiased bilinear, rounded half-to-even (module docstring)."""
    if crop.shape[:2] == tuple(size):
        return np.ascontiguousarray(crop)
    # Contiguous NCHW float32, the layout the release's rearrange(...).contiguous() hands torchvision; the
    # copy also frees decoder frames from their read-only buffers.
    tensor = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32)).unsqueeze(0)
    resized = F.interpolate(tensor, size=list(size), mode="bilinear", align_corners=False, antialias=True)
    return torch.round(resized).to(torch.uint8)[0].permute(1, 2, 0).contiguous().numpy()


PERSON_MARGIN = 0.08
"""Share of the person's box height kept free around the person when the framing has to move."""
EDGE_SLACK = 0.02
"""A person box within this share of a cut edge of the centre crop is taken as cut by it."""


def crosses_cut_edge(box: np.ndarray, width: int, height: int, size: tuple[int, int] = MODEL_SIZE) -> bool:
    """Whether a person box (x1, y1, x2, y2, source pixels) reaches an edge where the centre crop cuts the photo."""
    x0, y0, w, h = crop_box_9x16(width, height, size)
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    slack_x, slack_y = EDGE_SLACK * w, EDGE_SLACK * h
    return bool(
        (x0 > 0 and x1 <= x0 + slack_x) or (x0 + w < width and x2 >= x0 + w - slack_x)
        or (y0 > 0 and y1 <= y0 + slack_y) or (y0 + h < height and y2 >= y0 + h - slack_y)
    )  # fmt: skip


def person_crop_box(width: int, height: int, box: np.ndarray, size: tuple[int, int] = MODEL_SIZE) -> tuple[int, int, int, int]:
    """The 9:16 crop ``(x0, y0, w, h)`` that frames the person in ``box`` (x1, y1, x2, y2, source pixels).

    The rule: the release's centre crop size, moved to centre the person (their box plus ``PERSON_MARGIN``
    of its height on every side, limited to the photo) and kept inside the photo; if the person does not
    fit, the crop grows, still 9:16, until they do, and any part beyond the photo is padding. The crop may
    therefore start at negative coordinates or end past the photo.
    """
    _, _, w, h = crop_box_9x16(width, height, size)
    out_h, out_w = size
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    margin = PERSON_MARGIN * (y2 - y1)
    x1, y1, x2, y2 = max(0.0, x1 - margin), max(0.0, y1 - margin), min(float(width), x2 + margin), min(float(height), y2 + margin)
    if x2 - x1 > w or y2 - y1 > h:
        h = math.ceil(max(y2 - y1, (x2 - x1) * out_h / out_w))
        w = round(h * out_w / out_h)

    def place(start: float, end: float, length: int, limit: int) -> int:
        x = round((start + end) / 2 - length / 2)
        low, high = sorted((0, limit - length))  # inside the photo, or covering it when longer than it
        return int(min(max(x, low), high))

    return place(x1, x2, w, width), place(y1, y2, h, height), int(w), int(h)


def frame_with_box(frame: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int] = MODEL_SIZE, fill: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Crop RGB uint8 ``frame`` (H, W, 3) to ``box`` (x0, y0, w, h; parts beyond the frame are ``fill``) and resize it
    to ``size`` the way :func:`frame_to_model` does; the centre-crop box gives exactly :func:`frame_to_model`."""
    height, width = frame.shape[:2]
    x0, y0, w, h = box
    pad = (max(0, -y0), max(0, y0 + h - height), max(0, -x0), max(0, x0 + w - width))
    if any(pad):
        frame = cv2.copyMakeBorder(np.ascontiguousarray(frame), *pad, cv2.BORDER_CONSTANT, value=tuple(int(c) for c in fill))
        x0, y0 = x0 + pad[2], y0 + pad[0]
    return _resize_like_release(frame[y0 : y0 + h, x0 : x0 + w], size)


def map_points_with_box(keypoints: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int] = MODEL_SIZE) -> np.ndarray:
    """Pixel coordinates (..., 2) of the source frame moved into the canvas of :func:`frame_with_box` (float64)."""
    x0, y0, w, h = box
    out_h, out_w = size
    pts = np.asarray(keypoints, dtype=np.float64)
    return np.stack([(pts[..., 0] - x0) * (out_w / w), (pts[..., 1] - y0) * (out_h / h)], axis=-1)


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

"""The 9:16 framing rule against independent references written from torchvision 0.20 and PyTorch's AA kernel."""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np
import pytest
import torch

from posegen_cli.video.framing import crop_box_9x16, crop_warning, frame_to_model, map_points_to_model, warn_if_cropped
from posegen_cli.report import Reporter


def _torchvision_get_params(width: int, height: int, ratio: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params (v1, 0.20) with scale=(1, 1) and ratio=(r, r); returns (x0, y0, w, h)."""
    area = height * width
    log_ratio = torch.log(torch.tensor((ratio, ratio)))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(1.0, 1.0, generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=generator)).item()
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return j, i, w, h
    in_ratio = float(width) / float(height)
    if in_ratio < ratio:
        w, h = width, round(width / ratio)
    elif in_ratio > ratio:
        w, h = round(height * ratio), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


SIZES = [(720, 1280), (1080, 1920), (1920, 1080), (1280, 720), (1000, 1000), (640, 480), (480, 640), (368, 640), (360, 642)]
SIZES += [(720 + dx, 1280 + dy) for dx in range(-2, 3) for dy in range(-2, 3)]
SIZES += [(1080 + dx, 1920 + dy) for dx in range(-2, 3) for dy in range(-2, 3)]


@pytest.mark.parametrize("width,height", SIZES)
def test_crop_box_is_one_of_torchvision_outcomes(width: int, height: int) -> None:
    outcomes = set()
    for seed in range(12):
        outcomes.add(_torchvision_get_params(width, height, 720 / 1280, torch.Generator().manual_seed(seed)))
    box = crop_box_9x16(width, height)
    slack_x, slack_y = width - box[2], height - box[3]
    assert {o[2:] for o in outcomes} == {box[2:]}
    assert all(0 <= o[0] <= slack_x and 0 <= o[1] <= slack_y for o in outcomes)
    if max(slack_x, slack_y) >= 2:  # only the deterministic fallback leaves more than a rounding step
        assert outcomes == {box}
    assert box[0] == slack_x // 2 and box[1] == slack_y // 2


def test_crop_box_known_values() -> None:
    assert crop_box_9x16(720, 1280) == (0, 0, 720, 1280)
    assert crop_box_9x16(1080, 1920) == (0, 0, 1080, 1920)
    assert crop_box_9x16(1920, 1080) == (656, 0, 608, 1080)  # round(607.5) = 608, as Python rounds
    assert crop_box_9x16(1280, 720) == (437, 0, 405, 720)
    assert crop_box_9x16(1000, 1000) == (219, 0, 562, 1000)  # round(562.5) = 562
    assert crop_box_9x16(720, 1600) == (0, 160, 720, 1280)  # taller than 9:16: crop top and bottom
    with pytest.raises(ValueError, match="positive"):
        crop_box_9x16(0, 10)


def _aa_weights(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch's antialiased linear weights (the PIL triangle filter widened by the scale), in float64."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        for j in range(xmin, xmax):
            weights[i, j] = max(0.0, 1.0 - abs((j - center + 0.5) * invscale))
        weights[i] /= weights[i].sum()
    return weights


def _reference_frame_to_model(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre crop, AA bilinear resize in float64; returns the real-valued result before rounding."""
    x0, y0, w, h = _torchvision_get_params(frame.shape[1], frame.shape[0], size[1] / size[0], torch.Generator().manual_seed(0))
    crop = frame[y0 : y0 + h, x0 : x0 + w].astype(np.float64)
    wy, wx = _aa_weights(h, size[0]), _aa_weights(w, size[1])
    rows = np.einsum("oh,hwc->owc", wy, crop, optimize=True)
    return np.einsum("owc,pw->opc", rows, wx, optimize=True)


def _assert_rounds_like(result: np.ndarray, reference: np.ndarray) -> None:
    """Equal to round(reference) wherever the reference is not within float32 noise of a .5 tie."""
    near_tie = np.abs(reference - np.floor(reference) - 0.5) < 1e-3
    expected = np.clip(np.round(reference), 0, 255)
    assert result.dtype == np.uint8 and result.shape == reference.shape
    assert np.array_equal(result[~near_tie], expected[~near_tie].astype(np.uint8))
    assert np.abs(result.astype(np.float64) - expected).max() <= 1


@pytest.mark.parametrize("shape,size", [((90, 160, 3), (64, 36)), ((100, 50, 3), (64, 36)), ((30, 17, 3), (64, 36))])
def test_frame_to_model_matches_aa_bilinear_reference(shape: tuple[int, int, int], size: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, size=shape, dtype=np.uint8)
    _assert_rounds_like(frame_to_model(frame, size), _reference_frame_to_model(frame, size))


def test_frame_to_model_real_photo_upscaled_and_landscape(shared_data) -> None:
    photo = cv2.cvtColor(cv2.imread(str(shared_data / "reference_person.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(frame_to_model(photo), photo)  # already 720x1280: untouched, as torchvision returns it
    big = cv2.resize(photo, (1080, 1920), interpolation=cv2.INTER_CUBIC)
    _assert_rounds_like(frame_to_model(big), _reference_frame_to_model(big, (1280, 720)))
    landscape = np.ascontiguousarray(np.concatenate([photo, photo], axis=1)[:720])  # 1440x720
    out = frame_to_model(landscape)
    assert out.shape == (1280, 720, 3)
    _assert_rounds_like(out, _reference_frame_to_model(landscape, (1280, 720)))


def test_frame_to_model_batches_like_single_frames() -> None:
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, size=(3, 40, 90, 3), dtype=np.uint8)
    out = frame_to_model(frames, (32, 18))
    assert out.shape == (3, 32, 18, 3)
    for k in range(3):
        assert np.array_equal(out[k], frame_to_model(frames[k], (32, 18)))
    with pytest.raises(ValueError, match="uint8 RGB"):
        frame_to_model(frames.astype(np.float32))
    portrait = rng.integers(0, 256, size=(64, 36, 3), dtype=np.uint8)
    expected = frame_to_model(portrait, (32, 18))
    portrait.flags.writeable = False  # decoders hand out read-only buffers; torch must not be given them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(frame_to_model(portrait, (32, 18)), expected)


@pytest.mark.parametrize("width,height", [(1920, 1080), (1080, 1920), (720, 1600), (1000, 1000), (719, 1280)])
def test_points_follow_the_frame(width: int, height: int) -> None:
    """A bright dot drawn in the source frame is found where map_points_to_model puts its centre."""
    rng = np.random.default_rng(width + height)
    x0, y0, w, h = crop_box_9x16(width, height)
    for _ in range(3):
        cx = rng.uniform(x0 + 40, x0 + w - 40)
        cy = rng.uniform(y0 + 40, y0 + h - 40)
        frame = np.zeros((height, width, 3), np.uint8)
        ys, xs = np.mgrid[0:height, 0:width]
        blob = np.exp(-(((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2) / (2 * 12.0**2)))
        frame[...] = (blob * 255).round().astype(np.uint8)[..., None]
        out = frame_to_model(frame)[..., 0].astype(np.float64)
        oy, ox = np.mgrid[0:1280, 0:720]
        centroid = np.array([(out * (ox + 0.5)).sum(), (out * (oy + 0.5)).sum()]) / out.sum()
        mapped = map_points_to_model(np.array([[cx, cy]]), width, height)[0]
        assert np.abs(centroid - mapped).max() < 0.25


def test_map_points_keeps_shape_and_edges() -> None:
    pts = np.zeros((4, 133, 2), np.float32)
    pts[..., 0], pts[..., 1] = 656, 1080  # left edge of the 1920x1080 crop, bottom edge
    mapped = map_points_to_model(pts, 1920, 1080)
    assert mapped.shape == (4, 133, 2) and mapped.dtype == np.float32
    assert np.allclose(mapped[..., 0], 0) and np.allclose(mapped[..., 1], 1280)
    assert np.allclose(map_points_to_model(np.array([[1264.0, 540.0]]), 1920, 1080), [[720.0, 640.0]])


def test_crop_warnings() -> None:
    assert crop_warning(720, 1280, "reference image") is None
    assert crop_warning(1080, 1920, "driving video") is None  # resized only, nothing lost
    msg = crop_warning(1920, 1080, "driving video")
    assert msg is not None and "driving video is 1920x1080, not 9:16" in msg and "656 px on the left and 656 px on the right" in msg
    msg = crop_warning(720, 1600, "reference image")
    assert msg is not None and "160 px at the top and 160 px at the bottom" in msg
    msg = crop_warning(720, 1280, "reference image", (112, 64))  # a 64x112 output is not 9:16: name its shape
    assert msg is not None and "not the 64x112 output's shape" in msg and "9:16" not in msg
    reporter = Reporter(quiet=True)
    reporter.console.begin_capture()
    assert warn_if_cropped(reporter, 1280, 720, "hand video") is True
    assert warn_if_cropped(reporter, 720, 1280, "hand video") is False
    text = reporter.console.end_capture()
    assert text.count("warning:") == 1 and "hand video is 1280x720" in text

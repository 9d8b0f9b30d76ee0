"""Sapiens backend and RTMDet person boxes, with tiny TorchScript / state-dict stand-ins in the real file layout."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from posegen_cli.errors import InputError, MissingModelError, ResourceError
from posegen_cli.pose import detector as det
from posegen_cli.pose import sapiens as sp
from posegen_cli.pose.render import render_hand_normals
from posegen_cli.report import Reporter
from posegen_cli.video import load_image

MEAN = np.array([123.5, 116.5, 103.5], np.float32)
STD = np.array([58.5, 57.0, 57.5], np.float32)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def person(reference_image_path: Path) -> np.ndarray:
    return load_image(reference_image_path)


# --------------------------------------------------------------------------------------------------
# Stand-ins: same input/output shapes as the real TorchScript files


class PlantedHeatmaps(torch.nn.Module):
    """Returns fixed heatmaps for every input, so decoding can be checked against known peaks."""

    def __init__(self, heatmaps: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("planted", heatmaps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.planted.expand(x.shape[0], -1, -1, -1) + 0 * x[:, :1, :1, :1]


class MarkerHeatmaps(torch.nn.Module):
    """Heatmaps that peak wherever the input's red channel is bright: checks crop geometry end to end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = F.avg_pool2d(x[:, :1], 4)
        return ((red + 2.2) / 4.4).expand(-1, 133, -1, -1)


class ColourSeg(torch.nn.Module):
    """28 logits at stride 2: saturated red votes Left_Hand (5), green Right_Hand (14), blue Torso (21)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = F.avg_pool2d(x, 2)
        logits = torch.zeros(x.shape[0], 28, p.shape[2], p.shape[3]) - 1.0
        logits[:, 0] = 0.5
        total = p.sum(dim=1)
        for cls, channel in ((5, 0), (14, 1), (21, 2)):
            logits[:, cls] = 2 * p[:, channel] - total - 2
        return logits


class ColourNormals(torch.nn.Module):
    """Raw (unnormalised) 3-vectors at stride 2, varying with the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = F.avg_pool2d(x, 2)
        return torch.stack([p[:, 0] - 0.3, 0.5 * p[:, 1] + 0.1, -p[:, 2] - 0.7], dim=1)


def save_script(module: torch.nn.Module, path: Path, example: torch.Tensor | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, 1024, 768) if example is None else example
    torch.jit.save(torch.jit.trace(module.eval(), example), str(path))
    return path


def gaussian_maps(centers: np.ndarray, peaks: np.ndarray, sigma: float, size=(192, 256)) -> np.ndarray:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    maps = [p * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)) for (cx, cy), p in zip(centers, peaks)]
    return np.stack(maps).astype(np.float32)


class FixedBoxes:
    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = np.array(rows, np.float32).reshape(-1, 5)
        self.calls = 0

    def boxes(self, frames):
        self.calls += 1
        return [self.rows.copy() for _ in frames]


def expected_image_xy(hm_xy: np.ndarray, box: np.ndarray, frame_w: int, frame_h: int) -> np.ndarray:
    """pose.md §3.3 written out: padded box at the frame's aspect, heatmap -> 768x1024 -> frame pixels."""
    x1, y1, x2, y2 = box
    c = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    w, h = (x2 - x1) * 1.25, (y2 - y1) * 1.25
    a = frame_w / frame_h
    s = np.array([w, w / a]) if w > h * a else np.array([h * a, h])
    k_in = hm_xy / np.array([191.0, 255.0]) * np.array([768.0, 1024.0])
    return k_in / np.array([768.0, 1024.0]) * s + c - s / 2


# --------------------------------------------------------------------------------------------------
# Heatmap decoding


def test_decode_recovers_planted_subpixel_peaks() -> None:
    rng = np.random.default_rng(0)
    centers = np.column_stack([rng.uniform(10, 180, 133), rng.uniform(10, 245, 133)])
    peaks = rng.uniform(0.4, 1.2, 133)
    maps = gaussian_maps(centers, peaks, sigma=2.0)
    maps[7] = -0.01  # a keypoint the model saw nowhere
    keypoints, scores = sp.decode_heatmaps(maps)
    ok = np.arange(133) != 7
    assert np.abs(keypoints[ok] - centers[ok]).max() < 0.02
    np.testing.assert_array_equal(scores, maps.reshape(133, -1).max(axis=1))
    assert keypoints[7].tolist() == [-1.0, -1.0] and scores[7] < 0
    # Without refinement the error would be up to half a pixel: the refinement really runs.
    assert np.abs(np.round(centers[ok]) - centers[ok]).max() > 0.3


def test_decode_peak_at_border_stays_finite() -> None:
    maps = gaussian_maps(np.array([[0.0, 0.0], [191.0, 255.0]]), np.array([1.0, 0.8]), sigma=2.0)
    keypoints, scores = sp.decode_heatmaps(maps)
    assert np.isfinite(keypoints).all()
    assert np.abs(keypoints - [[0, 0], [191, 255]]).max() < 0.6
    np.testing.assert_allclose(scores, [1.0, 0.8], rtol=1e-6)


def dark_udp_reference(maps: np.ndarray) -> np.ndarray:
    """pose.md §3.3 step 2 on whole maps, in the lite demo's dtypes: float32 maps, float64 Newton step
    subtracted from the float32 argmax in float64 and rounded once."""
    k, h, w = maps.shape
    flat = maps.reshape(k, -1)
    ys, xs = np.unravel_index(flat.argmax(axis=1), (h, w))
    out = np.stack([xs, ys], axis=-1).astype(np.float32)
    for i in range(k):
        padded = np.zeros((h + 10, w + 10), np.float32)
        padded[5:-5, 5:-5] = maps[i]
        blurred = cv2.GaussianBlur(padded, (11, 11), 0)[5:-5, 5:-5]
        blurred = blurred * (maps[i].max() / blurred.max())
        lg = np.pad(np.log(np.clip(blurred, 1e-3, 50.0)), 1, mode="edge")
        y, x = ys[i] + 1, xs[i] + 1
        half, two = np.float32(0.5), np.float32(2)  # float32 like the demo's array arithmetic
        g = np.array([half * (lg[y, x + 1] - lg[y, x - 1]), half * (lg[y + 1, x] - lg[y - 1, x])])
        dxx = lg[y, x + 1] - two * lg[y, x] + lg[y, x - 1]
        dyy = lg[y + 1, x] - two * lg[y, x] + lg[y - 1, x]
        dxy = half * (lg[y + 1, x + 1] - lg[y, x + 1] - lg[y + 1, x] + lg[y, x] + lg[y, x] - lg[y, x - 1] - lg[y - 1, x] + lg[y - 1, x - 1])
        hess = np.array([[dxx, dxy], [dxy, dyy]], np.float32) + np.finfo(np.float32).eps * np.eye(2)
        out[i] = out[i] - np.einsum("mn,n->m", np.linalg.inv(hess), g)
    return out


def test_decode_is_bit_identical_to_the_whole_map_computation() -> None:
    # Rounding the Newton step to float32 before subtracting moved about 2% of the points by an ulp.
    rng = np.random.default_rng(4)
    for _ in range(3):
        maps = rng.normal(0, 0.05, (133, 256, 192)).astype(np.float32)
        maps += gaussian_maps(np.column_stack([rng.uniform(0, 191, 133), rng.uniform(0, 255, 133)]), rng.uniform(0.3, 1.2, 133), sigma=2.0)
        keypoints, _ = sp.decode_heatmaps(maps)
        np.testing.assert_array_equal(keypoints, dark_udp_reference(maps))


def test_box_centre_and_scale_keep_the_detector_float32() -> None:
    # The lite demo works on float32 arrays; NumPy 1 scalar arithmetic would have widened the scale to float64.
    box = np.array([10.3, 20.1, 200.7, 400.9], np.float32)
    center, scale = sp.box_center_scale(box, (1280, 720))
    assert center.dtype == np.float32 and scale.dtype == np.float32
    w, h = (box[2:] - box[:2]) * np.float32(1.25)
    assert w < h * np.float32(1280 / 720)  # tall: the width follows the height at the frame's aspect
    np.testing.assert_array_equal(scale, [h * np.float32(1280 / 720), h])
    np.testing.assert_array_equal(center, (box[:2] + box[2:]) * np.float32(0.5))
    # The whole-frame fallback box is integer, so like the release it works in float64.
    assert sp.box_center_scale(np.array([0, 0, 1280, 720]), (1280, 720))[1].dtype == np.float64


def test_crop_matches_the_udp_affine(person: np.ndarray) -> None:
    box = np.array([200.0, 300.0, 500.0, 900.0], np.float32)
    crop, center, scale = sp.crop_person(person, box)
    assert crop.shape == (1024, 768, 3) and crop.dtype == np.uint8
    np.testing.assert_allclose(center, [350.0, 600.0])
    # 750 tall x 375 wide after padding; the portrait frame aspect widens it to 750 * 720/1280.
    np.testing.assert_allclose(scale, [750 * 720 / 1280, 750.0], rtol=1e-6)
    h, w = person.shape[:2]
    sx, sy = (w - 1) / scale[0], (h - 1) / scale[1]
    m = np.float32([[sx, 0, sx * (scale[0] / 2 - center[0])], [0, sy, sy * (scale[1] / 2 - center[1])]])
    expected = cv2.resize(cv2.warpAffine(person, m, (w, h), flags=cv2.INTER_LINEAR), (768, 1024), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(crop, expected)


# --------------------------------------------------------------------------------------------------
# Pose backend through the real loading code


def pose_dir(models_dir: Path, size: str = "2b") -> Path:
    names = {"2b": "sapiens_2b_coco_wholebody_best_coco_wholebody_AP_745_torchscript.pt2",
             "0.3b": "sapiens_0.3b_coco_wholebody_best_coco_wholebody_AP_620_torchscript.pt2"}
    return models_dir / f"sapiens-pose-{size}" / "sapiens_lite_host" / "torchscript" / "pose" / "checkpoints" / f"sapiens_{size}" / names[size]


def test_pose_backend_decodes_planted_heatmaps_into_frame_pixels(tmp_path: Path, person: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    centers = np.column_stack([rng.uniform(8, 183, 133), rng.uniform(8, 247, 133)])
    peaks = rng.uniform(0.2, 1.0, 133)
    maps = gaussian_maps(centers, peaks, sigma=2.0)
    save_script(PlantedHeatmaps(torch.from_numpy(maps)), pose_dir(tmp_path))
    boxes = FixedBoxes([[100, 200, 600, 1100, 0.9], [0, 0, 100, 150, 0.5]])
    backend = sp.SapiensPoseBackend("2b", device="cpu", models_dir=tmp_path, batch_size=2, detector=boxes)
    frames = [person, person[:, ::-1].copy(), person]
    people = backend.detect(frames)
    assert [len(p) for p in people] == [2, 2, 2]
    h, w = person.shape[:2]
    for frame_people in people:
        assert [p.box_score for p in frame_people] == pytest.approx([0.9, 0.5])
        for p, row in zip(frame_people, boxes.rows):
            # float64 like the release's pose.pkl: no float32 rounding between decoding and rendering.
            assert p.keypoints.shape == (133, 2) and p.keypoints.dtype == np.float64
            center, scale = sp.box_center_scale(row[:4], (w, h))
            np.testing.assert_array_equal(p.keypoints, sp.heatmap_to_image(sp.decode_heatmaps(maps)[0], center, scale))
            np.testing.assert_array_equal(p.box, row[:4])
            np.testing.assert_allclose(p.scores, maps.reshape(133, -1).max(axis=1))
            expected = expected_image_xy(centers, row[:4].astype(np.float64), w, h)
            pixel_per_hm = (row[3] - row[1]) * 1.25 / 255
            assert np.abs(p.keypoints - expected).max() < 0.03 * pixel_per_hm


def test_pose_backend_finds_a_marker_through_the_real_crop(tmp_path: Path) -> None:
    save_script(MarkerHeatmaps(), pose_dir(tmp_path, "0.3b"))
    frame = np.zeros((1280, 720, 3), np.uint8)
    yy, xx = np.mgrid[0:1280, 0:720]
    marker = (410.0, 655.0)
    frame[..., 0] = (255 * np.exp(-((xx - marker[0]) ** 2 + (yy - marker[1]) ** 2) / (2 * 6.0**2))).astype(np.uint8)
    backend = sp.SapiensPoseBackend("0.3b", device="cpu", models_dir=tmp_path, detector=FixedBoxes([[250, 400, 560, 1000, 0.8]]))
    (pose,), = backend.detect([frame])
    assert np.abs(pose.keypoints - marker).max() < 1.5


class SwappingBoxes:
    """Two people, left and right, whose detector scores swap every frame (highest first, as RTMDet returns them)."""

    def __init__(self) -> None:
        self.frame = 0

    def boxes(self, frames):
        out = []
        for _ in frames:
            left, right = [8, 10, 40, 110], [56, 10, 88, 110]
            first, second = (left, right) if self.frame % 2 == 0 else (right, left)
            out.append(np.array([first + [0.9], second + [0.6]], np.float32))
            self.frame += 1
        return out


@pytest.mark.parametrize("track", [False, True])
def test_sapiens_backend_with_track_follows_one_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, track: bool) -> None:
    from posegen_cli.pose import extract as extract_module
    from posegen_cli.pose import stream as stream_module
    from posegen_cli.pose.settings import PoseOptions
    from posegen_cli.pose.keypoints import load_npz
    from posegen_cli.video import write_video

    maps = gaussian_maps(np.full((133, 2), (95.5, 127.5)), np.full(133, 0.9), sigma=2.0)
    script = save_script(PlantedHeatmaps(torch.from_numpy(maps)), tmp_path / "pose.pt2")
    backend = sp.SapiensPoseBackend(device="cpu", checkpoint=script, detector=SwappingBoxes(), reporter=Reporter(quiet=True))
    monkeypatch.setattr(stream_module, "make_pose_backend", lambda *args, **kwargs: backend)
    clip = write_video(tmp_path / "clip.mp4", [np.zeros((120, 96, 3), np.uint8)] * 6, 25, lossless=True)
    reporter = Reporter(quiet=True)
    reporter.console.begin_capture()
    options = PoseOptions(backend="sapiens", hand_normals="none", track=track, use_cache=False)
    result = extract_module.extract_pose(clip, tmp_path / "out", options, reporter=reporter)
    reporter.console.end_capture()
    on_left = load_npz(result.keypoints).keypoints[:, 0, 0] < 48
    # Tracking keeps the left person of frame 0; the release's choice, the top score, alternates.
    assert on_left.tolist() == ([True] * 6 if track else [True, False] * 3)


def test_batch_size_reaches_both_sapiens_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--batch-size`` goes from extract_pose through the backend factories into the Sapiens constructors."""
    from posegen_cli.pose import extract as extract_module
    from posegen_cli.pose.settings import PoseOptions
    from posegen_cli.pose.types import PersonPose
    from posegen_cli.video import write_video

    batch_sizes: dict[str, object] = {}

    class PoseStandIn:
        def __init__(self, *args: object, **kwargs: object) -> None:
            batch_sizes["pose"] = kwargs.get("batch_size", "not passed")

        def detect(self, frames):
            person = PersonPose(np.full((133, 2), 10.0), np.full(133, 0.9), np.array([0, 0, 20, 20], np.float32), 0.9)
            return [[person] for _ in frames]

    class NormalStandIn:
        def __init__(self, *args: object, **kwargs: object) -> None:
            batch_sizes["normal"] = kwargs.get("batch_size", "not passed")

        def normals_and_segmentation(self, frames):
            return [(np.zeros(f.shape, np.uint8), np.zeros(f.shape[:2], np.int64)) for f in frames]

    monkeypatch.setattr(sp, "SapiensPoseBackend", PoseStandIn)
    monkeypatch.setattr(sp, "SapiensNormalBackend", NormalStandIn)
    clip = write_video(tmp_path / "clip.mp4", [np.zeros((64, 48, 3), np.uint8)] * 4, 25)
    options = PoseOptions(backend="sapiens", hand_normals="sapiens", batch_size=3, use_cache=False)
    extract_module.extract_pose(clip, tmp_path / "out", options, reporter=Reporter(quiet=True))
    assert batch_sizes == {"pose": 3, "normal": 3}


def test_no_detection_falls_back_to_the_whole_frame(tmp_path: Path, person: np.ndarray) -> None:
    maps = gaussian_maps(np.full((133, 2), [96.0, 128.0]), np.full(133, 0.5), sigma=2.0)
    save_script(PlantedHeatmaps(torch.from_numpy(maps)), pose_dir(tmp_path))
    backend = sp.SapiensPoseBackend("2b", device="cpu", models_dir=tmp_path, detector=FixedBoxes([]))
    (only,), = backend.detect([person])
    np.testing.assert_array_equal(only.box, [0, 0, 720, 1280])
    assert only.box_score == 0.0
    # The heatmap centre maps to (about) the frame centre of the whole-frame box.
    np.testing.assert_allclose(only.keypoints, np.tile(expected_image_xy(np.array([96.0, 128.0]), np.array([0, 0, 720, 1280.0]), 720, 1280), (133, 1)), atol=0.05)


def test_pose_loading_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingModelError, match="sapiens-pose-2b"):
        sp.SapiensPoseBackend("2b", device="cpu", models_dir=tmp_path, detector=FixedBoxes([]))
    with pytest.raises(InputError, match="size '3b'"):
        sp.SapiensPoseBackend("3b", device="cpu", models_dir=tmp_path, detector=FixedBoxes([]))
    broken = pose_dir(tmp_path)
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a torchscript archive")
    with pytest.raises(MissingModelError, match="cannot be read as TorchScript"):
        sp.SapiensPoseBackend("2b", device="cpu", models_dir=tmp_path, detector=FixedBoxes([]))


def test_wrong_output_shape_is_reported(tmp_path: Path, person: np.ndarray) -> None:
    save_script(PlantedHeatmaps(torch.zeros(17, 64, 48)), pose_dir(tmp_path))
    backend = sp.SapiensPoseBackend("2b", device="cpu", models_dir=tmp_path, detector=FixedBoxes([]))
    with pytest.raises(MissingModelError, match=r"shape \(1, 17, 64, 48\), expected \(1, 133, 256, 192\)"):
        backend.detect([person])


def test_gpu_out_of_memory_becomes_resource_error(tmp_path: Path, person: np.ndarray) -> None:
    save_script(MarkerHeatmaps(), pose_dir(tmp_path))
    backend = sp.SapiensPoseBackend("2b", device="cpu", models_dir=tmp_path, detector=FixedBoxes([]))

    def exhausted(x: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    backend.model = exhausted
    with pytest.raises(ResourceError, match="ran out of memory running Sapiens pose on 1 images"):
        backend.detect([person])


# --------------------------------------------------------------------------------------------------
# Segmentation, normals and the hand video


def dense_dirs(models_dir: Path) -> None:
    save_script(ColourSeg(), models_dir / "sapiens-seg-1b" / "sapiens_1b_goliath_best_goliath_mIoU_7994_epoch_151_torchscript.pt2")
    save_script(ColourNormals(), models_dir / "sapiens-normal-2b" / "sapiens_2b_normal_render_people_epoch_70_torchscript.pt2")


def painted(person: np.ndarray) -> np.ndarray:
    frame = person.copy()
    frame[100:300, 50:250] = (255, 0, 0)
    frame[900:1100, 400:650] = (0, 255, 0)
    frame[500:700, 200:500] = (0, 0, 255)
    return frame


def reference_dense(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pose.md §2/§3.4 written out with the stand-ins: squash, normalise, run, upsample, argmax / encode."""
    x = (cv2.resize(frame, (768, 1024), interpolation=cv2.INTER_LINEAR).astype(np.float32) - MEAN) / STD
    x = torch.from_numpy(x).permute(2, 0, 1)[None]
    h, w = frame.shape[:2]
    logits = F.interpolate(ColourSeg()(x), size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
    vectors = F.interpolate(ColourNormals()(x), size=(h, w), mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)
    n = vectors / (np.linalg.norm(vectors, axis=-1, keepdims=True) + 1e-5)
    return ((n + 1) / 2 * 255).astype(np.uint8), logits


def test_dense_outputs_and_hand_video(tmp_path: Path, person: np.ndarray) -> None:
    dense_dirs(tmp_path)
    backend = sp.SapiensNormalBackend(device="cpu", models_dir=tmp_path, batch_size=2)
    frames = [painted(person), person]
    results = backend.normals_and_segmentation(frames)
    assert len(results) == 2
    for frame, (codes, seg) in zip(frames, results):
        ref_codes, ref_logits = reference_dense(frame)
        assert codes.shape == (1280, 720, 3) and codes.dtype == np.uint8
        assert seg.shape == (1280, 720) and seg.dtype == np.int64
        np.testing.assert_array_equal(codes, ref_codes)
        assert codes.max() <= 254
        top2 = np.sort(ref_logits, axis=0)[-2:]
        clear = (top2[1] - top2[0]) > 1e-4
        np.testing.assert_array_equal(seg[clear], ref_logits.argmax(axis=0)[clear])
    codes, seg = results[0]
    assert (seg[150:250, 100:200] == 5).all() and (seg[950:1050, 450:600] == 14).all() and (seg[550:650, 250:450] == 21).all()
    hand = render_hand_normals(codes, seg)
    mask = (seg == 5) | (seg == 14)
    np.testing.assert_array_equal(hand[mask], codes[mask])
    assert not hand[~mask].any()
    assert 0.7 * (200 * 200 + 200 * 250) < mask.sum() < 1.3 * (200 * 200 + 200 * 250)


def test_dense_landscape_frame_is_squashed_not_cropped(tmp_path: Path, person: np.ndarray) -> None:
    dense_dirs(tmp_path)
    backend = sp.SapiensNormalBackend(device="cpu", models_dir=tmp_path)
    frame = cv2.resize(painted(person), (640, 360), interpolation=cv2.INTER_AREA)
    ((codes, seg),) = backend.normals_and_segmentation([frame])
    ref_codes, ref_logits = reference_dense(frame)
    np.testing.assert_array_equal(codes, ref_codes)
    assert seg.shape == (360, 640)
    top2 = np.sort(ref_logits, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4
    np.testing.assert_array_equal(seg[clear], ref_logits.argmax(axis=0)[clear])


def test_backends_check_batch_size_and_warn_on_cpu(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--batch-size must be at least 1, got 0"):
        sp.SapiensPoseBackend(device="cpu", models_dir=tmp_path, batch_size=0)
    with pytest.raises(InputError, match="--batch-size must be at least 1, got 0"):
        sp.SapiensNormalBackend(device="cpu", models_dir=tmp_path, batch_size=0)
    save_script(PlantedHeatmaps(torch.zeros(1, 133, 256, 192)), pose_dir(tmp_path, "0.3b"))
    dense_dirs(tmp_path)
    reporter = Reporter()
    reporter.console.begin_capture()
    sp.SapiensPoseBackend("0.3b", device="cpu", models_dir=tmp_path, detector=FixedBoxes([]), reporter=reporter)
    sp.SapiensNormalBackend(device="cpu", models_dir=tmp_path, reporter=reporter)
    text = " ".join(reporter.console.end_capture().split())
    assert "Sapiens pose 0.3b runs on the CPU: expect tens of seconds to minutes per frame (use a GPU, or a lighter --backend)" in text
    assert "Sapiens seg 1b and normal 2b run on the CPU: expect tens of seconds to minutes per frame (use a GPU)" in text


def test_dense_loading_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingModelError, match="sapiens-seg-1b"):
        sp.SapiensNormalBackend(device="cpu", models_dir=tmp_path)
    with pytest.raises(InputError, match="seg model size '2b'"):
        sp.SapiensNormalBackend(seg_size="2b", device="cpu", models_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# RTMDet person boxes


def test_letterbox_rounds_like_mmcv_and_pads_with_114(person: np.ndarray) -> None:
    image, factors = det.letterbox(person)
    assert image.shape == (640, 640, 3)
    assert factors == (360 / 720, 640 / 1280)
    np.testing.assert_array_equal(image[:, :360], cv2.resize(person, (360, 640), interpolation=cv2.INTER_LINEAR))
    assert (image[:, 360:] == 114).all()
    odd = np.zeros((333, 501, 3), np.uint8)
    image, factors = det.letterbox(odd)
    assert factors == (640 / 501, int(333 * 640 / 501 + 0.5) / 333)
    assert (image[425:] == 114).all() and not image[:425].any()


def planted_head(hits: dict[int, list[tuple[int, int, float, tuple[float, float, float, float]]]]):
    """Per level, logits of -10 except planted (x, y, prob, distances l, t, r, b in pixels)."""
    scores, dists = [], []
    for level, stride in enumerate((8, 16, 32)):
        n = 640 // stride
        logit = torch.full((1, n, n), -10.0)
        dist = torch.full((4, n, n), 1.0)
        for x, y, prob, ltrb in hits.get(level, []):
            logit[0, y, x] = float(np.log(prob / (1 - prob)))
            dist[:, y, x] = torch.tensor(ltrb)
        scores.append(logit)
        dists.append(dist)
    return scores, dists


def test_decode_detections_planted_boxes() -> None:
    scores, dists = planted_head({
        0: [(20, 30, 0.9, (40.0, 80.0, 40.0, 100.0))],
        1: [(5, 5, 0.6, (200.0, 10.0, 30.0, 10.0))],  # runs off the left edge: clipped at 0
        2: [(19, 19, 0.04, (5.0, 5.0, 5.0, 5.0))],  # below the 0.05 score floor
    })
    out = det.decode_detections(scores, dists, (0.5, 0.5), (640, 640))
    assert out.shape == (2, 5)
    np.testing.assert_allclose(out[0], [(160 - 40) * 2, (240 - 80) * 2, (160 + 40) * 2, (240 + 100) * 2, 0.9], rtol=1e-5)
    np.testing.assert_allclose(out[1], [0, (80 - 10) * 2, (80 + 30) * 2, (80 + 10) * 2, 0.6], rtol=1e-5)


def test_decode_detections_keeps_the_best_hundred() -> None:
    rng = np.random.default_rng(2)
    probs = rng.uniform(0.1, 0.99, 150)
    hits = [(int(i % 80), int(i // 80), float(p), (4.0, 4.0, 4.0, 4.0)) for i, p in enumerate(probs)]
    scores, dists = planted_head({0: hits})
    out = det.decode_detections(scores, dists, (1.0, 1.0), (640, 640))
    assert len(out) == 100
    np.testing.assert_allclose(out[:, 4], np.sort(probs)[::-1][:100].astype(np.float32), rtol=1e-5)


def test_decode_detections_rescales_like_mmdet_scale_boxes() -> None:
    # mmdet 3 multiplies by float32(1 / (new_w / w)); dividing by float32(new_w / w) differs in the last bit here.
    sf = (640 / 1001, int(563 * 640 / 1001 + 0.5) / 563)
    x = next(float(v) for v in np.arange(100.25, 400.0, 0.25, dtype=np.float32)
             if np.float32(v) * np.float32(1 / sf[0]) != np.float32(v) / np.float32(sf[0]))  # fmt: skip
    scores, dists = planted_head({0: [(40, 40, 0.9, (320.0 - x, 10.0, x - 320.0 + 50.0, 10.0))]})
    out = det.decode_detections(scores, dists, sf, (640, 640))
    x1 = torch.tensor([320.0 - (320.0 - x)]) * torch.tensor([1 / sf[0]])
    assert out[0, 0] == x1.item()
    assert out[0, 0] != np.float32(x) / np.float32(sf[0])


def test_decode_detections_drops_empty_boxes_before_keeping_a_hundred() -> None:
    # mmdet filters zero-size boxes (min_bbox_size 0) before its sort and max_per_img cut, so 100 remain.
    hits = [(int(i % 70) + 1, int(i // 70) + 1, 0.5 + i * 1e-3, (4.0, 4.0, 4.0, 4.0)) for i in range(101)]
    hits.append((0, 10, 0.99, (5.0, 4.0, 0.0, 4.0)))  # the best score, but zero width once clipped at x = 0
    scores, dists = planted_head({0: hits})
    out = det.decode_detections(scores, dists, (1.0, 1.0), (640, 640))
    assert len(out) == 100
    assert out[0, 4] < 0.99


def test_detector_runs_in_float32_without_autocast(tmp_path: Path, person: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    # PoseGen runs mmdet's detector outside any autocast; only the pose model sits inside one.
    ckpt = tiny_rtmdet_checkpoint(tmp_path / "tiny.pth", cls_bias=4.0)
    found = det.RTMDetPersonDetector(device="cpu", checkpoint=ckpt, deepen=0.33, widen=0.125)
    requested = []
    real = torch.autocast

    def recording(*args, **kwargs):
        requested.append(kwargs.get("dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording)
    found.boxes([person])
    assert [d for d in requested if d not in (None, torch.float32)] == []


def iou_plus_one(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = iw * ih
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area_a + area_b - inter)


def test_select_person_boxes_threshold_and_nms() -> None:
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 500, (60, 2))
    wh = rng.uniform(20, 200, (60, 2))
    dets = np.column_stack([xy, xy + wh, rng.uniform(0, 1, 60)]).astype(np.float32)
    kept = det.select_person_boxes(dets)
    # Independent greedy reference.
    cand = sorted((d for d in dets if d[4] > 0.3), key=lambda d: -d[4])
    ref = []
    for d in cand:
        if all(iou_plus_one(d, r) <= 0.3 for r in ref):
            ref.append(d)
    np.testing.assert_array_equal(kept, np.array(ref))
    assert det.select_person_boxes(dets[:0]).shape == (0, 5)
    assert det.select_person_boxes(np.array([[0, 0, 10, 10, 0.3]], np.float32)).shape == (0, 5)


def tiny_rtmdet_checkpoint(path: Path, cls_bias: float) -> Path:
    torch.manual_seed(0)
    model = det.RTMDet(deepen=0.33, widen=0.125)
    with torch.no_grad():
        for conv in model.bbox_head.rtm_cls:
            conv.weight.zero_()
            conv.bias.fill_(cls_bias)
        for conv in model.bbox_head.rtm_reg:
            conv.weight.mul_(0.01)
            conv.bias.fill_(float(np.log(3.0)))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"mmdet_version": "3.0.0"}, "state_dict": model.state_dict()}, path)
    return path


def test_rtmdet_keys_follow_mmdet_naming() -> None:
    keys = set(det.RTMDet().state_dict())
    for key in (
        "backbone.stem.2.bn.running_var",
        "backbone.stage1.1.blocks.0.conv2.depthwise_conv.conv.weight",
        "backbone.stage1.1.attention.fc.bias",
        "backbone.stage4.1.conv2.conv.weight",
        "backbone.stage4.2.final_conv.bn.weight",
        "neck.reduce_layers.1.conv.weight",
        "neck.top_down_blocks.0.blocks.1.conv1.conv.weight",
        "neck.downsamples.1.bn.running_mean",
        "neck.out_convs.2.conv.weight",
        "bbox_head.cls_convs.2.1.conv.weight",
        "bbox_head.reg_convs.1.0.bn.bias",
        "bbox_head.rtm_cls.0.bias",
        "bbox_head.rtm_reg.2.weight",
    ):
        assert key in keys, key
    assert det.RTMDet().state_dict()["bbox_head.rtm_cls.0.weight"].shape == (1, 192, 1, 1)
    assert det.RTMDet().state_dict()["backbone.stage4.0.conv.weight"].shape == (768, 384, 3, 3)


@pytest.mark.parametrize(("deepen", "widen", "millions"), [(0.33, 0.5, 8.89), (0.67, 0.75, 24.71)])
def test_rtmdet_parameter_count_matches_mmdet(deepen: float, widen: float, millions: float) -> None:
    """mmdet's model zoo lists RTMDet-s 8.89M and RTMDet-m 24.71M parameters (80 classes, shared head convs once)."""
    model = det.RTMDet(deepen, widen, num_classes=80)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


def test_rtmdet_detector_from_models_dir(tmp_path: Path, person: np.ndarray) -> None:
    ckpt = tiny_rtmdet_checkpoint(tmp_path / "sapiens-detector" / det.DETECTOR_FILE, cls_bias=4.0)
    found = det.RTMDetPersonDetector(device="cpu", models_dir=tmp_path, deepen=0.33, widen=0.125)
    (rows,) = found.boxes(np.stack([person]))
    assert len(rows) >= 1 and rows.dtype == np.float32
    assert (rows[:, 4] > 0.3).all() and (np.diff(rows[:, 4]) <= 0).all()
    assert (rows[:, :2] >= 0).all() and (rows[:, 2] <= 640 / (360 / 720)).all() and (rows[:, 3] <= 1280).all()
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            assert iou_plus_one(rows[i], rows[j]) <= 0.3
    tiny_rtmdet_checkpoint(ckpt, cls_bias=-8.0)
    none = det.RTMDetPersonDetector(device="cpu", checkpoint=ckpt, deepen=0.33, widen=0.125)
    assert none.boxes([person])[0].shape == (0, 5)


def test_rtmdet_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingModelError, match="sapiens-detector"):
        det.RTMDetPersonDetector(device="cpu", models_dir=tmp_path)
    ckpt = tiny_rtmdet_checkpoint(tmp_path / "tiny.pth", cls_bias=0.0)
    with pytest.raises(MissingModelError, match="does not match RTMDet-m"):
        det.load_rtmdet(ckpt, torch.device("cpu"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(MissingModelError, match="cannot be read"):
        det.load_rtmdet(bad, torch.device("cpu"))

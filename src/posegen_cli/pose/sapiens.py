"""Sapiens extraction as PoseGen runs it: RTMDet person boxes, 133-point top-down pose, Goliath part
segmentation and surface normals, all from the fp32 TorchScript checkpoints (pose.md §3).

The pre- and post-processing reproduce the Sapiens lite demo's quirks on purpose (frame-aspect crops,
rounded normalisation constants, whole-frame squash for the dense models), because PoseGen's LoRA was
trained on what that code produced.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from posegen_cli.errors import InputError, MissingModelError, OptionError, option, out_of_memory_as
from posegen_cli.hub import MODELS, model_path
from posegen_cli.pose.render import encode_normals
from posegen_cli.pose.types import NUM_KEYPOINTS, PersonPose
from posegen_cli.report import Reporter

MODEL_INPUT_SIZE = (768, 1024)
"""(W, H) of every Sapiens model input."""
HEATMAP_SIZE = (192, 256)
"""(W, H) of the pose heatmaps (stride 4)."""
DENSE_OUTPUT_SIZE = (384, 512)
"""(W, H) of the raw seg logits and normal vectors (stride 2)."""
LITE_MEAN = (123.5, 116.5, 103.5)
LITE_STD = (58.5, 57.0, 57.5)
"""RGB normalisation of the lite demo (rounded; training used the ImageNet values)."""
BOX_PADDING = 1.25
BLUR_KERNEL = 11
NUM_SEG_CLASSES = 28


def _sizes(task: str) -> tuple[str, ...]:
    """The sizes the hub table lists for ``sapiens-<task>-<size>``, smallest first."""
    prefix = f"sapiens-{task}-"
    return tuple(name.removeprefix(prefix) for name in MODELS if name.startswith(prefix))


POSE_SIZES = _sizes("pose")
SEG_SIZES = _sizes("seg")
NORMAL_SIZES = _sizes("normal")


@dataclass(frozen=True)
class SapiensCheckpoint:
    """Where one TorchScript file sits: the model name in the hub table and its path inside that repo."""

    name: str
    relpath: str


def pose_checkpoint(size: str) -> SapiensCheckpoint:
    """The 133-point checkpoints live only in noahcao/sapiens-pose-coco, under the lite host tree."""
    return _checkpoint("pose", size, POSE_SIZES)


def seg_checkpoint(size: str) -> SapiensCheckpoint:
    return _checkpoint("seg", size, SEG_SIZES)


def normal_checkpoint(size: str) -> SapiensCheckpoint:
    return _checkpoint("normal", size, NORMAL_SIZES)


def _checkpoint(task: str, size: str, sizes: tuple[str, ...]) -> SapiensCheckpoint:
    """The file is the hub entry's one download pattern, so the two tables cannot drift apart."""
    _check_size(task, size, sizes)
    name = f"sapiens-{task}-{size}"
    return SapiensCheckpoint(name, MODELS[name].allow_patterns[0])


def _check_size(task: str, size: str, sizes: tuple[str, ...]) -> None:
    if size not in sizes:
        raise InputError(f"Sapiens {task} model size {size!r} does not exist (use one of {', '.join(sizes)})")


def resolve_checkpoint(checkpoint: SapiensCheckpoint, models_dir: str | Path | None = None) -> Path:
    """The local file of ``checkpoint`` through the model registry (downloads when allowed)."""
    path = model_path(checkpoint.name, models_dir) / checkpoint.relpath
    if not path.is_file():
        raise MissingModelError(f"{checkpoint.name}: {path} is missing (run `posegen download {checkpoint.name}` again)")
    return path


def load_torchscript(path: str | Path, device: torch.device) -> torch.jit.ScriptModule:
    """Load a Sapiens ``*_torchscript.pt2`` (a ``torch.jit`` archive, fp32) in eval mode on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise MissingModelError(f"Sapiens checkpoint not found: {path} (run `posegen download` for the sapiens models)")
    try:
        module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MissingModelError(f"Sapiens checkpoint {path} cannot be read as TorchScript: {reason} (delete it and download it again)") from None
    return module.eval()


def _check_output(out: torch.Tensor, n: int, channels: int, size: tuple[int, int], what: str) -> None:
    """The output shapes come from the configs, not from a run; a mismatch means a wrong file."""
    expected = (n, channels, size[1], size[0])
    if tuple(out.shape) != expected:
        raise MissingModelError(f"the Sapiens {what} model returned shape {tuple(out.shape)}, expected {expected} (wrong checkpoint file?)")


def _out_of_memory_message(what: str, batch: int) -> str:
    """What to lower when Sapiens ``what`` runs out of GPU memory."""
    return f"the GPU ran out of memory running Sapiens {what} on {batch} images at once (lower the batch size or pick a smaller model size)"


def _backend_device(
    device: torch.device | str, batch_size: int, reporter: Reporter | None, what: str, alternative: str = ""
) -> torch.device:
    """The device a backend runs on, after checking its batch size; the CPU gets a warning, it takes minutes per frame."""
    if batch_size < 1:
        raise OptionError("batch_size", batch_size, problem=f"must be at least 1, got {batch_size}")
    resolved = torch.device(device)
    if resolved.type == "cpu":
        (reporter or Reporter()).warn(f"Sapiens {what} on the CPU: expect tens of seconds to minutes per frame (use a GPU{alternative})")
    return resolved


def _normalise_batch(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB to the float32 (N, 3, H, W) input, normalised on the target device."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    mean = torch.tensor(LITE_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(LITE_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------------
# Pose: crop, heatmap decoding


def box_center_scale(box: np.ndarray, frame_size: tuple[int, int], padding: float = BOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """Centre and padded size of a box, widened to the *frame's* aspect ratio (the lite demo's rule).

    Every step is an array operation, as in the lite demo, so a float32 detector box keeps float32
    (NumPy 1 would widen scalar steps to float64 and shift the warp matrix and keypoints by an ulp).
    """
    box = np.asarray(box)
    center = np.array([box[0] + box[2], box[1] + box[3]]) * 0.5
    size = np.array([box[2] - box[0], box[3] - box[1]]) * padding
    box_w, box_h = size[:1], size[1:]
    width, height = frame_size
    aspect = width / height
    scale = np.concatenate([box_w, box_w / aspect] if box_w[0] > (box_h * aspect)[0] else [box_h * aspect, box_h])
    return center, scale


def udp_warp_matrix(center: np.ndarray, scale: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
    """Unbiased (UDP) affine matrix, rotation 0, mapping the scaled box onto ``output_size`` (W, H)."""
    sx = (output_size[0] - 1) / scale[0]
    sy = (output_size[1] - 1) / scale[1]
    m = np.zeros((2, 3), dtype=np.float32)
    m[0, 0] = sx
    m[0, 2] = sx * (-0.5 * (center[0] * 2) + 0.5 * scale[0])
    m[1, 1] = sy
    m[1, 2] = sy * (-0.5 * (center[1] * 2) + 0.5 * scale[1])
    return m


def crop_person(frame: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 1024x768 uint8 model input for one box, plus the centre and scale that decoding maps back with.

    Warps at the frame's own size first and then stretches to 768x1024, as Sapiens lite does.
    """
    height, width = frame.shape[:2]
    center, scale = box_center_scale(box, (width, height))
    warped = cv2.warpAffine(frame, udp_warp_matrix(center, scale, (width, height)), (width, height), flags=cv2.INTER_LINEAR)
    crop = cv2.resize(warped, MODEL_INPUT_SIZE, interpolation=cv2.INTER_LINEAR)
    return crop, center, scale


def _blur_keep_max(heatmap: np.ndarray, kernel: int) -> np.ndarray:
    """Gaussian blur with zero padding, rescaled so the peak height stays the same."""
    border = (kernel - 1) // 2
    h, w = heatmap.shape
    padded = np.zeros((h + 2 * border, w + 2 * border), dtype=np.float32)
    padded[border:-border, border:-border] = heatmap
    blurred = cv2.GaussianBlur(padded, (kernel, kernel), 0)[border:-border, border:-border]
    return blurred * (heatmap.max() / blurred.max())


def decode_heatmaps(heatmaps: np.ndarray, kernel: int = BLUR_KERNEL) -> tuple[np.ndarray, np.ndarray]:
    """DARK-UDP decoding of (K, H, W) heatmaps: sub-pixel (x, y) in heatmap pixels and the raw peak values.

    Clipping, log and edge padding are elementwise, so they are applied to the 3x3 neighbourhood of each
    peak only (clamped indices are the edge padding): the same numbers as the full-map computation at
    two thirds of the cost. The dtypes are the lite demo's (float32 maps, a float64 Newton step that is
    subtracted in float64 and rounded once), which makes the result bit-identical to it.
    Keypoints whose peak is not positive get location (-1, -1) without refinement (the release reads
    arbitrary memory there; their score keeps them from being drawn either way).
    """
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    k, h, w = heatmaps.shape
    flat = heatmaps.reshape(k, -1)
    idx = flat.argmax(axis=1)
    scores = flat[np.arange(k), idx]
    ys, xs = np.unravel_index(idx, (h, w))
    keypoints = np.stack([xs, ys], axis=-1).astype(np.float32)
    valid = scores > 0
    keypoints[~valid] = -1
    if not valid.any():
        return keypoints, scores

    sel = np.flatnonzero(valid)
    offsets = np.array([-1, 0, 1])
    rows = np.clip(ys[sel, None] + offsets, 0, h - 1)
    cols = np.clip(xs[sel, None] + offsets, 0, w - 1)
    near = np.stack([_blur_keep_max(heatmaps[i], kernel)[np.ix_(r, c)] for i, r, c in zip(sel, rows, cols)])
    near = np.log(np.clip(near, 1e-3, 50.0))
    centre = near[:, 1, 1]
    right, left = near[:, 1, 2], near[:, 1, 0]
    down, up = near[:, 2, 1], near[:, 0, 1]
    down_right, up_left = near[:, 2, 2], near[:, 0, 0]
    gradient = np.stack([0.5 * (right - left), 0.5 * (down - up)], axis=-1)[..., None]
    dxx = right - 2 * centre + left
    dyy = down - 2 * centre + up
    dxy = 0.5 * (down_right - right - down + centre + centre - left - up + up_left)
    hessian = np.stack([dxx, dxy, dxy, dyy], axis=-1).reshape(-1, 2, 2)
    inverse = np.linalg.inv(hessian + np.finfo(np.float32).eps * np.eye(2))
    keypoints[sel] -= (inverse @ gradient)[..., 0]
    return keypoints, scores


def heatmap_to_image(keypoints: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Heatmap pixels to source-frame pixels (UDP scaling, then the box; keeps the lite demo's half-pixel bias)."""
    hm_w, hm_h = HEATMAP_SIZE
    in_size = np.array(MODEL_INPUT_SIZE, dtype=np.float64)
    model_px = keypoints / np.array([hm_w - 1, hm_h - 1], dtype=np.float64) * in_size
    return model_px / in_size * scale + center - 0.5 * scale


class PersonDetector(Protocol):
    """Person boxes per RGB frame: (n, 5) float32 rows x1, y1, x2, y2, score, highest score first."""

    def boxes(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]: ...


class SapiensPoseBackend:
    """PoseGen's keypoint extractor: detector boxes, then Sapiens COCO-WholeBody heatmaps per box."""

    name = "sapiens"

    def __init__(
        self,
        model_size: str = "2b",
        device: torch.device | str = "cpu",
        models_dir: str | Path | None = None,
        batch_size: int = 8,
        *,
        detector: PersonDetector | None = None,
        checkpoint: str | Path | None = None,
        reporter: Reporter | None = None,
    ) -> None:
        self.device = _backend_device(device, batch_size, reporter, f"pose {model_size} runs", f", or a lighter {option('backend')}")
        self.batch_size = batch_size
        path = Path(checkpoint) if checkpoint is not None else resolve_checkpoint(pose_checkpoint(model_size), models_dir)
        self.model = load_torchscript(path, self.device)
        if detector is None:
            from posegen_cli.pose.detector import RTMDetPersonDetector

            detector = RTMDetPersonDetector(device=str(self.device), models_dir=models_dir)
        self.detector = detector

    @torch.inference_mode()
    def heatmaps(self, crops: np.ndarray) -> np.ndarray:
        """Raw heatmaps (N, 133, 256, 192) float32 for uint8 crops (N, 1024, 768, 3), N <= batch size: what a benchmark times."""
        with out_of_memory_as(_out_of_memory_message("pose", len(crops))):
            result = self.model(_normalise_batch(crops, self.device))
        _check_output(result, len(crops), NUM_KEYPOINTS, HEATMAP_SIZE, "pose")
        return result.float().cpu().numpy()

    def detect(self, frames: Sequence[np.ndarray]) -> list[list[PersonPose]]:
        """People per frame, detector order; a frame without boxes gets the whole frame as its one box (score 0).

        Crops of all frames are batched together, and decoded batch by batch to bound memory.
        """
        detections = self.detector.boxes(frames)
        jobs: list[tuple[int, np.ndarray]] = []
        for i, (frame, found) in enumerate(zip(frames, detections)):
            height, width = frame.shape[:2]
            rows = found if len(found) else np.array([[0, 0, width, height, 0]])
            jobs.extend((i, row) for row in rows)
        people: list[list[PersonPose]] = [[] for _ in frames]
        # OpenCV and NumPy release the GIL, so threads spread cropping and decoding over the CPU cores.
        with ThreadPoolExecutor(max_workers=min(self.batch_size, os.cpu_count() or 1)) as pool:
            for start in range(0, len(jobs), self.batch_size):
                batch = jobs[start : start + self.batch_size]
                crops = list(pool.map(lambda job: crop_person(frames[job[0]], job[1][:4]), batch))
                heatmaps = self.heatmaps(np.stack([crop for crop, _, _ in crops]))
                decoded = list(pool.map(decode_heatmaps, heatmaps))
                for (i, row), (_, center, scale), (keypoints, scores) in zip(batch, crops, decoded):
                    people[i].append(
                        PersonPose(
                            keypoints=heatmap_to_image(keypoints, center, scale),  # float64, as the release pickles them
                            scores=scores,
                            box=np.asarray(row[:4], dtype=np.float32),
                            box_score=float(row[4]),
                        )
                    )
        return people


# ---------------------------------------------------------------------------------------------------
# Segmentation and normals


def dense_input(frame: np.ndarray) -> np.ndarray:
    """The whole frame squashed to 768x1024 (no aspect kept, no crop), uint8 RGB."""
    return cv2.resize(frame, MODEL_INPUT_SIZE, interpolation=cv2.INTER_LINEAR)


def segmentation_from_logits(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Class ids (H, W) int64: logits upsampled bilinearly to the frame first, argmaxed at full size."""
    up = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return up.argmax(dim=0).cpu().numpy().astype(np.int64)


def normal_codes_from_output(vectors: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) normal codes, the release's ``normal.npy`` frame: upsample, unit length (+1e-5), truncate."""
    up = F.interpolate(vectors[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return encode_normals(up.cpu().numpy().transpose(1, 2, 0))


class SapiensNormalBackend:
    """Surface normals and Goliath body parts for the hand video (pose.md §2 and §3.4)."""

    name = "sapiens"

    def __init__(
        self,
        seg_size: str = "1b",
        normal_size: str = "2b",
        device: torch.device | str = "cpu",
        models_dir: str | Path | None = None,
        batch_size: int = 8,
        *,
        seg_checkpoint_path: str | Path | None = None,
        normal_checkpoint_path: str | Path | None = None,
        reporter: Reporter | None = None,
    ) -> None:
        self.device = _backend_device(device, batch_size, reporter, f"seg {seg_size} and normal {normal_size} run")
        self.batch_size = batch_size
        seg_path = Path(seg_checkpoint_path) if seg_checkpoint_path is not None else resolve_checkpoint(seg_checkpoint(seg_size), models_dir)
        normal_path = (
            Path(normal_checkpoint_path) if normal_checkpoint_path is not None else resolve_checkpoint(normal_checkpoint(normal_size), models_dir)
        )
        self.seg_model = load_torchscript(seg_path, self.device)
        self.normal_model = load_torchscript(normal_path, self.device)

    @torch.inference_mode()
    def raw_outputs(self, inputs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Seg logits (N, 28, 512, 384) and normal vectors (N, 3, 512, 384) on the device, for uint8 (N, 1024, 768, 3)."""
        logits, vectors = [], []
        for start in range(0, len(inputs), self.batch_size):
            x = _normalise_batch(inputs[start : start + self.batch_size], self.device)
            with out_of_memory_as(_out_of_memory_message("seg and normal", len(x))):
                seg = self.seg_model(x)
                normal = self.normal_model(x)
            _check_output(seg, len(x), NUM_SEG_CLASSES, DENSE_OUTPUT_SIZE, "seg")
            _check_output(normal, len(x), 3, DENSE_OUTPUT_SIZE, "normal")
            logits.append(seg)
            vectors.append(normal)
        return torch.cat(logits), torch.cat(vectors)

    @torch.inference_mode()
    def normals_and_segmentation(self, frames: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per frame: uint8 normal codes (H, W, 3) as in the release's normal.npy, and class ids (H, W) int64."""
        results = []
        for start in range(0, len(frames), self.batch_size):
            chunk = frames[start : start + self.batch_size]
            logits, vectors = self.raw_outputs(np.stack([dense_input(f) for f in chunk]))
            for frame, seg, normal in zip(chunk, logits, vectors):
                size = frame.shape[:2]
                results.append((normal_codes_from_output(normal, size), segmentation_from_logits(seg, size)))
        return results

"""Quality A/B of the speed presets: the same segment rendered with ``exact`` and each other preset.

For each preset: the segment time (denoising and decoding, the ``segments`` phase of ``animate``) and the difference
from ``exact``: PSNR and SSIM over frames, and pose agreement (PCK: the share of body keypoints, confident in both
outputs, that lie within 5 % of the person's box diagonal of each other) from re-extracting keypoints of both
outputs with posegen's pose backend. With real weights this is how to decide whether ``turbo`` is good enough
for your footage; without them (``--models-dir`` of ``python -m posegen_cli.testing make-tiny-models``) it shows
that the harness works.

    python benchmarks/quality_ab.py REF.png DRIVING.mp4 [--presets fast,turbo] [--models-dir DIR] [--device auto]
        [--resolution 720x1280] [--pose-backend auto] [--json out.json]

Only the first segment (81 driving frames by default) is rendered, so every preset denoises the same frames.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from posegen_cli.choices import SPEED_PRESETS
from posegen_cli.longvideo import AnimateOptions, animate
from posegen_cli.pose.keypoints import load_npz
from posegen_cli.report import Reporter
from posegen_cli.video import iter_frames, probe_video, write_video

BODY = slice(0, 17)
"""COCO-WholeBody's 17 body keypoints: what pose agreement compares (faces and hands are too small to judge)."""
PCK_FRACTION = 0.05
KEYPOINT_SCORE = 0.3


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 frames (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of the luma of two uint8 RGB frames: Wang et al. 2004, Gaussian window sigma 1.5 (11x11),
    C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2."""
    import cv2

    weights = np.array([0.299, 0.587, 0.114])
    x, y = (frame.astype(np.float64) @ weights for frame in (a, b))

    def blur(image: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(image, (11, 11), 1.5)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    return float(np.mean(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))))


def pose_agreement(a: Path, b: Path) -> float | None:
    """PCK@0.05 between two ``keypoints.npz`` (None when no body keypoint is confident in both)."""
    ta, tb = load_npz(a), load_npz(b)
    frames = min(len(ta.keypoints), len(tb.keypoints))
    ka, kb = ta.keypoints[:frames, BODY], tb.keypoints[:frames, BODY]
    both = (ta.scores[:frames, BODY] >= KEYPOINT_SCORE) & (tb.scores[:frames, BODY] >= KEYPOINT_SCORE)
    if not both.any():
        return None
    span = np.where(both[..., None], ka, np.nan)
    diagonal = np.linalg.norm(np.nanmax(span, axis=1) - np.nanmin(span, axis=1), axis=-1)
    distance = np.linalg.norm(ka - kb, axis=-1)
    hits = distance <= PCK_FRACTION * np.maximum(diagonal[:, None], 1.0)
    return float(hits[both].mean())


def compare(exact: Path, other: Path) -> dict[str, float]:
    """Mean and minimum per-frame PSNR and SSIM of ``other`` against ``exact``."""
    psnrs, ssims = [], []
    for a, b in zip(iter_frames(exact), iter_frames(other), strict=True):
        psnrs.append(psnr(a, b))
        ssims.append(ssim(a, b))
    finite = [p for p in psnrs if np.isfinite(p)]
    return {
        "psnr_db": round(float(np.mean(finite)), 3) if finite else float("inf"),
        "psnr_min_db": round(float(min(psnrs)), 3),
        "ssim": round(float(np.mean(ssims)), 5),
        "ssim_min": round(float(min(ssims)), 5),
    }


def one_segment(driving: Path, out: Path, frames: int) -> Path:
    """The first ``frames`` frames of ``driving`` (one segment), silent, near-lossless."""
    info = probe_video(driving)
    if info.frame_count < frames:
        raise SystemExit(f"{driving} has {info.frame_count} frames; one segment needs {frames}")
    return write_video(out, iter_frames(driving, 0, frames), info.fps, crf=0)


def _keypoints(video: Path, out_dir: Path, options: dict[str, Any]) -> Path | None:
    """``keypoints.npz`` of a rendered video with the job's pose backend; None when nobody is found in it."""
    from posegen_cli.errors import InputError
    from posegen_cli.pose.extract import extract_pose
    from posegen_cli.pose.settings import PoseOptions

    extra = {k: options[k] for k in ("device", "models_dir") if k in options}
    pose_options = PoseOptions(backend=options.get("pose_backend", "auto"), use_cache=False, **extra)
    try:
        result = extract_pose(video, out_dir, pose_options, reporter=Reporter(quiet=True))
    except InputError:
        return None
    return result.keypoints


def run(
    reference: Path,
    driving: Path,
    *,
    presets: tuple[str, ...] = ("fast", "turbo"),
    work: Path | None = None,
    steps: int | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Render one segment with ``exact`` and each of ``presets``; per preset its time and difference from exact.

    ``options``: further :class:`AnimateOptions` fields shared by every run (models_dir, device, resolution, ...);
    ``steps`` overrides the step count of undistilled presets only (a distilled schedule has fixed steps).
    """
    unknown = [p for p in presets if p not in SPEED_PRESETS or p == "exact"]
    if unknown:
        raise SystemExit(f"unknown preset(s) {unknown}: choose from {[p for p in SPEED_PRESETS if p != 'exact']}")
    shared = {"crf": 0, "audio": False, **(options or {})}
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        folder = Path(scratch)
        clip = one_segment(driving, folder / "segment.mp4", int(shared.get("segment_frames", 81)))
        outputs, rows = {}, {}
        for preset in ("exact", *presets):
            distilled = SPEED_PRESETS[preset].distill is not None
            settings = AnimateOptions(**shared, speed=preset, steps=None if distilled else steps)
            output = folder / f"{preset}.mp4"
            result = animate(reference, clip, output, options=settings, reporter=Reporter(quiet=True))
            summary = result.summary()
            outputs[preset] = output
            rows[preset] = {
                "segment_seconds": round(result.phases["segments"], 3),
                "steps": summary["steps"],
                "guidance": summary["guidance"],
                "approximations": summary["approximations"],
            }
        keypoints = {name: _keypoints(path, folder / f"{name}_pose", shared) for name, path in outputs.items()}
        exact_seconds = rows["exact"]["segment_seconds"]
        for preset in presets:
            rows[preset].update(compare(outputs["exact"], outputs[preset]))
            found = keypoints["exact"] is not None and keypoints[preset] is not None
            rows[preset]["pose_pck"] = pose_agreement(keypoints["exact"], keypoints[preset]) if found else None
            rows[preset]["speedup"] = round(exact_seconds / max(rows[preset]["segment_seconds"], 1e-9), 3)
    return {"reference": str(reference), "driving": str(driving), "presets": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("driving", type=Path)
    parser.add_argument("--presets", default="fast,turbo", help="comma-separated presets to compare with exact")
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resolution", default="720x1280")
    parser.add_argument("--pose-backend", default="auto")
    parser.add_argument("--prompt", help="caption of the reference (skips captioning)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    options = {"device": args.device, "resolution": args.resolution, "pose_backend": args.pose_backend, "prompt": args.prompt}
    if args.models_dir is not None:
        options["models_dir"] = args.models_dir
    figures = run(args.reference, args.driving, presets=tuple(p for p in args.presets.split(",") if p), options=options)
    for preset, row in figures["presets"].items():
        quality = "" if preset == "exact" else (
            f"  PSNR {row['psnr_db']} dB  SSIM {row['ssim']}  pose PCK {row['pose_pck']}  speed-up {row['speedup']}x"
        )  # fmt: skip
        print(f"{preset:6s} {row['segment_seconds']:9.2f} s  {row['steps']} steps{quality}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

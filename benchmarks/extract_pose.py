"""Frames per second of `posegen extract-pose` per backend and resolution.

Builds a moving driving clip from ``../shared/data/reference_person.png`` at each resolution, then
times (a) the bare detector and (b) the whole command: decode, detect, render pose/hand/overlay,
encode, write keypoints. MediaPipe runs everywhere; Sapiens only with a CUDA GPU and its checkpoints
(``--models-dir`` or ``$POSEGEN_MODELS_DIR``).

    python benchmarks/extract_pose.py --frames 240 --sizes 720x1280 360x640
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from posegen_cli.errors import PosegenError
from posegen_cli.device import resolve_device
from posegen_cli.pose.backends import make_pose_backend
from posegen_cli.pose.extract import extract_pose
from posegen_cli.pose.settings import PoseOptions
from posegen_cli.report import Reporter
from posegen_cli.video import iter_frames, load_image, write_video

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference_person.png"


def make_clip(path: Path, width: int, height: int, frames: int) -> Path:
    """The photo swaying and drifting: a slow rotation and shift, so trackers have real motion to follow."""
    image = cv2.resize(load_image(REFERENCE), (width, height), interpolation=cv2.INTER_AREA)
    centre = (width / 2, height / 2)

    def frame(t: int) -> np.ndarray:
        m = cv2.getRotationMatrix2D(centre, 4 * np.sin(t / 15), 1.0 + 0.05 * np.sin(t / 40))
        m[:, 2] += (0.03 * width * np.sin(t / 20), 0.02 * height * np.cos(t / 25))
        return cv2.warpAffine(image, m, (width, height), borderMode=cv2.BORDER_REFLECT)

    return write_video(path, (frame(t) for t in range(frames)), 30)


def time_detector(backend: str, clip: Path, models_dir: Path | None) -> float:
    """Frames/s of the detector alone on frames already in memory."""
    frames = list(iter_frames(clip))
    detector = make_pose_backend(backend, device=resolve_device("auto"), models_dir=models_dir)
    try:
        detector.detect(frames[:2])  # warm-up: graph/model initialisation
        start = time.perf_counter()
        for i in range(0, len(frames), 8):
            detector.detect(frames[i : i + 8])
        return len(frames) / (time.perf_counter() - start)
    finally:
        close = getattr(detector, "close", None)
        if callable(close):
            close()


def time_end_to_end(backend: str, clip: Path, out: Path, models_dir: Path | None) -> tuple[float, int]:
    start = time.perf_counter()
    result = extract_pose(clip, out, PoseOptions(backend=backend, use_cache=False, models_dir=models_dir), reporter=Reporter(quiet=True))
    return result.frame_count / (time.perf_counter() - start), result.frame_count


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--sizes", nargs="+", default=["720x1280", "360x640"], help="WxH")
    parser.add_argument("--backends", nargs="+", default=["mediapipe", "sapiens"])
    parser.add_argument("--models-dir", type=Path, default=None)
    args = parser.parse_args()

    print(f"hardware: {hardware()}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'backend':<10} {'size':>10} {'frames':>6} {'detector fps':>13} {'end-to-end fps':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            width, height = (int(v) for v in size.split("x"))
            clip = make_clip(Path(tmp) / f"clip_{size}.mp4", width, height, args.frames)
            for backend in args.backends:
                if backend == "sapiens" and not torch.cuda.is_available():
                    print(f"{backend:<10} {size:>10} skipped: needs a CUDA GPU")
                    continue
                try:
                    bare = time_detector(backend, clip, args.models_dir)
                    full, count = time_end_to_end(backend, clip, Path(tmp) / f"out_{backend}_{size}", args.models_dir)
                except PosegenError as exc:
                    print(f"{backend:<10} {size:>10} skipped: {exc}")
                    continue
                print(f"{backend:<10} {size:>10} {count:>6} {bare:>13.1f} {full:>15.1f}")


if __name__ == "__main__":
    main()

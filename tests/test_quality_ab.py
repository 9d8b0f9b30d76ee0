"""``benchmarks/quality_ab.py`` on the tiny models: every preset renders the same segment and is compared with exact."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from animate_inputs import TEST_OPTIONS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality_ab

from posegen_cli.pose.extract import extract_pose
from posegen_cli.pose.keypoints import load_npz, save_npz
from posegen_cli.pose.settings import PoseOptions


def test_quality_ab_reports_time_and_difference_per_preset(
    tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path
) -> None:
    options = {k: v for k, v in TEST_OPTIONS.items() if k != "steps"} | {"models_dir": tiny_models, "work_dir": tmp_path / "work"}
    figures = quality_ab.run(reference_image_path, driving_clip, presets=("fast", "turbo"), work=tmp_path, steps=6, options=options)
    rows = figures["presets"]
    assert list(rows) == ["exact", "fast", "turbo"]
    assert (rows["exact"]["steps"], rows["fast"]["steps"], rows["turbo"]["steps"]) == (6, 6, 4)  # fast: MagCache skips steps 2-4
    assert rows["exact"]["approximations"] == "none (release-exact)"
    for preset in ("fast", "turbo"):
        row = rows[preset]
        assert row["segment_seconds"] > 0 and row["speedup"] > 0
        assert math.isfinite(row["psnr_db"]) and 0 < row["psnr_db"] < 100 and -1 <= row["ssim_min"] <= row["ssim"] < 1
        assert row["pose_pck"] is None or 0 <= row["pose_pck"] <= 1
    assert rows["turbo"]["psnr_db"] != rows["fast"]["psnr_db"], "the distillation LoRA changes the frames"


def test_metrics_on_known_cases(tmp_path: Path, driving_clip: Path) -> None:
    frame = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    assert quality_ab.psnr(frame, frame) == math.inf and quality_ab.ssim(frame, frame) == pytest.approx(1.0)
    noisy = np.clip(frame.astype(int) + 16, 0, 255).astype(np.uint8)
    assert 20 < quality_ab.psnr(frame, noisy) < 30 and quality_ab.ssim(frame, noisy) < 1
    keypoints = extract_pose(driving_clip, tmp_path / "pose", PoseOptions(backend="mediapipe")).keypoints
    assert quality_ab.pose_agreement(keypoints, keypoints) == 1.0
    track = load_npz(keypoints)
    moved = dataclasses.replace(track, keypoints=track.keypoints + np.array([track.width * 0.2, 0.0]))
    assert quality_ab.pose_agreement(keypoints, save_npz(moved, tmp_path / "moved.npz")) == 0.0

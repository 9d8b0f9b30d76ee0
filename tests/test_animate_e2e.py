"""``animate`` end to end on tiny random models: a real photo, a driving clip with sound, MediaPipe poses."""

from __future__ import annotations

import json
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from animate_inputs import TEST_OPTIONS

from posegen_cli.cache import cache_root
from posegen_cli.errors import InputError, MissingModelError, ResourceError
from posegen_cli.longvideo import AnimateOptions, animate, engine, plan_animate
from posegen_cli.longvideo.merge import merge_segments
from posegen_cli.longvideo.options import PREVIEW_SIZE, PREVIEW_STEPS, resolve_settings
from posegen_cli.longvideo.plan import overlap_before, plan_segments, timeline_order
from posegen_cli.models import PoseGenTransformer3DModel
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline
from posegen_cli.pose import backends as backends_module
from posegen_cli.pose import extract as extract_module
from posegen_cli.report import Reporter
from posegen_cli.video import iter_frames, probe_video, write_video

torch.set_num_threads(1)


def counted(monkeypatch: pytest.MonkeyPatch, modules: list[object], name: str) -> list[object]:
    """Wrap the function ``name`` in each of ``modules`` so every call's first argument is recorded in one list."""
    calls: list[object] = []
    for module in modules:
        real = getattr(module, name)

        def wrapper(first: object, *args: object, real: Callable[..., Any] = real, **kwargs: object) -> Any:
            calls.append(first)
            return real(first, *args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return calls


def test_animate_end_to_end(
    tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "result.mp4"
    options = AnimateOptions(**TEST_OPTIONS, models_dir=tiny_models, keep_intermediates=True, crf=1)
    # --shot auto, the reference framing and pose alignment all need the reference person: one detector for all of
    # them; the driving video is decoded to count its frames
    detections = counted(monkeypatch, [backends_module], "reference_detector")
    probes = counted(monkeypatch, [engine, extract_module], "probe_video")
    passes = counted(monkeypatch, [PoseGenTransformer3DModel], "forward")
    result = animate(reference_image_path, driving_clip, output, options=options, reporter=Reporter(quiet=True))
    assert len(detections) == 1 and probes == [driving_clip]

    # --dry-run planned exactly this: the segments in this order, these K/V ranges, this many transformer passes
    plan = plan_animate(driving_clip, options=options, reporter=Reporter(quiet=True))
    assert [seg.index for seg in plan.segments] == result.computed
    assert (tuple(plan.kv["steps"]), tuple(plan.kv["blocks"])) == (result.kv.steps, result.kv.blocks)
    assert plan.passes == len(passes) == 5 * options.steps * 2

    info = probe_video(output)
    assert (info.width, info.height) == (64, 112)
    assert info.frame_count == 36 == probe_video(driving_clip).frame_count
    assert info.fps == Fraction(12)
    assert info.has_audio and result.audio
    decoded = np.stack(list(iter_frames(output)))
    assert decoded.shape == (36, 112, 64, 3)

    # the reference is cut at the knees: the half-body preset (steps 0-1 as in the release), blocks fitted to the 2-block tiny model
    assert result.shot == "half-body"
    assert (result.kv.steps, result.kv.blocks) == ((0, 2), (1, 2))
    assert result.subject == "man"
    assert result.computed == [0, 2, 4, 1, 3] and result.reused == []
    summary = result.summary()
    assert summary["frames"] == 36 and summary["segments"] == 5 and summary["output"] == str(output)
    assert {"inputs", "pose", "prompt", "load models", "segments", "merge + encode"} <= set(summary["seconds"])
    assert summary["peak_gpu_memory_gb"] is None
    assert (summary["kv_steps"], summary["kv_blocks"]) == ("0-2", "1-2")  # the --kv-steps/--kv-blocks syntax
    assert summary["kv_placement"].startswith("gpu (kv)")  # tiny K/V: all of it stays where it is made

    # the video is the cross-fade of the stored segments, trimmed to the driving length; compared in luma, which
    # 4:2:0 H.264 keeps at full resolution (the tiny models' output is per-pixel colour noise)
    assert result.work_dir is not None
    line = timeline_order(plan_segments(36, 13, 5, 4))
    segments = [np.load(result.work_dir / f"segment-{seg.index:04d}.npy") for seg in line]
    assert all(s.shape == (13, 112, 64, 3) and s.dtype == np.uint8 for s in segments)
    merged = merge_segments(segments, [overlap_before(seg, 5, 4) for seg in line], 36)
    luma = np.array([0.299, 0.587, 0.114])
    error = np.abs(decoded @ luma - merged @ luma).mean(axis=(1, 2))
    assert error.max() < 3

    # --no-audio changes no segment: everything is reused, and the output is silent
    silent = tmp_path / "silent.mp4"
    options_silent = AnimateOptions(**TEST_OPTIONS, models_dir=tiny_models, audio=False, crf=1)
    again = animate(reference_image_path, driving_clip, silent, options=options_silent, reporter=Reporter(quiet=True))
    assert again.computed == [] and len(again.reused) == 5
    assert not probe_video(silent).has_audio and not again.audio
    np.testing.assert_array_equal(np.stack(list(iter_frames(silent))), decoded)
    # without --keep-intermediates the work folder is removed once the video is written
    assert again.work_dir is None and not result.work_dir.exists()


def test_driving_video_without_a_person(tmp_path: Path, reference_image_path: Path, tiny_models: Path) -> None:
    empty = write_video(tmp_path / "empty.mp4", [np.full((64, 36, 3), 90, np.uint8)] * 6, 12)
    output = tmp_path / "out.mp4"
    options = AnimateOptions(**TEST_OPTIONS, models_dir=tiny_models)
    with pytest.raises(InputError, match="nobody was found"):
        animate(reference_image_path, empty, output, options=options, reporter=Reporter(quiet=True))
    assert not output.exists() and not list(tmp_path.glob(".out*"))


def test_bad_inputs_fail_before_any_work(tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path) -> None:
    out = tmp_path / "out.mp4"

    def run(reference: Path, driving: Path, output: Path = out, **changes: object) -> None:
        options = AnimateOptions(**{**TEST_OPTIONS, "models_dir": tiny_models, **changes})
        animate(reference, driving, output, options=options, reporter=Reporter(quiet=True))

    not_image = tmp_path / "photo.png"
    not_image.write_text("not an image")
    with pytest.raises(InputError, match="photo.png"):
        run(not_image, driving_clip)
    with pytest.raises(InputError, match="driving video not found"):
        run(reference_image_path, tmp_path / "missing.mp4")
    with pytest.raises(InputError, match="no video stream|cannot decode"):
        run(reference_image_path, not_image)
    with pytest.raises(InputError, match=r"must end in \.mp4"):
        run(reference_image_path, driving_clip, tmp_path / "out.avi")
    with pytest.raises(InputError, match="would overwrite the input"):
        run(reference_image_path, driving_clip, driving_clip)
    with pytest.raises(InputError, match="multiples of 16"):
        run(reference_image_path, driving_clip, resolution="100x200")
    with pytest.raises(InputError, match="--kv-steps"):
        run(reference_image_path, driving_clip, kv_steps="two")
    with pytest.raises(InputError, match="anchor segment 1"):
        run(reference_image_path, driving_clip, anchor=1)
    empty_models = tmp_path / "no-models"
    empty_models.mkdir()
    with pytest.raises(MissingModelError, match="wan-i2v-720p"):
        run(reference_image_path, driving_clip, models_dir=empty_models)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-models", "photo.png"]
    assert not (cache_root() / "animate").exists()


def test_out_of_disk_space_fails_before_any_work(
    tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "available_bytes", lambda folder: 1000)
    output = tmp_path / "out.mp4"
    options = AnimateOptions(**TEST_OPTIONS, models_dir=tiny_models)
    # five segments of 13 frames at 64x112 RGB
    with pytest.raises(ResourceError, match=rf"need {5 * 13 * 112 * 64 * 3 / 1024**3:.1f} GB .* --work-dir"):
        animate(reference_image_path, driving_clip, output, options=options, reporter=Reporter(quiet=True))
    assert not output.exists()


def test_gpu_out_of_memory_suggests_offload(
    tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = PoseGenPipeline._denoise
    calls = []

    def denoise_then_oom(self: PoseGenPipeline, *args: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.55 GiB")
        return real(self, *args)

    monkeypatch.setattr(PoseGenPipeline, "_denoise", denoise_then_oom)
    output = tmp_path / "out.mp4"
    options = AnimateOptions(**TEST_OPTIONS, models_dir=tiny_models, shot="half-body")
    with pytest.raises(ResourceError, match="out of memory.*--offload"):
        animate(reference_image_path, driving_clip, output, options=options, reporter=Reporter(quiet=True))
    assert not output.exists() and not list(tmp_path.iterdir())
    # the anchor finished before the failure and is kept for the next run
    (work,) = (cache_root() / "animate").iterdir()
    assert sorted(p.name for p in work.glob("segment-*.npy")) == ["segment-0000.npy"]


def test_preview_caps_size_and_steps() -> None:
    job = resolve_settings(AnimateOptions(preview=True))
    assert (job.height, job.width, job.steps) == (*PREVIEW_SIZE, PREVIEW_STEPS)
    assert PREVIEW_SIZE[0] * 9 == PREVIEW_SIZE[1] * 16 and PREVIEW_SIZE[0] % 16 == PREVIEW_SIZE[1] % 16 == 0
    assert resolve_settings(AnimateOptions(preview=True, steps=4)).steps == 4
    # a landscape job previews in landscape; a job already smaller than the preview keeps its size
    landscape = resolve_settings(AnimateOptions(preview=True, resolution="1280x720"))
    assert (landscape.height, landscape.width) == PREVIEW_SIZE[::-1]
    small = resolve_settings(AnimateOptions(preview=True, resolution="256x448"))
    assert (small.height, small.width) == (448, 256)
    square = resolve_settings(AnimateOptions(preview=True, resolution="1024x1024"))
    assert (square.height, square.width) == (384, 384)
    full = resolve_settings(AnimateOptions())
    assert (full.height, full.width, full.steps, full.kv_steps) == (1280, 720, 25, None)
    assert resolve_settings(AnimateOptions(kv_steps="0-4", kv_blocks="30-40")).kv_blocks == (30, 40)


def test_default_quality_is_the_release_quality() -> None:
    """The release saves with imageio quality 9, which imageio-ffmpeg turns into libx264 ``-crf int((1 - 9/10) * 51)``."""
    assert AnimateOptions().crf == int((1 - 9 / 10) * 51) == 5


def test_cli_animate_json(tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path) -> None:
    """``posegen animate --json``: one 81-frame segment (mirror-padded past the 36 driving frames), trimmed back to 36."""
    from typer.testing import CliRunner

    from posegen_cli.cli import app

    output = tmp_path / "cli.mp4"
    args = [
        "animate", str(reference_image_path), str(driving_clip), "-o", str(output), "--prompt", TEST_OPTIONS["prompt"],
        "--resolution", "64x112", "--steps", "2", "--models-dir", str(tiny_models), "--device", "cpu",
        "--pose-backend", "mediapipe", "--shot", "full-body", "--no-audio", "--json", "--quiet",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output"] == str(output) and summary["frames"] == 36 and summary["segments"] == 1
    assert summary["shot"] == "full-body" and summary["audio"] is False
    info = probe_video(output)
    assert info.frame_count == 36 and not info.has_audio


def test_turbo_with_a_cache_runs_end_to_end_and_reports_its_approximations(
    tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path
) -> None:
    settings = {k: v for k, v in TEST_OPTIONS.items() if k != "steps"}
    options = AnimateOptions(**settings, models_dir=tiny_models, speed="turbo", cache="fbc", shot="full-body")
    result = animate(reference_image_path, driving_clip, tmp_path / "turbo.mp4", options=options, reporter=Reporter(quiet=True))
    summary = result.summary()
    assert probe_video(tmp_path / "turbo.mp4").frame_count == probe_video(driving_clip).frame_count
    assert (summary["speed"], summary["steps"], summary["guidance"], summary["kv_steps"]) == ("turbo", 4, 1.0, "0-1")
    assert summary["kv_steps_rule"].startswith("release steps 0-4 of 25")
    assert [line.split(":")[0] for line in summary["approximations"]] == ["distillation", "guidance", "cache", "attention", "weights"]


def test_a_missing_distillation_lora_names_the_download(
    tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("wan-i2v-720p", "posegen"):
        (models / name).symlink_to(tiny_models / name)
    settings = {k: v for k, v in TEST_OPTIONS.items() if k != "steps"}
    options = AnimateOptions(**settings, models_dir=models, distill="lightx2v")
    # issue 10's pre-flight names every missing model in one error before any work (the CLI adds the download command)
    with pytest.raises(MissingModelError, match=r"1 model\(s\) this job needs are not in .*models: lightx2v-wan21-i2v-distill$") as missing:
        animate(reference_image_path, driving_clip, tmp_path / "out.mp4", options=options, reporter=Reporter(quiet=True))
    assert missing.value.names == ["lightx2v-wan21-i2v-distill"] and missing.value.models_dir == models

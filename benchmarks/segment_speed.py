"""One whole segment (condition encode, denoise, decode) per speed preset, timed in one run: exact vs fast vs turbo.

Targets (issue 14): turbo's segment time at most 1/8 of exact's, fast's at most 1/2, on the same GPU in the same run.

``scale="full"`` (default with CUDA) builds the real architecture with random weights (the 14B DiT in bf16, the real
Wan VAE; encoders one layer deep, as they run once per job) at 720x1280 with 81 frames, and for turbo a random rank-64
LoRA in LightX2V's key layout; ``layers`` < 40 shortens the DiT to fit a time budget (the DiT's share shrinks, so the
ratios come out conservative). ``scale="tiny"`` runs the tiny random model set on the CPU: it proves the harness, not
the speed. What a preset names but cannot run here (an attention kernel whose package is absent, fp8 weights without
an FP8 GPU) is listed under ``not_applied``; torchao quantises in place (after the distillation LoRA is wrapped), so
presets run in the order given and a quantised one comes last (turbo).

    python benchmarks/segment_speed.py [--scale tiny|full] [--layers 40] [--presets exact,fast,turbo] [--json out.json]

``run(...)`` returns the figures as a dict (for ``benchmarks/gpu_suite.py``); ``markdown(figures)`` formats them
for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from posegen_cli.errors import InputError
from posegen_cli.longvideo.loading import load_pipeline
from posegen_cli.longvideo.speed import resolve_speed
from posegen_cli.models import acceleration
from posegen_cli.models.convert import diffusers_key_to_release
from posegen_cli.models.distill import DISTILL_ADAPTER, LIGHTX2V, read_distill_lora
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline, release_generator
from posegen_cli.testing import lightx2v_lora, make_tiny_models
from posegen_cli.video import load_image

REFERENCE = ROOT / "tests" / "data" / "reference_person.png"
PROMPT = "a young man in a black cardigan and jeans standing on a beach at dusk"
KV_STEPS = (0, 1)
"""The release's default half-body sharing steps: never skipped by a cache, as in a real base segment."""
TARGETS = {"fast": 1 / 2, "turbo": 1 / 8}
SIZES = {"full": {"height": 1280, "width": 720, "frames": 81}, "tiny": {"height": 112, "width": 64, "frames": 13}}
TINY_STEPS = 6
"""Undistilled step count at the tiny scale: enough for MagCache to skip some steps (the real count is 25)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pipeline(
    scale: str, device: torch.device, dtype: torch.dtype, layers: int, work: Path, models_dir: Path | None
) -> tuple[PoseGenPipeline, dict]:
    """The pipeline and a LightX2V-layout LoRA state dict (raw) for its DiT."""
    if scale == "full":
        from animate import full_size_pipeline

        pipe = full_size_pipeline(device, dtype, layers)
    else:
        pipe = load_pipeline(models_dir or make_tiny_models(work / "models"), device=device, dtype=dtype)
    model = pipe.transformer
    shapes = {diffusers_key_to_release(k): v for k, v in model.state_dict().items() if ".lora_" not in k}
    return pipe, lightx2v_lora(shapes, model.config.num_layers, seed=5, rank=64 if scale == "full" else 3)


def _apply_attention(pipe: PoseGenPipeline, attention: str, device: torch.device, dtype: torch.dtype, not_applied: list[str]) -> None:
    """Set the preset's attention kernel (``models.acceleration``) where it runs here; note it otherwise."""
    try:
        acceleration.set_attention(pipe.transformer, acceleration.resolve_attention(attention, device, dtype))
    except InputError as exc:  # a missing kernel package or an unsupported GPU is reported, not fatal
        acceleration.set_attention(pipe.transformer, acceleration.resolve_attention("native", device, dtype))
        not_applied.append(f"attention {attention}: {exc}")


def _apply_quantize(pipe: PoseGenPipeline, quantize: str, done: str, device: torch.device, not_applied: list[str]) -> str:
    """Quantise the DiT's block linears for the preset (once: torchao works in place); returns what the weights are now.

    Presets run in the order given, so a preset after a quantised one runs quantised too, which is noted.
    """
    if quantize == done or quantize == "none":
        if done != "none" and quantize == "none":
            not_applied.append(f"quantize none: the weights are {done} since an earlier preset")
        return done
    if done != "none":
        not_applied.append(f"quantize {quantize}: the weights are already {done}")
        return done
    try:
        acceleration.quantize_linears(pipe.transformer, acceleration.quantization_config(quantize, device))
    except InputError as exc:
        not_applied.append(f"quantize {quantize}: {exc}")
        return done
    return quantize


def _time_segment(pipe: PoseGenPipeline, inputs: dict, device: torch.device, **call: Any) -> dict[str, Any]:
    step_ends: list[float] = []

    def callback(_pipe, _step, _t, _tensors):
        _sync(device)
        step_ends.append(time.perf_counter())

    _sync(device)
    start = time.perf_counter()
    frames = pipe(**inputs, callback_on_step_end=callback, **call).frames
    _sync(device)
    total = time.perf_counter() - start
    steps = np.diff([start, *step_ends]) if step_ends else np.array([])
    return {
        "segment_seconds": round(total, 3),
        "denoise_seconds": round(float(steps.sum()), 3),
        "step_seconds": [round(float(s), 3) for s in steps],
        "frames": int(frames.shape[0]),
    }


def run(
    scale: str | None = None,
    device: str = "auto",
    *,
    presets: tuple[str, ...] = ("exact", "fast", "turbo"),
    layers: int = 40,
    seed: int = 42,
    models_dir: Path | None = None,
) -> dict[str, Any]:
    """Time one segment per preset on one pipeline; returns per-preset figures, ratios to exact and the targets.

    ``models_dir``: an existing tiny model set for ``scale="tiny"`` (made afresh otherwise).
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    scale = scale or ("full" if dev.type == "cuda" else "tiny")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    size = SIZES[scale]
    if "exact" not in presets:
        presets = ("exact", *presets)
    with tempfile.TemporaryDirectory(prefix="posegen-segment-speed-") as tmp:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        pipe, raw_lora = _pipeline(scale, dev, dtype, layers, Path(tmp), models_dir)
        prompt, negative = pipe.encode_prompt(PROMPT)
        image, reference = pipe.encode_reference(load_image(REFERENCE), size["height"], size["width"])
        rng = np.random.default_rng(seed)
        shape = (size["frames"], size["height"], size["width"], 3)
        inputs = {
            "prompt_embeds": prompt, "negative_prompt_embeds": negative, "image_embeds": image, "reference_latents": reference,
            "pose_frames": rng.integers(0, 256, shape, dtype=np.uint8), "hand_frames": rng.integers(0, 256, shape, dtype=np.uint8),
        }  # fmt: skip
        rows: dict[str, dict[str, Any]] = {}
        distill_loaded = False
        quantized = "none"
        for preset in presets:
            speed = resolve_speed(preset, steps=None if preset == "turbo" or scale == "full" else TINY_STEPS)
            not_applied: list[str] = []
            _apply_attention(pipe, speed.attention, dev, dtype, not_applied)
            if speed.distill is not None and not distill_loaded:
                lora = read_distill_lora(raw_lora)
                pipe.transformer.load_lora_adapter(lora.state_dict, prefix="transformer", adapter_name=DISTILL_ADAPTER)
                distill_loaded = True
            if distill_loaded:
                pipe.transformer.set_adapters([DISTILL_ADAPTER], [speed.distill_weight if speed.distill else 0.0])
            quantized = _apply_quantize(pipe, speed.quantize, quantized, dev, not_applied)
            pipe.enable_feature_cache(speed.cache, speed.cache_threshold, speed.steps, KV_STEPS)
            sigmas = None if speed.sigmas is None else torch.tensor(speed.sigmas)
            row = _time_segment(
                pipe, inputs, dev, num_inference_steps=speed.steps, guidance_scale=speed.guidance, sigmas=sigmas,
                generator=release_generator(seed),
            )  # fmt: skip
            row.update(steps=speed.steps, guidance=speed.guidance, cache=speed.cache, attention=speed.attention,
                       distill=speed.distill, not_applied=not_applied)  # fmt: skip
            rows[preset] = row
        pipe.enable_feature_cache("none", None, 1)
    exact = rows["exact"]["segment_seconds"]
    for preset, row in rows.items():
        row["ratio_to_exact"] = round(row["segment_seconds"] / exact, 4)
        if preset in TARGETS:
            row["target_ratio"] = round(TARGETS[preset], 4)
            row["meets_target"] = row["ratio_to_exact"] <= TARGETS[preset]
    return {
        "scale": scale,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "size": f"{size['width']}x{size['height']}x{size['frames']}",
        "dit_layers": pipe.transformer.config.num_layers,
        "distill_lora": f"random, {LIGHTX2V.name} key layout",
        "presets": rows,
    }


def markdown(figures: dict[str, Any]) -> str:
    """A ``benchmarks/RESULTS.md`` section for ``figures`` (one row per preset)."""
    title = (
        f"### Segment time per speed preset ({figures['device']}, {figures['scale']}, {figures['size']}, "
        f"{figures['dit_layers']} DiT layers, {figures['dtype']})"
    )
    lines = [
        title,
        "",
        "| preset | steps | guidance | segment s | ratio to exact | target | met | not applied |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, row in figures["presets"].items():
        target = f"<= {row['target_ratio']}" if "target_ratio" in row else ""
        met = {True: "yes", False: "no"}.get(row.get("meets_target"), "")
        lines.append(
            f"| {preset} | {row['steps']} | {row['guidance']:g} | {row['segment_seconds']} | {row['ratio_to_exact']} | {target} | {met} "
            f"| {'; '.join(row['not_applied']) or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=["tiny", "full"], default=None, help="default: full with a GPU, else tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--layers", type=int, default=40, help="DiT depth at --scale full (40 is the real model)")
    parser.add_argument("--presets", default="exact,fast,turbo")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    if args.device == "auto" and not torch.cuda.is_available():
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
    figures = run(args.scale, args.device, presets=tuple(p for p in args.presets.split(",") if p), layers=args.layers)
    print(markdown(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

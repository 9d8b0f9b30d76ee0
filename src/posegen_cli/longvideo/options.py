"""What ``posegen animate`` accepts, checked and turned into concrete numbers (and torch objects) before any model loads.

:func:`resolve_settings` is the one place a job's options are validated and resolved; every stage after it gets the
resulting :class:`JobSettings` values (a real ``torch.device`` and ``torch.dtype``, checked choices).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from posegen_cli.choices import ALIGN_MODES, BACKENDS, DEFAULT_SPEED, OFFLOAD_MODES, SHOT_TYPES
from posegen_cli.device import resolve_device, resolve_dtype
from posegen_cli.errors import OptionError, option
from posegen_cli.longvideo.speed import SpeedSettings, resolve_speed
from posegen_cli.pipelines import check_model_size

PREVIEW_SIZE = (512, 288)
"""(height, width) of the preview for the 720x1280 default: 9:16, multiples of 16, 0.4x each side."""
PREVIEW_STEPS = 8


@dataclass
class AnimateOptions:
    """Every ``posegen animate`` flag; defaults are the release's settings.

    The speed-related fields left as None (steps, guidance, distill, cache, cache_threshold, attention, quantize) take
    the ``speed`` preset's value (:data:`posegen_cli.choices.SPEED_PRESETS`); a value given here wins over the preset.
    """

    prompt: str | None = None
    subject: str | None = None
    seed: int = 42
    steps: int | None = None
    """None: the preset's (25, the release's; 4 with a distillation)."""
    guidance: float | None = None
    """None: the preset's (5.0, the release's; 1 with a distillation)."""
    speed: str = DEFAULT_SPEED
    distill: str | None = None
    distill_weight: float = 1.0
    cache: str | None = None
    cache_threshold: float | None = None
    attention: str | None = None
    """Attention kernel: one of ``choices.ATTENTION_CHOICES`` (auto: the fastest exact one present); None: the preset's."""
    quantize: str | None = None
    """torchao weights of the block linears: one of ``choices.QUANTIZE_CHOICES``; None: the preset's."""
    resolution: str = "720x1280"
    shot: str = "auto"
    kv_steps: str | None = None
    kv_blocks: str | None = None
    align: str = "auto"
    pose_backend: str = "auto"
    offload: str = "none"
    preview: bool = False
    audio: bool = True
    crf: int = 5
    """The release's imageio ``quality=9``: libx264 CRF int((1 - 0.9) * 51) = 5, yuv420p (port spec §4.6)."""
    work_dir: Path | None = None
    keep_intermediates: bool = False
    compat_mp4: bool = False
    """Pass every segment through the release's CRF-5 mp4 round trip before transitions and the merge use it."""
    models_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    """Compile the transformer blocks (regional ``torch.compile``)."""
    gpu: str | None = None
    """GPU the job planner estimates for (a name of ``longvideo.planner.GPUS``); None: the one present."""
    anchor: int = 0
    pad: bool = True
    segment_frames: int = 81
    head: int = 21
    tail: int = 20
    """Segment geometry: the release's checkpoints were trained on 81/21/20; other 4k+1 lengths are for tests."""


def parse_resolution(text: str) -> tuple[int, int]:
    """``WxH`` to (height, width); both must be positive multiples of 16 (the VAE's 8x and the 2x2 patches)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise OptionError("resolution", text, problem=f"{text!r} is not WxH (e.g. 720x1280)")
    width, height = int(match.group(1)), int(match.group(2))
    check_model_size(height, width, option("resolution"))
    return height, width


def parse_range(text: str | None, name: str) -> tuple[int, int] | None:
    """``"0-2"`` (or ``"0 2"``, ``"0,2"``) to the half-open range (0, 2); None stays None. ``name`` is the setting."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[-, ]\s*(\d+)\s*", text)
    if not match:
        raise OptionError(name, text, problem=f"{text!r} is not START-END (e.g. 0-2; END is exclusive)")
    return int(match.group(1)), int(match.group(2))


def preview_size(height: int, width: int) -> tuple[int, int]:
    """The preview keeps the requested shape (portrait or landscape) at about ``PREVIEW_SIZE``'s pixels, or fewer."""
    factor = min(1.0, math.sqrt(PREVIEW_SIZE[0] * PREVIEW_SIZE[1] / (height * width)))

    def fit(side: int) -> int:
        return max(16, 16 * math.floor(side * factor / 16 + 0.5))

    return fit(height), fit(width)


@dataclass(frozen=True)
class JobSettings:
    """The options made concrete: sizes, step count, ranges, the device and dtype; what the work folder's key is built from."""

    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    kv_steps: tuple[int, int] | None
    kv_blocks: tuple[int, int] | None
    speed: SpeedSettings
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def key_fields(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "width": self.width,
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": self.seed,
            **self.speed.key_fields(),
        }


def resolve_settings(options: AnimateOptions) -> JobSettings:
    """Check every option that needs no file or model, resolve the device and dtype; the preview caps size and steps.

    Raises OptionError naming the setting whose value cannot be used.
    """
    height, width = parse_resolution(options.resolution)
    if options.steps is not None and options.steps < 1:
        raise OptionError("steps", options.steps, problem=f"{options.steps}: need at least 1")
    speed = resolve_speed(
        options.speed, steps=options.steps, guidance=options.guidance, distill=options.distill,
        distill_weight=options.distill_weight, cache=options.cache, cache_threshold=options.cache_threshold,
        attention=options.attention, quantize=options.quantize,
    )  # fmt: skip
    steps = speed.steps
    if options.preview:
        height, width = preview_size(height, width)
        if speed.sigmas is None:
            steps = min(steps, PREVIEW_STEPS)
    for name, value, choices in (
        ("offload", options.offload, OFFLOAD_MODES),
        ("align", options.align, ALIGN_MODES),
        ("pose_backend", options.pose_backend, BACKENDS),
        ("shot", options.shot, ("auto", *SHOT_TYPES)),
    ):
        if value not in choices:
            raise OptionError(name, value, choices)
    if not 0 <= options.crf <= 51:
        raise OptionError("crf", options.crf, problem=f"{options.crf} is out of range (use 0..51; 18 is visually lossless)")
    if options.offload == "group" and speed.cache != "none":
        raise OptionError(
            "cache", speed.cache,
            problem=f"{speed.cache} does not combine with {option('offload')} group (its hooks and the streamed blocks' "
            f"hooks are untested together); use {option('offload')} model or {option('cache')} none",
        )  # fmt: skip
    device = resolve_device(options.device)
    if options.offload != "none" and device.type != "cuda":
        raise OptionError(
            "offload", options.offload, problem=f"{options.offload} needs a CUDA device (got {device}); use {option('offload')} none on the CPU"
        )
    return JobSettings(
        height=height,
        width=width,
        steps=steps,
        guidance=speed.guidance,
        seed=int(options.seed),
        kv_steps=parse_range(options.kv_steps, "kv_steps"),
        kv_blocks=parse_range(options.kv_blocks, "kv_blocks"),
        speed=speed,
        device=device,
        dtype=resolve_dtype(options.dtype, device),
    )


def fps_text(fps: Fraction) -> str:
    return str(fps.numerator) if fps.denominator == 1 else f"{fps.numerator}/{fps.denominator} ({float(fps):.3f})"

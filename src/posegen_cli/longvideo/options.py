"""What ``posegen animate`` accepts, checked and turned into concrete numbers before any model loads."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from posegen_cli.errors import InputError
from posegen_cli.longvideo.speed import SpeedSettings, resolve_speed
from posegen_cli.pipelines import check_model_size
from posegen_cli.pose.align import ALIGN_MODES
from posegen_cli.speed import DEFAULT_SPEED

PREVIEW_SIZE = (512, 288)
"""(height, width) of ``--preview`` for the 720x1280 default: 9:16, multiples of 16, 0.4x each side."""
PREVIEW_STEPS = 8
OFFLOAD_MODES = ("none", "model", "group")


@dataclass
class AnimateOptions:
    """Every ``posegen animate`` flag; defaults are the release's settings.

    The speed-related fields left as None (steps, guidance, distill, cache, cache_threshold, attention, quantize) take
    the ``speed`` preset's value (:mod:`posegen_cli.speed`); a value given here wins over the preset.
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
    """Attention backend (auto, native, cudnn, flash, flash3, sage); None: the preset's."""
    quantize: str | None = None
    """Weight quantization (none, fp8, int8); None: the preset's."""
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
        raise InputError(f"--resolution {text!r} is not WxH (e.g. 720x1280)")
    width, height = int(match.group(1)), int(match.group(2))
    check_model_size(height, width, "--resolution")
    return height, width


def parse_range(text: str | None, flag: str) -> tuple[int, int] | None:
    """``"0-2"`` (or ``"0 2"``, ``"0,2"``) to the half-open range (0, 2); None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[-, ]\s*(\d+)\s*", text)
    if not match:
        raise InputError(f"{flag} {text!r} is not START-END (e.g. 0-2; END is exclusive)")
    return int(match.group(1)), int(match.group(2))


def preview_size(height: int, width: int) -> tuple[int, int]:
    """``--preview`` keeps the requested shape (portrait or landscape) at about ``PREVIEW_SIZE``'s pixels, or fewer."""
    factor = min(1.0, math.sqrt(PREVIEW_SIZE[0] * PREVIEW_SIZE[1] / (height * width)))

    def fit(side: int) -> int:
        return max(16, 16 * math.floor(side * factor / 16 + 0.5))

    return fit(height), fit(width)


@dataclass(frozen=True)
class JobSettings:
    """The options made concrete: sizes, step count, ranges; what the work folder's key is built from."""

    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    kv_steps: tuple[int, int] | None
    kv_blocks: tuple[int, int] | None
    speed: SpeedSettings

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
    """Check every option that needs no file or model; ``--preview`` caps size and steps."""
    height, width = parse_resolution(options.resolution)
    if options.steps is not None and options.steps < 1:
        raise InputError(f"--steps {options.steps}: need at least 1")
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
    if options.offload not in OFFLOAD_MODES:
        raise InputError(f"--offload {options.offload!r} is not known (use {', '.join(OFFLOAD_MODES)})")
    if options.align not in ALIGN_MODES:
        raise InputError(f"--align {options.align!r} is not known (use {', '.join(ALIGN_MODES)})")
    if not 0 <= options.crf <= 51:
        raise InputError(f"--crf {options.crf} is out of range (use 0..51; 18 is visually lossless)")
    return JobSettings(
        height=height,
        width=width,
        steps=steps,
        guidance=speed.guidance,
        seed=int(options.seed),
        kv_steps=parse_range(options.kv_steps, "--kv-steps"),
        kv_blocks=parse_range(options.kv_blocks, "--kv-blocks"),
        speed=speed,
    )


def fps_text(fps: Fraction) -> str:
    return str(fps.numerator) if fps.denominator == 1 else f"{fps.numerator}/{fps.denominator} ({float(fps):.3f})"

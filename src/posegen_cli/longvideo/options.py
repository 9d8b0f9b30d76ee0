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

from posegen_cli.choices import (
    ALIGN_MODES,
    BACKENDS,
    CAMERA_MOTIONS,
    DEFAULT_SPEED,
    KV_PLACEMENTS,
    OFFLOAD_MODES,
    SHOT_TYPES,
    VAE_TILINGS,
)
from posegen_cli.device import resolve_device, resolve_dtype
from posegen_cli.errors import OptionError, option
from posegen_cli.longvideo.speed import SpeedSettings, resolve_speed
from posegen_cli.pipelines import check_model_size

PREVIEW_SIZE = (512, 288)
"""(height, width) of the preview for the 720x1280 default: 9:16, multiples of 16, 0.4x each side."""
PREVIEW_STEPS = 8
DEFAULT_CAMERA_SPEED = 4.0
"""4 px per frame (a 720 px wide frame crossed in 6 s at 30 fps) for pans, 4 % per second for zooms."""


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
    background: str = "white"
    """Colour a transparent reference is composited onto (a name, #RRGGBB or R,G,B)."""
    person_check: bool = True
    """Stop when the reference shows nobody; False frames it by the centre crop and goes on."""
    person: str | None = None
    """Which driving person to follow: None (the largest in the first frames), ``N`` (left to right) or ``X,Y``."""
    offload: str = "none"
    kv_placement: str = "auto"
    vae_tiling: str = "release"
    """The release's VAE tiles (bit-exact parity), or untiled (whole frames at once: more GPU memory, no seams)."""
    """Where the anchor's K/V live: auto (chosen from free GPU, host and disk), gpu, host, disk or recompute."""
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
    gpus: int | None = None
    """Ray workers, one per GPU: a local runtime with this many, or the cap on a cluster's (None: no Ray)."""
    ray_address: str | None = None
    """Join this Ray cluster ("auto", "HOST:PORT", "ray://HOST:PORT") instead of running in this process."""
    pose_video: Path | None = None
    """A pose condition video used as it is (no extraction, no alignment) instead of a driving video."""
    hand_video: Path | None = None
    """The hand condition video that goes with ``pose_video``; without one the hand condition is black."""
    audio_file: Path | None = None
    """Audio for the output instead of the driving (or pose) video's own track."""
    camera: str | None = None
    """Experimental camera motion steered through the negative guidance branch (``choices.CAMERA_MOTIONS``)."""
    camera_speed: float = DEFAULT_CAMERA_SPEED
    """Pixels per frame on the 720x1280 canvas for pans, percent per second for zooms."""


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
        ("kv_placement", options.kv_placement, KV_PLACEMENTS),
        ("vae_tiling", options.vae_tiling, VAE_TILINGS),
    ):
        if value not in choices:
            raise OptionError(name, value, choices)
    if options.gpus is not None and options.gpus < 1:
        raise OptionError("gpus", options.gpus, problem=f"{options.gpus}: need at least one worker")
    if not 0 <= options.crf <= 51:
        raise OptionError("crf", options.crf, problem=f"{options.crf} is out of range (use 0..51; 18 is visually lossless)")
    check_conditioning(options, speed)
    check_cache_combination(speed.cache, options.offload, options.kv_placement)
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


def check_cache_combination(cache: str, offload: str, kv_placement: str) -> None:
    """A feature cache works on resident blocks and beside a stored anchor K/V; raises OptionError otherwise.

    Group offloading's hooks stream the very blocks the cache hooks skip (untested together); the ``recompute``
    K/V placement runs the anchor's forward inside each base forward at a shared step, through the same cached
    blocks, which would mix the anchor's residuals into the base segment's cache state.
    """
    if cache == "none":
        return
    if offload == "group":
        raise OptionError(
            "cache", cache,
            problem=f"{cache} does not combine with {option('offload')} group (its hooks and the streamed blocks' "
            f"hooks are untested together); use {option('offload')} model or {option('cache')} none",
        )  # fmt: skip
    if kv_placement == "recompute":
        raise OptionError(
            "cache", cache,
            problem=f"{cache} does not combine with {option('kv_placement')} recompute (the anchor's recomputed forward "
            f"would pass through the cached blocks); use {option('kv_placement')} host or disk, or {option('cache')} none",
        )  # fmt: skip


def check_conditioning(options: AnimateOptions, speed: SpeedSettings) -> None:
    """The own-condition-video and camera settings must make sense together (no file is read here); ``speed`` gives
    the guidance the job runs with (a distillation's 1 unless given).

    Raises OptionError naming the setting that cannot be used with the others.
    """
    if options.hand_video is not None and options.pose_video is None:
        raise OptionError("hand_video", options.hand_video, problem=f"needs {option('pose_video')} (the hand condition goes with your own pose video)")
    if options.pose_video is not None and options.align != "auto":
        raise OptionError(
            "align", options.align,
            problem=f"{options.align} does nothing with {option('pose_video')}: your condition videos are used as they are (drop {option('align')})",
        )  # fmt: skip
    if options.audio_file is not None and not options.audio:
        raise OptionError("audio_file", options.audio_file, problem=f"and {option('no_audio')} contradict each other (keep one)")
    if options.camera is None:
        return
    if options.camera not in CAMERA_MOTIONS:
        raise OptionError("camera", options.camera, CAMERA_MOTIONS)
    if not options.camera_speed > 0:
        raise OptionError(
            "camera_speed", options.camera_speed,
            problem=f"{options.camera_speed:g}: must be above 0 (pixels per frame for pans, % per second for zooms)",
        )  # fmt: skip
    if speed.guidance == 1.0 and options.guidance is None:
        raise OptionError(
            "camera", options.camera,
            problem=f"works through the negative guidance branch, which {option('distill')} {speed.distill} turns off "
            f"(guidance 1: one pass per step); use {option('distill')} none, or {option('guidance')} 5 with it",
        )  # fmt: skip
    if speed.guidance == 1.0:
        raise OptionError(
            "camera", options.camera,
            problem=f"works through the negative guidance branch, which {option('guidance')} 1 turns off (use e.g. {option('guidance')} 5)",
        )  # fmt: skip
    if options.kv_steps is not None or options.kv_blocks is not None or options.shot != "auto":
        sharing = "/".join(option(name) for name in ("shot", "kv_steps", "kv_blocks"))
        raise OptionError(
            "camera", options.camera, problem=f"turns background K/V sharing off (it holds the background still); drop {sharing}"
        )


def fps_text(fps: Fraction) -> str:
    return str(fps.numerator) if fps.denominator == 1 else f"{fps.numerator}/{fps.denominator} ({float(fps):.3f})"

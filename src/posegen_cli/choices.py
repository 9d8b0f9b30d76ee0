"""Every closed set of choices the library accepts, in one light module (no heavy imports).

The stages validate against these tuples and ``cli.py`` builds its option enums from them, so a choice is added in
one place.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "sapiens", "mediapipe")
"""Pose backends: ``auto`` is Sapiens with a CUDA GPU, else MediaPipe."""
HAND_NORMAL_SOURCES = ("auto", "sapiens", "none")
"""Where the hand-normal video comes from; ``none`` is a black video."""
OUTPUT_FORMATS = ("npz", "openpose-json")
"""Keypoints are always written as keypoints.npz; ``openpose-json`` adds one OpenPose JSON per frame."""
ALIGN_MODES = ("auto", "limbs", "none")
"""Retargeting of the driving skeleton: similarity transform, also per-limb lengths, or none."""
OFFLOAD_MODES = ("none", "model", "group")
"""diffusers offloading: none, whole components in turn, or the DiT's blocks streamed."""
SHOT_TYPES = ("close-up", "half-body", "full-body", "distant")
"""The K/V-sharing presets by shot type (port.md §5); ``auto`` picks one from the reference."""
DTYPES = ("auto", "bfloat16", "float32")
"""Model dtypes by name; ``auto`` is bfloat16 on a GPU and float32 on the CPU (``bf16``/``fp32`` are accepted too)."""
CAMERA_MOTIONS = ("pan-left", "pan-right", "pan-up", "pan-down", "zoom-in", "zoom-out")
"""Experimental camera moves steered through the negative guidance branch (``pose.camera``)."""
KV_PLACEMENTS = ("auto", "gpu", "host", "disk", "recompute")
"""Where the anchor's background K/V live: chosen per job from free memory and disk, GPU, pinned host memory, local
disk, or nowhere (recomputed from the anchor's inputs before each base forward at a shared step)."""
VAE_TILINGS = ("release", "untiled")
"""VAE passes: the release's spatial tiles (bit-exact parity), or whole frames at once."""
DISTILLS = ("none", "lightx2v")
"""Step-distillation LoRAs beside PoseGen's (``models/distill.py``); ``none`` runs the release's 25 steps."""
CACHES = ("none", "fbc", "magcache")
"""diffusers feature caches on the DiT: First Block Cache, MagCache (TeaCache itself is not in diffusers 0.42)."""
ATTENTION_CHOICES = ("auto", "native", "cudnn", "flash", "flash3", "sage")
"""Attention kernels, mapped onto diffusers' backend names by ``models.acceleration.resolve_attention``; ``sage`` is
approximate, the others exact."""
QUANTIZE_CHOICES = ("none", "fp8", "int8")
"""torchao weights for the DiT's block linears."""


@dataclass(frozen=True)
class SpeedPreset:
    """What one speed preset sets, its expected speed-up and its quality risk; ``None`` leaves a setting at its plain
    default (a cache's own threshold). Speed-ups are estimates for one 720p segment on one Hopper GPU against
    ``exact`` (shared/specs/performance.md §A.4, §A.8, §A.10), which ``benchmarks/segment_speed.py`` measures."""

    name: str
    attention: str | None
    quantize: str
    cache: str
    cache_threshold: float | None
    distill: str | None
    speedup: str
    quality_risk: str


SPEED_PRESETS: dict[str, SpeedPreset] = {
    "exact": SpeedPreset(
        "exact", attention=None, quantize="none", cache="none", cache_threshold=None, distill=None,
        speedup="1x (the reference)", quality_risk="none: the release's numerics",
    ),
    "fast": SpeedPreset(
        "fast", attention="sage", quantize="none", cache="magcache", cache_threshold=None, distill=None,
        speedup="about 2-3x (SageAttention ~1.3x, MagCache 1.5-2x at 25 steps)",
        quality_risk="low to moderate: 8-bit attention and reused block residuals soften fine detail; "
        "K/V-sharing, first and last steps always run in full",
    ),
    "turbo": SpeedPreset(
        "turbo", attention="sage", quantize="fp8", cache="none", cache_threshold=None, distill="lightx2v",
        speedup="about 8-12x (4 one-pass steps instead of 25 two-pass ones, plus SageAttention and fp8)",
        quality_risk="high (research): the distillation LoRA was trained on plain Wan2.1, not with PoseGen's LoRA; "
        "compare on your footage with benchmarks/quality_ab.py",
    ),
}  # fmt: skip
DEFAULT_SPEED = "exact"
SPEEDS = tuple(SPEED_PRESETS)

"""The speed presets (``--speed exact|fast|turbo``): what each sets, its expected speed-up and quality risk. Data only.

A top-level module with no imports beyond the standard library, because ``cli.py`` builds ``--help`` from
:data:`SPEED_PRESETS` when no torch-importing package may load. Turning a preset and explicit flags into a job's
settings is :func:`posegen_cli.longvideo.speed.resolve_speed`.

Expected speed-ups are estimates for one 720p segment on one Hopper GPU against ``exact`` (shared/specs/performance.md
§A.4, §A.8, §A.10; ``benchmarks/segment_speed.py`` measures them), not measurements of this code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpeedPreset:
    """What one ``--speed`` value sets; ``None`` leaves that setting at its plain default (a cache's own threshold)."""

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

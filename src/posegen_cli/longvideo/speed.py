"""A job's speed settings: the ``speed`` preset filled in with the flags given explicitly (they always win).

Pure: no model is loaded. The resolved :class:`SpeedSettings` lists every approximation in effect, for the run
summary and the JSON summary; the presets themselves are the data table :data:`posegen_cli.choices.SPEED_PRESETS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from posegen_cli.choices import ATTENTION_CHOICES, DEFAULT_SPEED, QUANTIZE_CHOICES, SPEED_PRESETS
from posegen_cli.errors import OptionError, option
from posegen_cli.models.acceleration import APPROXIMATE_ATTENTION
from posegen_cli.models.distill import DISTILL_PRESETS, distill_unshifted_sigmas, get_distill_preset
from posegen_cli.models.feature_cache import CACHES, DEFAULT_THRESHOLDS

RELEASE_STEPS = 25
RELEASE_GUIDANCE = 5.0


def _choice(value: str | None, choices: tuple[str, ...], name: str) -> None:
    if value is not None and value not in choices:
        raise OptionError(name, value, choices)


@dataclass(frozen=True)
class SpeedSettings:
    """Every speed-related setting of a job, resolved; ``sigmas`` are unshifted (None: the release's linspace)."""

    speed: str
    steps: int
    guidance: float
    sigmas: tuple[float, ...] | None
    distill: str | None
    distill_weight: float
    cache: str
    cache_threshold: float | None
    attention: str
    quantize: str
    approximations: tuple[str, ...]
    preset_parts: frozenset[str] = field(default=frozenset())
    """Of ``attention`` and ``quantize``, those the preset chose (not given explicitly): :meth:`without` may drop them."""

    def without(self, part: str, reason: str) -> SpeedSettings:
        """These settings with the preset's ``part`` ("attention" or "quantize") back at its exact default (auto
        attention, no quantisation) because it cannot run (``reason``); its approximation line says so."""
        default, prefix = {"attention": ("auto", "attention:"), "quantize": ("none", "weights:")}[part]
        note = f"{prefix} {getattr(self, part)} of the {self.speed} preset not applied ({reason}); {default} instead"
        lines = tuple(note if line.startswith(prefix) else line for line in self.approximations)
        return replace(self, **{part: default}, approximations=lines, preset_parts=self.preset_parts - {part})

    def key_fields(self) -> dict[str, object]:
        """What changes a segment's pixels (the work folder's key); exact attention kernels differ only in rounding,
        so they share a key, while approximate attention and quantised weights change it. A distillation and a cache
        add keys only when used, so the work folders of jobs without them keep their names."""
        fields: dict[str, object] = {
            "attention": "approximate" if self.attention in APPROXIMATE_ATTENTION else "exact",
            "quantize": self.quantize,
        }
        if self.distill is not None:
            fields.update(distill=self.distill, distill_weight=self.distill_weight, sigmas=self.sigmas)
        if self.cache != "none":
            fields.update(cache=self.cache, cache_threshold=self.cache_threshold)
        return fields


def resolve_speed(
    speed: str = DEFAULT_SPEED,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    distill: str | None = None,
    distill_weight: float = 1.0,
    cache: str | None = None,
    cache_threshold: float | None = None,
    attention: str | None = None,
    quantize: str | None = None,
) -> SpeedSettings:
    """Fill the settings left as None from the ``speed`` preset; an explicit value always wins.

    A distillation sets the step count, guidance 1 and the schedule it was trained for, unless ``guidance`` is given;
    an explicit ``steps`` that differs from the distilled count is an error (its schedule has fixed timesteps).
    Raises OptionError naming the offending setting.
    """
    _choice(speed, tuple(SPEED_PRESETS), "speed")
    _choice(distill, ("none", *DISTILL_PRESETS), "distill")
    _choice(cache, CACHES, "cache")
    _choice(attention, ATTENTION_CHOICES, "attention")
    _choice(quantize, QUANTIZE_CHOICES, "quantize")
    preset = SPEED_PRESETS[speed]
    chosen_distill = preset.distill if distill is None else (None if distill == "none" else distill)
    chosen_cache = preset.cache if cache is None else cache
    if cache_threshold is not None and (cache_threshold < 0 or math.isnan(cache_threshold)):
        raise OptionError("cache_threshold", cache_threshold, problem=f"{cache_threshold}: use 0 or more (0 never skips)")
    if chosen_cache == "none":
        threshold = None
    elif cache_threshold is not None:
        threshold = float(cache_threshold)
    elif cache is None and preset.cache_threshold is not None:
        threshold = preset.cache_threshold
    else:  # the cache's own default (diffusers' for fbc, the MagCache authors' for magcache)
        threshold = DEFAULT_THRESHOLDS[chosen_cache]
    chosen_attention = attention or preset.attention or "auto"
    chosen_quantize = quantize or preset.quantize
    if not distill_weight >= 0:
        raise OptionError("distill_weight", distill_weight, problem=f"{distill_weight}: use 0 or more (1 is the authors' strength)")

    sigmas = None
    approximations: list[str] = []
    if chosen_distill is not None:
        spec = get_distill_preset(chosen_distill)
        trained = len(spec.denoising_step_list)
        if steps is not None and steps != trained:
            raise OptionError(
                "steps", steps,
                problem=f"{steps} does not fit {option('distill')} {chosen_distill}, trained for {trained} steps (drop {option('steps')})",
            )  # fmt: skip
        if chosen_cache == "magcache":
            raise OptionError(
                "cache", chosen_cache,
                problem=f"magcache is calibrated on undistilled Wan2.1 and does not fit {option('distill')} {chosen_distill} "
                f"(use {option('cache')} fbc or none)",
            )  # fmt: skip
        sigmas = tuple(distill_unshifted_sigmas(spec.denoising_step_list).tolist())
        final_steps = trained
        final_guidance = spec.guidance_scale if guidance is None else float(guidance)
        approximations.append(
            f"distillation: {chosen_distill} LoRA at weight {distill_weight:g} over PoseGen's, {trained} steps at timesteps "
            f"{list(spec.denoising_step_list)} (from {spec.source.split(' (')[0]})"
        )
        if final_guidance == 1.0:
            approximations.append("guidance: 1, one model pass per step (guidance distilled into the LoRA)")
    else:
        final_steps = RELEASE_STEPS if steps is None else steps
        final_guidance = RELEASE_GUIDANCE if guidance is None else float(guidance)
    if chosen_cache != "none":
        approximations.append(
            f"cache: {chosen_cache} at threshold {threshold:g} reuses block residuals between steps "
            "(first, last and K/V-sharing steps always computed)"
        )
    if chosen_attention == "sage":
        approximations.append("attention: SageAttention (8-bit Q·K), not bit-exact")
    if chosen_quantize != "none":
        approximations.append(f"weights: {chosen_quantize} linear layers")
    return SpeedSettings(
        speed=speed,
        steps=final_steps,
        guidance=final_guidance,
        sigmas=sigmas,
        distill=chosen_distill,
        distill_weight=float(distill_weight),
        cache=chosen_cache,
        cache_threshold=threshold,
        attention=chosen_attention,
        quantize=chosen_quantize,
        approximations=tuple(approximations),
        preset_parts=frozenset(
            name for name, given, chosen in (("attention", attention, chosen_attention), ("quantize", quantize, chosen_quantize))
            if given is None and chosen not in ("auto", "none")
        ),
    )

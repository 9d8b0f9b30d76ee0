"""Feature caching on the PoseGen DiT through diffusers' cache hooks (the ``cache`` setting), kept clear of K/V sharing.

diffusers' First Block Cache and MagCache skip the transformer blocks of a step when the blocks' residual is
predicted to change little, reusing the residual of the last computed step. Three PoseGen rules are added on top,
without changing the hooks:

- the guidance branches never share cached state: the pipeline runs every forward in the DiT's
  ``cache_context("cond" | "uncond", step_index=...)`` (the same context the K/V-sharing hook reads), which keys the
  hooks' state per branch (diffusers ``StateManager``);
- the first and last steps and every *guarded* step (the steps where the anchor records, or a base segment
  replays, background K/V: a skipped block computes no K/V) always run every block. First Block Cache has no
  per-step setting, so its state is reset before a guarded step (the cache restarts from that step's residual,
  for both branches); MagCache gets a magnitude ratio of +inf at those steps, so its accumulated error exceeds
  any threshold there and its accumulators restart (its own rule, steered through its documented ``mag_ratios``);
- both are reset before a segment's first step, so nothing carries over between segments;
- K/V *recomputation* (``KVShareCache(recompute_model=...)``) runs the anchor's forward inside the base forward,
  through these same hooked blocks and in the base forward's cache context, which would mix the anchor's
  residuals (and MagCache's step count) into the segment's state: the pipeline refuses the two together. Stored
  K/V, on any tier, is read in the K/V hook outside the blocks and needs nothing more.

The hooks find blocks by class in ``TransformerBlockRegistry``; :func:`register_posegen_block` adds
``PoseGenTransformerBlock`` with its two streams (video tokens, reference tokens), which the hooks carry as
``hidden_states`` / ``encoder_hidden_states``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from posegen_cli.choices import CACHES
from posegen_cli.models.transformer import PoseGenTransformer3DModel, PoseGenTransformerBlock

CacheName = Literal["none", "fbc", "magcache"]

DEFAULT_THRESHOLDS: dict[str, float] = {"fbc": 0.05, "magcache": 0.12}
"""fbc: diffusers' ``FirstBlockCacheConfig`` default. magcache: the MagCache authors' conservative Wan2.1 I2V 720P
setting E012K4R02 (threshold 0.12, K = 4, retention 0.2; MagCache4Wan2.1/README.md, 2.65x at 40 steps on an A800)."""
MAGCACHE_MAX_SKIP_STEPS = 4
MAGCACHE_RETENTION_RATIO = 0.2

WAN21_I2V_720P_MAG_RATIOS: tuple[float, ...] = (
    1.0, 0.99428, 0.98588, 0.98273, 0.99018, 0.98911, 0.98646, 0.99454, 0.9891, 0.99124,
    0.99102, 0.99215, 0.99515, 0.99576, 0.99068, 0.99097, 0.99166, 0.99041, 0.99201, 0.99101,
    0.98599, 0.98845, 0.98848, 0.98862, 0.98718, 0.98497, 0.98264, 0.98389, 0.97938, 0.97535,
    0.97498, 0.973, 0.96827, 0.96261, 0.95335, 0.94649, 0.93397, 0.91636, 0.89088, 0.8679,
)  # fmt: skip
"""MagCache's published per-step magnitude ratios for Wan2.1-I2V-14B-720P at 40 steps, conditional branch (the even
entries of ``mag_ratios`` for '720P' in Zehong-Ma/MagCache ``MagCache4Wan2.1/magcache_generate.py``, commit df81cb1;
the unconditional ones differ by at most 0.0007). Calibrated on plain Wan, not with the PoseGen LoRA loaded; diffusers
interpolates them (nearest) to other step counts as the authors do."""


def register_posegen_block() -> None:
    """Make ``PoseGenTransformerBlock`` known to diffusers' cache hooks (idempotent).

    It returns ``(video tokens, reference tokens)``; the hooks read its ``hidden_states`` and ``encoder_hidden_states``
    arguments by those names. Only the video tokens leave the last block, so what a skip does to the reference
    stream never reaches the output.
    """
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    TransformerBlockRegistry.register(
        PoseGenTransformerBlock,
        TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=1),
    )


@dataclass(frozen=True)
class CacheSettings:
    """A resolved ``cache`` setting: which hook, its threshold, and the steps it may never skip."""

    name: CacheName
    threshold: float
    num_inference_steps: int
    guarded_steps: frozenset[int]

    @property
    def skippable_steps(self) -> list[int]:
        return [s for s in range(self.num_inference_steps) if s not in self.guarded_steps]


def cache_settings(name: str, threshold: float | None, num_inference_steps: int, kv_steps: Iterable[int] = ()) -> CacheSettings:
    """Check ``name``/``threshold`` and add the always-computed steps: first, last and ``kv_steps``.

    Raises ValueError for an unknown cache or a negative threshold.
    """
    if name not in CACHES:
        raise ValueError(f"cache {name!r} is not known (use {', '.join(CACHES)})")
    value = DEFAULT_THRESHOLDS.get(name, 0.0) if threshold is None else float(threshold)
    if value < 0 or math.isnan(value):
        raise ValueError(f"cache threshold {threshold} must be 0 or more")
    guarded = frozenset({0, num_inference_steps - 1, *(int(s) for s in kv_steps)})
    return CacheSettings(name, value, num_inference_steps, guarded)  # type: ignore[arg-type]


def magcache_ratios(settings: CacheSettings) -> torch.Tensor:
    """The published ratios fitted to the step count, +inf at every guarded step (float32 [num_inference_steps])."""
    from diffusers.hooks.mag_cache import nearest_interp

    ratios = nearest_interp(torch.tensor(WAN21_I2V_720P_MAG_RATIOS), settings.num_inference_steps).clone()
    ratios[sorted(settings.guarded_steps)] = math.inf
    return ratios


class FeatureCache:
    """diffusers' cache hooks on one PoseGen DiT, with the guards above; ``before_forward(step, branch)`` runs before each forward."""

    def __init__(self, model: PoseGenTransformer3DModel, settings: CacheSettings) -> None:
        from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

        if settings.name == "none":
            raise ValueError("cache 'none' installs no hooks; do not build a FeatureCache for it")
        register_posegen_block()
        self.model = model
        self.settings = settings
        if settings.name == "fbc":
            config = FirstBlockCacheConfig(threshold=settings.threshold)
        else:
            config = MagCacheConfig(
                threshold=settings.threshold,
                max_skip_steps=MAGCACHE_MAX_SKIP_STEPS,
                retention_ratio=MAGCACHE_RETENTION_RATIO,
                num_inference_steps=settings.num_inference_steps,
                mag_ratios=magcache_ratios(settings),
            )
        model.enable_cache(config)

    def reset(self) -> None:
        """Forget every branch's cached residuals (diffusers' stateful-hook reset)."""
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)

    def before_forward(self, step: int, branch: str) -> None:
        """The guards before one forward of ``branch`` ("cond" first, then "uncond") at ``step``, which the caller
        runs in the DiT's ``cache_context(branch, step_index=step, ...)`` (that keys the hooks' state per branch).

        Raises ValueError when the step lies outside the schedule the cache was built for.
        """
        settings = self.settings
        if not 0 <= step < settings.num_inference_steps:
            raise ValueError(f"step {step} is outside the {settings.num_inference_steps}-step schedule the cache was built for")
        first_branch = branch == "cond"
        if first_branch and (step == 0 or (settings.name == "fbc" and step in settings.guarded_steps)):
            self.reset()

    def disable(self) -> None:
        self.model.disable_cache()

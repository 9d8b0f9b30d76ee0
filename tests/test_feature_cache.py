"""Feature caching (``--cache``) through diffusers' hooks on the tiny pipeline: what is skipped, and what never is."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from animate_inputs import PIPELINE_SIZE

from posegen_cli.longvideo.loading import load_pipeline
from posegen_cli.models import KVShareCache
from posegen_cli.models.feature_cache import (
    MAGCACHE_MAX_SKIP_STEPS,
    MAGCACHE_RETENTION_RATIO,
    cache_settings,
    magcache_ratios,
)
from posegen_cli.models.transformer import PoseGenTransformerBlock
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline, release_generator

(H, W), FRAMES = PIPELINE_SIZE, 9  # the ``embeds`` fixture (conftest.py) works at this size
KV_STEP = 2


@pytest.fixture(scope="module")
def pipe(tiny_models, block_passes) -> PoseGenPipeline:
    return load_pipeline(tiny_models, device="cpu", dtype="float32")


def frames(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (FRAMES, H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def block_passes() -> list[int]:
    """Every computed block pass appends 1; the hooks wrap this forward, so a skipped block appends nothing.

    Installed once for the module: removing a hook puts back the forward it wrapped first.
    """
    calls: list[int] = []
    original = PoseGenTransformerBlock.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PoseGenTransformerBlock, "forward", forward)
        yield calls


@pytest.fixture
def counted(block_passes: list[int]) -> list[int]:
    block_passes.clear()
    return block_passes


def run(pipe, embeds, steps: int, calls: list[int], *, kv: KVShareCache | None = None, guidance: float = 5.0):
    """Frames of one segment and the computed block passes per step."""
    per_step: list[int] = []
    start = len(calls)

    def callback(_pipe, step, _t, _tensors):
        per_step.append(len(calls) - start - sum(per_step))

    out = pipe(**embeds, pose_frames=frames(1), hand_frames=frames(2), num_inference_steps=steps, guidance_scale=guidance,
               generator=release_generator(3), kv_share=kv, callback_on_step_end=callback).frames  # fmt: skip
    return out, per_step


def anchor_cache() -> KVShareCache:
    return KVShareCache(steps=[KV_STEP], blocks=[1], subject_positions=[1], max_map_block=0)


@pytest.fixture
def clean(pipe):
    yield
    pipe.enable_feature_cache("none", None, 1)


def test_fbc_skips_every_later_block_at_unguarded_steps_only(pipe, embeds, counted, clean) -> None:
    blocks = pipe.transformer.config.num_layers
    steps = 6
    pipe.enable_feature_cache("fbc", 1e9, steps, kv_steps=[KV_STEP])
    _, per_step = run(pipe, embeds, steps, counted, kv=anchor_cache())
    full, head_only = 2 * blocks, 2 * 1
    # guarded: first (0), K/V (2), last (5) run everything; step 1 follows a fresh restart, 3-4 follow step 2's residual
    assert per_step == [full, head_only, full, head_only, head_only, full]


def magcache_skips(settings) -> list[bool]:
    """MagCache's published rule (Ma et al., MagCache §3): accumulate the ratio product's error, skip while it stays under
    the threshold for at most K steps after the retained first steps; computed here independently of the hook."""
    ratios = magcache_ratios(settings).tolist()
    retained = int(MAGCACHE_RETENTION_RATIO * settings.num_inference_steps + 0.5)
    ratio, err, run_length, skips = 1.0, 0.0, 0, []
    for step, r in enumerate(ratios):
        skip = False
        if step >= retained:
            ratio *= r
            run_length += 1
            err += abs(1.0 - ratio)
            skip = step > 0 and err <= settings.threshold and run_length <= MAGCACHE_MAX_SKIP_STEPS
            if not skip:
                ratio, err, run_length = 1.0, 0.0, 0
        skips.append(skip)
    return skips


@pytest.mark.parametrize("threshold", [0.03, 1e9])
def test_magcache_skips_the_steps_its_threshold_implies(pipe, embeds, counted, clean, threshold: float) -> None:
    blocks = pipe.transformer.config.num_layers
    steps = 10
    settings = cache_settings("magcache", threshold, steps, [KV_STEP])
    skips = magcache_skips(settings)
    assert not any(skips[s] for s in settings.guarded_steps) and any(skips)
    pipe.enable_feature_cache("magcache", threshold, steps, kv_steps=[KV_STEP])
    _, per_step = run(pipe, embeds, steps, counted, kv=anchor_cache())
    assert per_step == [0 if skip else 2 * blocks for skip in skips]


@pytest.mark.parametrize("name", ["fbc", "magcache"])
def test_threshold_zero_equals_the_uncached_segment_exactly(pipe, embeds, counted, clean, name: str) -> None:
    steps = 4  # step 1 is the one a cache could skip: 0 is first, 2 shares K/V, 3 is last
    uncached_anchor, _ = run(pipe, embeds, steps, counted, kv=(kv := anchor_cache()))
    kv.start_replay()
    uncached_base, _ = run(pipe, embeds, steps, counted, kv=kv)
    pipe.enable_feature_cache(name, 0.0, steps, kv_steps=[KV_STEP])
    cached_anchor, per_step = run(pipe, embeds, steps, counted, kv=(kv := anchor_cache()))
    kv.start_replay()
    cached_base, _ = run(pipe, embeds, steps, counted, kv=kv)
    assert per_step == [2 * pipe.transformer.config.num_layers] * steps
    assert np.array_equal(cached_anchor, uncached_anchor) and np.array_equal(cached_base, uncached_base)


def test_cache_state_does_not_leak_between_segments_or_branches(pipe, embeds, counted, clean) -> None:
    steps = 4
    pipe.enable_feature_cache("fbc", 1e9, steps)
    first, per_step = run(pipe, embeds, steps, counted)
    again, per_step_again = run(pipe, embeds, steps, counted)
    assert np.array_equal(first, again) and per_step == per_step_again
    _, per_step_single = run(pipe, embeds, steps, counted, guidance=1.0)
    assert per_step_single == [n // 2 for n in per_step], "one branch alone skips what it skipped beside the other"


def test_guards_are_enforced(pipe, embeds, counted, clean) -> None:
    pipe.enable_feature_cache("fbc", 0.1, 4)
    with pytest.raises(ValueError, match=r"K/V-sharing steps \[2\] are not guarded"):
        run(pipe, embeds, 4, counted, kv=anchor_cache())
    with pytest.raises(ValueError, match="built for 4 steps, not 3"):
        run(pipe, embeds, 3, counted)
    with pytest.raises(ValueError, match="cache 'teacache' is not known"):
        cache_settings("teacache", None, 4)
    assert magcache_ratios(cache_settings("magcache", None, 4, [1]))[[0, 1, 3]].tolist() == [math.inf] * 3


GIB = 1024**3
PLACEMENT_BUDGETS = {
    "gpu": (3 * GIB, 0, 0, 0),
    "host": (3 * GIB, 0, 100 * GIB, 0),
    "disk": (3 * GIB, 0, 0, 100 * GIB),
    "recompute": (3 * GIB, 0, 0, 0),
}
"""Free (device, resident, host, disk) bytes that make ``plan_kv`` put the tiny job's K/V on one tier only."""


def placed_renderer(pipe, placement: str, folder, shared_data):
    """The engine's renderer on the tiny pipeline with FBC at an always-skip threshold, 6 steps (K/V step 2), and the
    anchor's K/V placed as ``plan_kv`` chose for ``placement``."""
    from posegen_cli.longvideo.memory import JobShape, MemoryBudget, ModelShape, plan_kv
    from posegen_cli.longvideo.options import AnimateOptions, resolve_settings
    from posegen_cli.longvideo.presets import KVShareRanges
    from posegen_cli.longvideo.renderer import PipelineRenderer
    from posegen_cli.video import load_image

    settings = resolve_settings(AnimateOptions(resolution=f"{W}x{H}", steps=6, cache="fbc", cache_threshold=1e9, seed=1, device="cpu"))
    kv = KVShareRanges(steps=(KV_STEP, KV_STEP + 1), blocks=(1, 2), max_map_block=0)
    model, job = ModelShape.from_config(pipe.transformer.config), JobShape(H, W, FRAMES, 4)
    plan = plan_kv(model, job, 1, 1, MemoryBudget(*PLACEMENT_BUDGETS[placement]), placement)
    reference = load_image(shared_data / "reference_person.png")
    renderer = PipelineRenderer(pipe, prompt="a man dancing", subject_positions=[1], reference=reference, kv=kv, job=settings)
    renderer.place_kv(plan, folder / "kv")
    return renderer, plan


@pytest.mark.parametrize("placement", ["gpu", "host", "disk"])
def test_every_stored_kv_placement_keeps_its_steps_guarded(pipe, counted, clean, tmp_path, shared_data, placement: str) -> None:
    """Issue 12's tiers under a feature cache: the anchor records and the base replays at step 2 with every block,
    whatever tier holds the K/V, and the base segment is the same frames on every tier."""
    renderer, plan = placed_renderer(pipe, placement, tmp_path, shared_data)
    assert plan.placement == placement
    blocks = pipe.transformer.config.num_layers
    marks: dict[str, list[int]] = {"anchor": [], "base": []}
    renderer.render_anchor(frames(1), frames(2), lambda step: marks["anchor"].append(len(counted)), record=True)
    start = len(counted)
    base = renderer.render_base(frames(3), frames(2), lambda step: marks["base"].append(len(counted) - start))
    counted.clear()
    for segment, done in marks.items():
        per_step = [b - a for a, b in zip([0, *done], done)]
        assert per_step == [2 * blocks, 2, 2 * blocks, 2, 2, 2 * blocks], (placement, segment)
    renderer.release_kv()
    reference, _ = placed_renderer(pipe, "gpu", tmp_path / "gpu", shared_data)
    reference.render_anchor(frames(1), frames(2), lambda step: None, record=True)
    np.testing.assert_array_equal(base, reference.render_base(frames(3), frames(2), lambda step: None))
    reference.release_kv()


def test_kv_recompute_beside_a_feature_cache_is_refused(pipe, counted, clean, tmp_path, shared_data) -> None:
    """The recomputed anchor forward would run through the cached blocks inside the base forward: refused (the job
    is refused earlier, by ``resolve_settings`` and the engine's K/V plan; this is the pipeline's own guard)."""
    renderer, plan = placed_renderer(pipe, "recompute", tmp_path, shared_data)
    assert plan.placement == "recompute"
    with pytest.raises(ValueError, match="cannot run beside K/V recomputation"):
        renderer.render_anchor(frames(1), frames(2), lambda step: None, record=True)

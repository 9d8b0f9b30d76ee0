"""K/V sizing and placement (``longvideo/memory.py``), the refusal before any work, and placements end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from animate_inputs import TEST_OPTIONS

from posegen_cli.errors import ResourceError, phrase
from posegen_cli.longvideo import AnimateOptions, animate, engine, loading
from posegen_cli.longvideo.memory import (
    GIB,
    JobShape,
    KVFitError,
    MemoryBudget,
    ModelShape,
    activation_bytes,
    kv_cache_bytes,
    kv_item_bytes,
    plan_kv,
)
from posegen_cli.longvideo.options import resolve_settings
from posegen_cli.longvideo.presets import SHOT_PRESETS, kv_share_ranges
from posegen_cli.longvideo.renderer import JobEmbeddings, PipelineRenderer
from posegen_cli.models import PoseGenTransformer3DModel, tiny_transformer_config
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline
from posegen_cli.pose import extract as extract_module
from posegen_cli.report import Reporter

torch.set_num_threads(1)

WAN_14B = {
    "patch_size": (1, 2, 2), "num_layers": 40, "num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824,
    "in_channels": 36, "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "image_dim": 1280,
    "added_kv_proj_dim": 5120, "use_hand": True, "use_hand_proj": False,
}  # fmt: skip
MODEL = ModelShape.from_config(WAN_14B)
JOB = JobShape(720, 1280)


def preset_counts(shot: str) -> tuple[int, int]:
    (s0, s1), (b0, b1) = SHOT_PRESETS[shot]
    return s1 - s0, b1 - b0


@pytest.mark.parametrize("config", [WAN_14B, tiny_transformer_config(num_layers=3), tiny_transformer_config(use_hand_proj=True)])
def test_parameter_count_formula_equals_the_built_model(config: dict) -> None:
    with init_empty_weights():
        model = PoseGenTransformer3DModel(**config)
    assert ModelShape.from_config(config).num_parameters() == sum(p.numel() for p in model.parameters())


def test_kv_sizes_at_720p_are_the_specs_numbers() -> None:
    """79,200 tokens x 5,120 x bf16 per tensor (port spec §2.6): 811 MB each, K and V per (step, branch, block)."""
    assert JOB.tokens(MODEL) == (21 * 45 * 80, 45 * 80) == (75_600, 3_600)
    assert kv_item_bytes(MODEL, JOB, "inputs") == 79_200 * 5_120 * 2 == 811_008_000
    assert kv_item_bytes(MODEL, JOB, "kv") == 2 * 811_008_000
    masks = 75_600
    expected_items = {"close-up": 1 * 2 * 6, "half-body": 2 * 2 * 6, "full-body": 4 * 2 * 8, "distant": 4 * 2 * 10}
    for shot, items in expected_items.items():
        steps, blocks = preset_counts(shot)
        assert kv_cache_bytes(MODEL, JOB, steps, blocks) == items * 2 * 811_008_000 + steps * masks
        assert kv_cache_bytes(MODEL, JOB, steps, blocks, "inputs") == items * 811_008_000 + steps * masks
    assert round(kv_cache_bytes(MODEL, JOB, *preset_counts("full-body")) / 1e9, 1) == 103.8
    assert round(kv_cache_bytes(MODEL, JOB, *preset_counts("distant")) / 1e9, 1) == 129.8
    assert kv_item_bytes(MODEL, JobShape(720, 1280, guidance=False), "kv") == kv_item_bytes(MODEL, JOB, "kv")


def h100_budget(host_gib: float = 64, disk_gib: float = 500) -> MemoryBudget:
    """An 80 GB GPU holding the bf16 DiT and one forward's activations, 64 GB of host memory."""
    resident = MODEL.num_parameters() * 2 + activation_bytes(MODEL, JOB)
    return MemoryBudget(int(79.2 * GIB), resident, int(host_gib * GIB), int(disk_gib * GIB))


def test_every_preset_fits_an_80_gb_gpu_with_64_gb_of_host_memory() -> None:
    budget = h100_budget()
    chosen = {shot: plan_kv(MODEL, JOB, *preset_counts(shot), budget) for shot in SHOT_PRESETS}
    assert {shot: (p.placement, p.fmt) for shot, p in chosen.items()} == {
        "close-up": ("gpu", "kv"),
        "half-body": ("gpu", "kv"),
        "full-body": ("gpu+host", "inputs"),
        "distant": ("gpu+host", "inputs"),
    }
    for shot, plan in chosen.items():
        assert plan.tiers["gpu"] + plan.transient_gpu <= budget.gpu_for_kv
        assert plan.tiers["host"] <= budget.host_for_kv and plan.tiers["disk"] == 0
        assert plan.extra_forwards == 0
    assert chosen["full-body"].tiers["gpu"] + chosen["full-body"].tiers["host"] == 64 * 811_008_000
    # a smaller host spills the rest to disk, and without disk the job recomputes
    spilled = plan_kv(MODEL, JOB, *preset_counts("distant"), h100_budget(host_gib=16))
    assert spilled.placement == "gpu+host+disk" and spilled.tiers["disk"] > 0
    assert spilled.read_bytes == spilled.tiers["host"] + spilled.tiers["disk"]
    recompute = plan_kv(MODEL, JOB, *preset_counts("distant"), h100_budget(host_gib=16, disk_gib=0))
    assert recompute.placement == "recompute" and recompute.extra_forwards == 4 * 2
    assert recompute.transient_gpu == 10 * 811_008_000 and sum(recompute.tiers.values()) == 0


def test_explicit_placements_use_only_their_tier() -> None:
    budget = h100_budget()
    steps, blocks = preset_counts("full-body")
    assert plan_kv(MODEL, JOB, steps, blocks, budget, "host").tiers == {"gpu": 0, "host": 64 * 811_008_000, "disk": 0}
    assert plan_kv(MODEL, JOB, steps, blocks, budget, "disk").tiers["disk"] == 64 * 811_008_000
    assert plan_kv(MODEL, JOB, *preset_counts("close-up"), budget, "gpu").fmt == "kv"
    with pytest.raises(KVFitError) as refused:
        plan_kv(MODEL, JOB, steps, blocks, budget, "gpu")
    # 128 GB of inputs cannot all sit on the GPU; auto splits them between GPU and host, so that is the advice
    kinds = {o.kind: o.detail for o in refused.value.options}
    assert kinds["placement"] == "auto"
    with pytest.raises(KVFitError) as refused:
        plan_kv(MODEL, JOB, steps, blocks, h100_budget(host_gib=0, disk_gib=0), "host")
    assert {o.kind: o.detail for o in refused.value.options}["placement"] == "recompute"
    with pytest.raises(ValueError, match="placement"):
        plan_kv(MODEL, JOB, steps, blocks, budget, "tape")


def test_refusal_names_the_options_that_fit() -> None:
    """Room for 3 blocks' inputs on the GPU, nothing on host or disk: stored K/V and recompute (8 blocks) both fail."""
    steps, blocks = preset_counts("full-body")
    resident = MODEL.num_parameters() * 2
    budget = MemoryBudget(resident + 2 * GIB + 3 * 811_008_000 + 1000, resident, 0, 0)
    with pytest.raises(KVFitError) as refused:
        plan_kv(MODEL, JOB, steps, blocks, budget)
    options = {o.kind: o.detail for o in refused.value.options}
    assert options["fewer_blocks"] == "3"
    assert "disk" not in options, "reading back from disk holds a forward's 8 entries plus 2 read ahead: more than recompute"
    assert options["gpu"] == f"{5 * 811_008_000 / GIB:.1f} GiB"
    # each option, applied, fits
    assert plan_kv(MODEL, JOB, steps, 3, budget).placement == "recompute"
    ranges = kv_share_ranges("full-body", 25, 40)
    message = phrase(refused.value.describe(ranges.steps, ranges.blocks))
    assert "--kv-blocks 37-40" in message and "--offload group" in message
    # asked for disk with room on the GPU for the entries in flight (8 + 2) but no disk: the disk it needs
    roomy = MemoryBudget(resident + 2 * GIB + 10 * 811_008_000, resident, 0, 0)
    with pytest.raises(KVFitError) as no_disk:
        plan_kv(MODEL, JOB, steps, blocks, roomy, "disk")
    need = {o.kind: o.detail for o in no_disk.value.options}["disk"]
    assert need == f"{(64 * 811_008_000 + 2 * GIB) / GIB:.1f} GiB"
    assert "--work-dir on a disk with" in phrase(no_disk.value.describe(ranges.steps, ranges.blocks))
    assert plan_kv(MODEL, JOB, steps, blocks, MemoryBudget(roomy.gpu_free, resident, 0, 64 * 811_008_000 + 2 * GIB), "disk").tiers["disk"] > 0


def test_a_job_that_cannot_fit_is_refused_before_any_work(
    tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "measure_budget", lambda device, resident, folder, reserved: MemoryBudget(resident, resident, 0, 0))
    extracted = []
    monkeypatch.setattr(extract_module, "extract_pose", lambda *a, **k: extracted.append(1))
    loaded = []
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: loaded.append(1))
    output = tmp_path / "out.mp4"
    options = AnimateOptions(**TEST_OPTIONS, models_dir=tiny_models, shot="half-body")
    with pytest.raises(ResourceError, match=r"background K/V .* need .* MiB stored .* \(try .*--offload group") as refused:
        animate(reference_image_path, driving_clip, output, options=options, reporter=Reporter(quiet=True))
    assert refused.value.exit_code == 4
    assert extracted == [] and loaded == [] and not output.exists()


@pytest.fixture(scope="module")
def pipe(tiny_models: Path) -> PoseGenPipeline:
    return loading.load_pipeline(tiny_models, device="cpu", dtype="float32")


def test_renderer_placements_give_the_same_base_segment(pipe: PoseGenPipeline, tmp_path: Path, shared_data: Path) -> None:
    """The engine's own path: the planner's choice turned into a store; every placement, one base segment."""
    from posegen_cli.video import load_image

    height, width, frames = 64, 32, 9
    job = JobShape(height, width, frames, 4)
    model = ModelShape.from_config(pipe.transformer.config)
    kv = kv_share_ranges("half-body", 2, model.num_layers)
    steps, blocks = kv.steps[1] - kv.steps[0], kv.blocks[1] - kv.blocks[0]
    item = kv_item_bytes(model, job, "inputs")
    room = GIB + 2 * GIB  # allocator headroom + 1 GiB for the K/V
    budgets = {
        "gpu": MemoryBudget(room, 0, 0, 0),
        "host": MemoryBudget(room, 0, 100 * GIB, 0),
        "disk": MemoryBudget(room, 0, 0, 100 * GIB),
        "recompute": MemoryBudget(room, 0, 0, 0),
    }
    mixed = MemoryBudget(2 * GIB + 3 * item, 0, 8 * GIB + 1 * item, 100 * GIB)
    plans = {name: plan_kv(model, job, steps, blocks, b, name) for name, b in budgets.items()}
    plans["gpu+host+disk"] = plan_kv(model, job, steps, blocks, mixed, "auto", lookahead=1)
    assert plans["gpu+host+disk"].placement == "gpu+host+disk"
    rng = np.random.default_rng(3)
    reference = load_image(shared_data / "reference_person.png")
    pose = [rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8) for _ in range(2)]
    hand = np.zeros((frames, height, width, 3), np.uint8)
    settings = resolve_settings(AnimateOptions(resolution=f"{width}x{height}", steps=2, guidance=5.0, seed=1, device="cpu"))
    results = {}
    embeddings = JobEmbeddings.encode(pipe, "a man dancing", reference, height, width)
    for name, plan in {"stored": None, **plans}.items():
        renderer = PipelineRenderer(
            pipe, embeddings, subject_positions=[1], kv=kv, job=settings,
        )  # fmt: skip
        renderer.place_kv(plan, tmp_path / "kv")
        renderer.render_anchor(pose[0], hand, lambda n: None, record=True)
        results[name] = renderer.render_base(pose[1], hand, lambda n: None)
        renderer.release_kv()
        assert not (tmp_path / "kv").exists() or not any((tmp_path / "kv").iterdir())
    for name, frames_out in results.items():
        np.testing.assert_array_equal(frames_out, results["stored"], err_msg=name)

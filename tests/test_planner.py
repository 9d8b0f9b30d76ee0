"""The job planner against counted FLOPs, a built model's parameters and a measured peak of live tensors (CPU)."""

from __future__ import annotations

import math
import sys
import weakref
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_dispatch import attention_backend
from posegen_reference import make_inputs
from rich.console import Console
from test_kv_share import segment_inputs
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from posegen_cli.cli import app, plan_summary
from posegen_cli.longvideo.memory import WAN_I2V_14B, JobShape, ModelShape, activation_bytes, kv_cache_bytes
from posegen_cli.longvideo.plan import plan_segments
from posegen_cli.longvideo.planner import GPUS, JobSpec, find_gpu, forward_flops, plan_job
from posegen_cli.models import KVShareCache, PoseGenTransformer3DModel, kv_sharing, tiny_transformer_config
from posegen_cli.report import Reporter


@pytest.fixture(autouse=True)
def _restore_active_backend():
    with attention_backend("native"):
        yield


@pytest.mark.parametrize("use_hand_proj", [False, True])
def test_parameter_count_equals_a_built_model(use_hand_proj: bool) -> None:
    config = tiny_transformer_config(num_layers=3, use_hand_proj=use_hand_proj)
    model = PoseGenTransformer3DModel(**config)
    assert ModelShape.from_config(config).num_parameters() == sum(p.numel() for p in model.parameters())


def counted_flops(model, inputs: dict, cache: KVShareCache | None = None, branch: str = "cond") -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter, kv_sharing(model, cache), model.cache_context(branch, step_index=0):
        model(**inputs)
    return counter.get_total_flops()


def test_flops_equal_a_counted_forward_in_every_mode() -> None:
    """PyTorch's math SDPA kernel runs attention as matrix products, which FlopCounterMode counts (its CPU flash kernel
    has no FLOP formula), so every FLOP of the forward is counted."""
    config = tiny_transformer_config(num_layers=5, use_hand_proj=True)
    model = PoseGenTransformer3DModel(**config).eval()
    model.set_attention_backend("_native_math")
    inputs = segment_inputs(31, model)
    shape = ModelShape.from_config(config, text_len=7, image_len=5)
    grid, ref = model.token_grid(inputs["hidden_states"]), model.token_grid(inputs["reference_latents"])
    assert counted_flops(model, inputs) == forward_flops(shape, grid, ref).total
    cache = KVShareCache({0}, {3, 4}, [2], max_map_block=2)
    assert counted_flops(model, inputs, cache, "cond") == forward_flops(shape, grid, ref, map_blocks=3).total
    assert counted_flops(model, inputs, cache, "uncond") == forward_flops(shape, grid, ref).total
    cache.start_replay()
    assert counted_flops(model, inputs, cache, "cond") == forward_flops(shape, grid, ref, map_blocks=3, replay_blocks=2).total
    assert counted_flops(model, inputs, cache, "uncond") == forward_flops(shape, grid, ref, replay_blocks=2).total


def test_full_size_figures_match_the_spec() -> None:
    """shared/specs/performance.md §D: 75,600 + 3,600 tokens, about 7.07 PFLOP per forward, 72-73 % of it attention;
    §2.6: 38.9 GB of K/V for the default 2 steps x 6 blocks."""
    flops = forward_flops(WAN_I2V_14B, (21, 45, 80), (1, 45, 80))
    assert 7.0e15 < flops.total < 7.1e15
    assert 0.72 < flops.attention / flops.total < 0.74
    kv_bytes = kv_cache_bytes(WAN_I2V_14B, JobShape(720, 1280), 2, 6)
    assert kv_bytes == 38_928_384_000 + 2 * 75_600, "K/V plus the two steps' uint8 subject masks"


class LiveBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storages made inside the mode and alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self.seen:
                    self.seen.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self.seen.discard(key)
        self.live -= size


ACTIVATION_TOLERANCE = 0.25
"""The estimate counts the tensors the block's code keeps alive; CPU bf16 kernels add float32 temporaries that CUDA
kernels do not (the GPU suite compares the estimate with measured CUDA peaks, the 10 % target)."""


def test_activation_estimate_is_close_to_a_measured_cpu_peak() -> None:
    config = tiny_transformer_config(num_layers=2, num_attention_heads=4, attention_head_dim=24, ffn_dim=256)
    model = PoseGenTransformer3DModel(**config).to(torch.bfloat16).eval()
    inputs = {k: v.to(torch.bfloat16) for k, v in make_inputs(32, model.config, frames=5, height=40, width=24).items()}
    shape = ModelShape.from_config(config, text_len=7, image_len=5)
    with torch.no_grad():
        model(**inputs)  # the CPU RoPE tables are cached from the first call, as in a job
        tracker = LiveBytes()
        with tracker:
            model(**inputs)
    f, h, w = inputs["hidden_states"].shape[2:]
    estimate = activation_bytes(shape, JobShape(h * 8, w * 8, (f - 1) * 4 + 1))
    assert abs(estimate - tracker.peak) <= ACTIVATION_TOLERANCE * tracker.peak, (estimate, tracker.peak)


def test_gpu_table_and_names() -> None:
    assert {"H200", "H100", "A100-80GB", "L40S", "RTX 4090"} <= set(GPUS)
    assert find_gpu("NVIDIA H100 80GB HBM3").name == "H100"
    assert find_gpu("NVIDIA H200").name == "H200"
    assert find_gpu("NVIDIA A100-SXM4-80GB").name == "A100-80GB"
    assert find_gpu("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert find_gpu("l40s").name == "L40S"
    assert GPUS["A100-80GB"].fp8_tflops is None
    with pytest.raises(ValueError, match="known"):
        find_gpu("Voodoo 3")


def job(gpu: str | None = "H100", **overrides):
    settings = {"height": 1280, "width": 720, "frames": 81, "steps": 25, "guidance": 5.0, "kv_steps": (0, 2), "kv_blocks": (34, 40),
                "max_map_block": 10, "attention": "flash3", "compiled": True, "quantize": "none", "offload": "none"}  # fmt: skip
    settings.update(overrides)
    return plan_job(plan_segments(1800), WAN_I2V_14B, JobSpec(**settings), None if gpu is None else GPUS[gpu])


def test_job_plan_counts_passes_and_places_the_kv_cache() -> None:
    plan = job()
    segments = plan_segments(1800)
    assert [seg.index for seg in plan.segments] == [seg.index for seg in segments]
    assert plan.passes == len(segments) * 25 * 2
    assert (plan.kv["placement"], plan.kv["format"]) == ("gpu", "inputs"), "36 GiB of K/V do not fit beside 38 GiB on 80 GB"
    assert (job(gpu="H200").kv["placement"], job(gpu="H200").kv["format"]) == ("gpu", "kv")
    assert job(quantize="fp8").memory_gib["transformer_weights"] < 0.55 * plan.memory_gib["transformer_weights"]
    assert job(quantize="fp8").seconds < plan.seconds < job(compiled=False).seconds < job(attention="native", compiled=False).seconds
    group = job(gpu="RTX 4090", offload="group", quantize="fp8")
    assert group.peak_gib < 24 and not any("exceeds" in note for note in group.notes)
    assert any("exceeds" in note for note in job(gpu="RTX 4090").notes)
    base = next(seg for seg in plan.segments if seg.kind == "base")
    transition = next(seg for seg in plan.segments if seg.kind == "transition")
    assert base.flops > transition.flops, "replaying the anchor's K/V adds source attention"
    assert math.isclose(plan.flops, sum(seg.flops for seg in plan.segments))
    assert plan.peak_gib > plan.memory_gib["resident_during_segments"] + plan.kv["tiers_gib"]["gpu"] - 0.01
    assert job(gpu=None).seconds is None


def test_job_plan_places_the_kv_cache_as_the_run_does() -> None:
    """The dry run's K/V placement is ``memory.plan_kv`` on the same sizing the run measures against."""
    gib = 1024**3
    full_body = {"kv_steps": (0, 4), "kv_blocks": (32, 40)}
    split = job(host_free=64 * gib, **full_body)
    assert split.kv["placement"] == "gpu+host" and split.kv["tiers_gib"]["host"] > 0
    base = next(seg for seg in split.segments if seg.kind == "base")
    anchor = next(seg for seg in split.segments if seg.kind == "anchor")
    assert math.isclose(base.peak_gib - anchor.peak_gib, split.kv["in_flight_gib"], abs_tol=0.02), "entries read back sit on the GPU"
    recompute = job(host_free=0, disk_free=0, **full_body)
    assert recompute.kv["placement"] == "recompute" and recompute.kv["extra_forwards_per_base"] == 4 * 2
    refused = job(gpu="RTX 4090", host_free=0, disk_free=0)
    assert refused.kv["placement"] == "refused" and "{@offload} group" in refused.kv["refused"]
    assert any(note.startswith("the run would refuse this job before any work") for note in refused.notes)


def test_dry_run_cli_loads_no_model_and_prints_json(tmp_path: Path, reference_image_path: Path, driving_clip: Path) -> None:
    runner = CliRunner()
    args = ["animate", str(reference_image_path), str(driving_clip), "--dry-run", "--json", "--gpu", "H200", "--shot", "close-up",
            "--models-dir", str(tmp_path)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(result.stdout)
    assert data["gpu"] == "H200" and data["passes"] == len(data["segments"]) * 50
    assert data["settings"]["attention"] == "cudnn" and data["kv"]["steps"] == [0, 1]
    assert data["kv"]["placement"] == "none", "a 36-frame clip is the anchor alone"
    assert any(note.startswith("K/V placement sized with") for note in data["notes"])
    bad = runner.invoke(app, ["animate", str(reference_image_path), str(driving_clip), "--dry-run", "--gpu", "Voodoo"])
    assert bad.exit_code == 2 and "known" in bad.output


def test_dry_run_output_spells_a_refusal_with_flags(capsys: pytest.CaptureFixture[str]) -> None:
    refused = job(gpu="RTX 4090", host_free=0, disk_free=0)
    for json_output in (False, True):
        Reporter(json_output=json_output, console=Console(file=sys.stdout, width=400)).summary(plan_summary(refused))
        out = capsys.readouterr().out
        assert "fits nowhere: the anchor's background K/V" in out and "(try --offload group" in out
        assert "{@" not in out, "settings are spelled as flags"


@pytest.mark.parametrize(("flag", "message"), [(["--attention", "flash3"], "needs a CUDA GPU"), (["--quantize", "fp8"], "FP8 GPU")])
def test_unavailable_speed_options_exit_2_before_any_work(
    reference_image_path: Path, driving_clip: Path, tmp_path: Path, flag, message
) -> None:
    result = CliRunner().invoke(app, ["animate", str(reference_image_path), str(driving_clip), "-o", str(tmp_path / "o.mp4"),
                                      "--device", "cpu", *flag])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_dry_run_plans_the_distilled_schedule_and_lists_every_approximation(
    tmp_path: Path, reference_image_path: Path, driving_clip: Path
) -> None:
    """turbo on an H200: 4 one-pass steps, the preset's K/V steps mapped onto them, each approximation named."""
    import json

    args = ["animate", str(reference_image_path), str(driving_clip), "--dry-run", "--json", "--gpu", "H200", "--shot", "half-body",
            "--models-dir", str(tmp_path)]  # fmt: skip
    exact = json.loads(CliRunner().invoke(app, args).stdout)
    result = CliRunner().invoke(app, [*args, "--speed", "turbo"])
    assert result.exit_code == 0, result.output
    turbo = json.loads(result.stdout)
    assert (turbo["settings"]["steps"], turbo["settings"]["guidance"], turbo["settings"]["distill"]) == (4, 1.0, "lightx2v")
    assert turbo["passes"] == len(turbo["segments"]) * 4 and exact["passes"] == len(exact["segments"]) * 50
    assert exact["kv"]["steps"] == [0, 2] and turbo["kv"]["steps"] == [0, 1], "half-body's 2 shared steps become 1 of 4"
    assert turbo["kv"]["bytes"] * 4 == exact["kv"]["bytes"], "half the shared steps and one guidance branch: a quarter of the K/V"
    assert "release steps 0-2 of 25" in turbo["settings"]["kv_steps_rule"]
    assert [line.split(":")[0] for line in turbo["settings"]["approximations"]] == ["distillation", "guidance", "attention", "weights"]
    assert exact["settings"]["approximations"] == "none (release-exact)" and exact["settings"]["kv_steps_rule"] is None
    fast = json.loads(CliRunner().invoke(app, [*args, "--speed", "fast"]).stdout)
    assert fast["settings"]["cache"] == "magcache" and any("cache magcache" in note for note in fast["notes"])

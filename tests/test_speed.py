"""Speed presets: each sets what it says, an explicit flag wins, the K/V steps move onto a distilled schedule by rule."""

from __future__ import annotations

import pytest
import torch

from posegen_cli.choices import SPEED_PRESETS
from posegen_cli.errors import InputError
from posegen_cli.longvideo.engine import kv_steps_for
from posegen_cli.longvideo.options import AnimateOptions, resolve_settings
from posegen_cli.longvideo.presets import SHOT_PRESETS, map_kv_steps
from posegen_cli.longvideo.speed import resolve_speed
from posegen_cli.models.distill import LIGHTX2V
from posegen_cli.models.feature_cache import DEFAULT_THRESHOLDS
from posegen_cli.pipelines.scheduling import shifted_sigmas, unshifted_sigmas


def test_exact_is_the_release_path_with_nothing_approximated() -> None:
    exact = resolve_speed("exact")
    assert (exact.steps, exact.guidance, exact.sigmas, exact.distill, exact.cache) == (25, 5.0, None, None, "none")
    assert (exact.attention, exact.quantize, exact.approximations) == ("auto", "none", ())


def test_fast_adds_sageattention_and_magcache() -> None:
    fast = resolve_speed("fast")
    assert (fast.steps, fast.guidance, fast.distill) == (25, 5.0, None)
    assert (fast.attention, fast.cache, fast.cache_threshold, fast.quantize) == ("sage", "magcache", DEFAULT_THRESHOLDS["magcache"], "none")
    assert [line.split(":")[0] for line in fast.approximations] == ["cache", "attention"]


def test_turbo_adds_the_distillation_lora_its_schedule_and_fp8() -> None:
    turbo = resolve_speed("turbo")
    assert (turbo.distill, turbo.distill_weight, turbo.steps, turbo.guidance) == ("lightx2v", 1.0, 4, 1.0)
    assert turbo.sigmas == (1.0, 0.75, 0.5, 0.25)
    assert (turbo.quantize, turbo.attention, turbo.cache) == ("fp8", "sage", "none")
    assert [line.split(":")[0] for line in turbo.approximations] == ["distillation", "guidance", "attention", "weights"]
    assert "[1000, 750, 500, 250]" in turbo.approximations[0] and "ModelTC/LightX2V" in turbo.approximations[0]


@pytest.mark.parametrize(
    ("speed", "flags", "expected"),
    [
        ("turbo", {"distill": "none"}, {"distill": None, "steps": 25, "guidance": 5.0, "sigmas": None}),
        ("turbo", {"guidance": 2.0, "distill_weight": 0.5}, {"guidance": 2.0, "distill_weight": 0.5, "steps": 4}),
        ("turbo", {"quantize": "none", "attention": "native"}, {"quantize": "none", "attention": "native"}),
        ("fast", {"cache": "fbc"}, {"cache": "fbc", "cache_threshold": DEFAULT_THRESHOLDS["fbc"]}),
        ("fast", {"cache_threshold": 0.3}, {"cache": "magcache", "cache_threshold": 0.3}),
        ("fast", {"cache": "none", "cache_threshold": 0.3}, {"cache": "none", "cache_threshold": None}),
        ("fast", {"steps": 10, "attention": "flash3"}, {"steps": 10, "attention": "flash3"}),
        ("exact", {"distill": "lightx2v"}, {"distill": "lightx2v", "steps": 4, "guidance": 1.0, "quantize": "none"}),
        ("exact", {"cache": "magcache", "quantize": "int8"}, {"cache": "magcache", "quantize": "int8", "attention": "auto"}),
    ],
)
def test_an_explicit_flag_wins_over_the_preset(speed: str, flags: dict, expected: dict) -> None:
    settings = resolve_speed(speed, **flags)
    assert {key: getattr(settings, key) for key in expected} == expected


def test_settings_that_do_not_fit_are_input_errors() -> None:
    with pytest.raises(InputError, match="--steps 8 does not fit --distill lightx2v, trained for 4 steps"):
        resolve_speed("turbo", steps=8)
    with pytest.raises(InputError, match="--cache magcache is calibrated on undistilled Wan2.1"):
        resolve_speed("turbo", cache="magcache")
    with pytest.raises(InputError, match="--speed 'ludicrous' is not known"):
        resolve_speed("ludicrous")
    with pytest.raises(InputError, match="--cache 'teacache' is not known"):
        resolve_speed("exact", cache="teacache")


def test_job_settings_take_the_preset_and_key_the_work_folder_by_it() -> None:
    exact, turbo = resolve_settings(AnimateOptions()), resolve_settings(AnimateOptions(speed="turbo"))
    assert (exact.steps, exact.guidance, turbo.steps, turbo.guidance) == (25, 5.0, 4, 1.0)
    assert exact.key_fields() != turbo.key_fields() and turbo.key_fields()["distill"] == "lightx2v"
    assert resolve_settings(AnimateOptions(speed="turbo", preview=True)).steps == 4


def test_unknown_attention_or_quantize_and_cache_with_group_offload_are_input_errors() -> None:
    with pytest.raises(InputError, match="--attention 'xformers' is not known"):
        resolve_speed("exact", attention="xformers")
    with pytest.raises(InputError, match="--quantize 'int4' is not known"):
        resolve_speed("exact", quantize="int4")
    with pytest.raises(InputError, match="--cache magcache does not combine with --offload group"):
        resolve_settings(AnimateOptions(speed="fast", offload="group"))
    with pytest.raises(InputError, match="--cache fbc does not combine with --offload group.*--offload model or --cache none"):
        resolve_settings(AnimateOptions(cache="fbc", offload="group"))


def test_exact_attention_kernels_share_a_work_folder_key_and_approximate_ones_do_not() -> None:
    keys = {name: resolve_settings(AnimateOptions(attention=name)).key_fields() for name in ("auto", "native", "cudnn", "sage")}
    assert keys["auto"] == keys["native"] == keys["cudnn"] != keys["sage"]
    assert resolve_settings(AnimateOptions(quantize="int8")).key_fields() != keys["native"]


def test_a_presets_kernel_or_fp8_that_cannot_run_here_falls_back_and_an_explicit_one_raises() -> None:
    from posegen_cli.longvideo.engine import fit_speed_to_device
    from posegen_cli.report import Reporter

    turbo = fit_speed_to_device(resolve_settings(AnimateOptions(speed="turbo", device="cpu")), Reporter(quiet=True))
    assert (turbo.speed.attention, turbo.speed.quantize, turbo.speed.distill) == ("auto", "none", "lightx2v")
    notes = [line for line in turbo.speed.approximations if line.startswith(("attention:", "weights:"))]
    assert notes == [
        (
            "attention: sage of the turbo preset not applied (attention kernel 'sage' needs a CUDA GPU (this run is on cpu); "
            "use native or auto); auto instead"
        ),
        (
            "weights: fp8 of the turbo preset not applied (fp8 weights need an FP8 GPU (compute capability 8.9 or newer: "
            "L40S, RTX 4090, H100, H200), not a CPU; use int8 or none); none instead"
        ),
    ]
    assert turbo.key_fields() == resolve_settings(AnimateOptions(speed="turbo", attention="auto", quantize="none")).key_fields()
    with pytest.raises(InputError, match="attention kernel 'sage' needs a CUDA GPU"):
        fit_speed_to_device(resolve_settings(AnimateOptions(speed="turbo", attention="sage", device="cpu")), Reporter(quiet=True))
    with pytest.raises(InputError, match="fp8 weights need an FP8 GPU"):
        fit_speed_to_device(resolve_settings(AnimateOptions(quantize="fp8", device="cpu")), Reporter(quiet=True))


def test_preset_texts_state_speedup_and_risk() -> None:
    for preset in SPEED_PRESETS.values():
        assert preset.speedup and preset.quality_risk


def test_kv_steps_move_onto_the_distilled_schedule_by_noise_level() -> None:
    release = shifted_sigmas(unshifted_sigmas(25)).tolist()
    distilled = shifted_sigmas(torch.tensor(resolve_speed("turbo").sigmas)).tolist()
    assert [map_kv_steps(SHOT_PRESETS[shot][0], release, distilled) for shot in SHOT_PRESETS] == [(0, 1)] * 4
    assert map_kv_steps((0, 25), release, distilled) == (0, 4), "the whole release range covers every step"
    assert map_kv_steps((0, 2), release, release) == (0, 2), "the release's own schedule maps onto itself"
    assert map_kv_steps((3, 4), release, distilled) == (0, 1), "no step inside: the one nearest the first shared level"
    steps, rule = kv_steps_for("full-body", resolve_settings(AnimateOptions(speed="turbo")))
    assert steps == (0, 1) and rule.startswith("release steps 0-4 of 25 (sigma 1.0000-0.9735) -> steps 0-1 of 4")
    assert kv_steps_for("full-body", resolve_settings(AnimateOptions(speed="turbo", kv_steps="0-2"))) == ((0, 2), None)
    assert kv_steps_for("full-body", resolve_settings(AnimateOptions())) == (None, None)
    assert len(LIGHTX2V.denoising_step_list) == 4


def test_choice_tuples_match_the_library_tables() -> None:
    from posegen_cli import choices
    from posegen_cli.models.distill import DISTILL_PRESETS

    assert choices.DISTILLS == ("none", *DISTILL_PRESETS)
    assert choices.SPEEDS == ("exact", "fast", "turbo") and choices.DEFAULT_SPEED == "exact"
    assert set(DEFAULT_THRESHOLDS) == set(choices.CACHES) - {"none"}


def test_a_cache_beside_kv_recompute_and_the_camera_beside_guidance_one_are_refused() -> None:
    from posegen_cli.errors import ResourceError
    from posegen_cli.longvideo.engine import check_cache_placement
    from posegen_cli.longvideo.memory import JobShape, MemoryBudget, ModelShape, plan_kv

    with pytest.raises(InputError, match="--cache magcache does not combine with --kv-placement recompute.*--kv-placement host or disk"):
        resolve_settings(AnimateOptions(speed="fast", kv_placement="recompute"))
    assert resolve_settings(AnimateOptions(cache="none", kv_placement="recompute")).speed.cache == "none"
    with pytest.raises(InputError, match="--camera works through the negative guidance branch, which --distill lightx2v turns off"):
        resolve_settings(AnimateOptions(speed="turbo", camera="pan-left"))
    assert resolve_settings(AnimateOptions(speed="turbo", camera="pan-left", guidance=5.0)).guidance == 5.0
    # kv_placement auto may still land on recompute when nothing else fits: the engine refuses that plan
    from posegen_cli.models import tiny_transformer_config

    model, job = ModelShape.from_config(tiny_transformer_config()), JobShape(64, 32, 9, 4)
    recompute = plan_kv(model, job, 1, 1, MemoryBudget(3 * 1024**3, 0, 0, 0), "recompute")
    with pytest.raises(ResourceError, match=r"--kv-placement auto chose recompute\), which --cache fbc cannot run beside"):
        check_cache_placement("fbc", recompute)
    check_cache_placement("none", recompute)
    check_cache_placement("fbc", plan_kv(model, job, 1, 1, MemoryBudget(3 * 1024**3, 0, 0, 0), "gpu"))

"""The step-distillation LoRA beside PoseGen's: LightX2V's key layout, stacking with each variant, the schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from posegen_reference import make_inputs, reference_from_inputs, release_config
from safetensors.torch import save_file
from test_convert import two_variant_folders

from posegen_cli.errors import InputError
from posegen_cli.models import PoseGenVariants
from posegen_cli.models.distill import DISTILL_ADAPTER, LIGHTX2V, distill_unshifted_sigmas, read_distill_lora
from posegen_cli.testing import lightx2v_lora

torch.set_num_threads(1)

WEIGHT = 0.7


def merge_lora(merged: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """Reference: fold the LoRA into release-named weights, W += weight * alpha/r * up @ down, b += weight * diff_b."""
    out = dict(merged)
    for key, down in lora.items():
        if not key.endswith(".lora_down.weight"):
            continue
        module = key.removeprefix("diffusion_model.").removesuffix(".lora_down.weight")
        up = lora[f"diffusion_model.{module}.lora_up.weight"]
        alpha = lora.get(f"diffusion_model.{module}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        out[f"{module}.weight"] = out[f"{module}.weight"] + weight * scale * (up @ down)
        bias = lora.get(f"diffusion_model.{module}.diff_b")
        if bias is not None:
            out[f"{module}.bias"] = out[f"{module}.bias"] + weight * bias
    return out


@pytest.fixture
def folders(tmp_path: Path):
    return two_variant_folders(tmp_path)


def load_variants(folder: Path, mode: str) -> PoseGenVariants:
    """Both variants of ``two_variant_folders`` in ``mode``; "converted" reads issue 12's converted-checkpoint cache."""
    if mode != "converted":
        return PoseGenVariants.from_release(folder / "base", folder / "cond", dtype=torch.float32, mode=mode)
    from posegen_cli.models.checkpoint_cache import converted_checkpoint

    base, cond = (converted_checkpoint(folder / name, torch.float32, root=folder / "converted") for name in ("base", "cond"))
    return PoseGenVariants.from_converted(base, cond, dtype=torch.float32)


@pytest.mark.parametrize("mode", ["exact", "adapter", "converted"])
def test_lightx2v_lora_stacks_with_each_variant_like_merging_both(tmp_path: Path, folders, mode: str) -> None:
    merged_base, cfg_base, merged_cond, cfg_cond = folders
    raw = lightx2v_lora(merged_base, cfg_base["num_layers"], 21)
    save_file(raw, tmp_path / "distill.safetensors")
    lora = read_distill_lora(tmp_path / "distill.safetensors")
    assert lora.ignored == tuple(f"diffusion_model.blocks.{i}.norm3.diff" for i in range(cfg_base["num_layers"]))

    variants = load_variants(tmp_path, mode)
    inputs = make_inputs(12, variants.model.config)
    with torch.no_grad():
        plain = {name: variants.activate(name)(**inputs).sample for name in ("transition", "base")}
        variants.load_distill(lora, WEIGHT)
        for name, merged, cfg in (
            ("transition", merged_cond, cfg_cond),
            ("base", merged_base, cfg_base),
            ("transition", merged_cond, cfg_cond),
        ):
            out = variants.activate(name)(**inputs).sample
            ref = reference_from_inputs(merge_lora(merged, raw, WEIGHT), release_config(cfg), inputs)
            assert (out - ref).abs().max().item() <= 2e-5 * ref.abs().max().item(), (mode, name)
            assert (out - plain[name]).abs().max().item() > 1e-2, "the distillation LoRA must change the output"
            assert DISTILL_ADAPTER in variants.model.active_adapters(), "a variant switch must keep the distillation adapter"


INT8_TOLERANCE = 0.02
"""As in ``test_acceleration``: relative L2 error of int8 weight-only outputs against unquantised ones (about 0.5 %)."""


def test_int8_weights_under_the_distillation_lora_follow_each_swap(tmp_path: Path, folders) -> None:
    """turbo's stack on the CPU: the LoRA wraps the linears, torchao quantises their base layers (not the LoRA's
    low-rank layers), and a variant swap re-quantises the base layer under the adapter."""
    from posegen_cli.models.acceleration import quantization_config

    merged_base, cfg_base, _, _ = folders
    lora = read_distill_lora(lightx2v_lora(merged_base, cfg_base["num_layers"], 23))
    reference = PoseGenVariants.from_release(tmp_path / "base", tmp_path / "cond", dtype=torch.bfloat16)
    variants = PoseGenVariants.from_release(tmp_path / "base", tmp_path / "cond", dtype=torch.bfloat16)
    reference.load_distill(lora, WEIGHT)
    variants.load_distill(lora, WEIGHT)
    variants.quantize(quantization_config("int8", torch.device("cpu")))
    inputs = {k: v.to(torch.bfloat16) for k, v in make_inputs(24, variants.model.config).items()}
    outs = []
    with torch.no_grad():
        for name in ("base", "transition", "base"):
            expected = reference.activate(name)(**inputs).sample
            out = variants.activate(name)(**inputs).sample
            error = float((out.float() - expected.float()).norm() / expected.float().norm())
            assert error < INT8_TOLERANCE, name
            outs.append(out)
    assert torch.equal(outs[0], outs[2])
    quantized = {n for n, p in variants.model.named_parameters() if type(p.data) is not torch.Tensor}
    assert "blocks.0.attn1.to_q.base_layer.weight" in quantized
    assert not any(".lora_" in n for n in quantized), "the LoRA's low-rank layers stay in the model dtype"


def test_distill_weight_zero_is_the_plain_variant(tmp_path: Path, folders) -> None:
    merged_base, cfg_base, _, _ = folders
    lora = read_distill_lora(lightx2v_lora(merged_base, cfg_base["num_layers"], 22))
    variants = PoseGenVariants.from_release(tmp_path / "base", tmp_path / "cond", dtype=torch.float32)
    inputs = make_inputs(12, variants.model.config)
    with torch.no_grad():
        plain = variants.activate("base")(**inputs).sample
        variants.load_distill(lora, 0.0)
        assert torch.equal(variants.activate("base")(**inputs).sample, plain)


def test_foreign_or_broken_lora_files_are_input_errors(tmp_path: Path, folders) -> None:
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="broken.safetensors: not a readable safetensors LoRA"):
        read_distill_lora(tmp_path / "broken.safetensors")
    with pytest.raises(InputError, match="holds no LoRA pairs"):
        read_distill_lora({"transformer.blocks.0.attn1.to_q.weight": torch.zeros(2, 2)})
    variants = PoseGenVariants.from_release(tmp_path / "base", tmp_path / "cond", dtype=torch.float32)
    too_deep = {"diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(2, 24),
                "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(24, 2)}  # fmt: skip
    with pytest.raises(InputError, match=r"blocks\.7\.attn1\.to_q, which the PoseGen DiT does not have"):
        variants.load_distill(read_distill_lora(too_deep))


def test_lightx2v_schedule_is_the_authors_four_steps() -> None:
    sigmas = distill_unshifted_sigmas(LIGHTX2V.denoising_step_list)
    assert sigmas.tolist() == [1.0, 0.75, 0.5, 0.25]
    shifted = LIGHTX2V.shift * sigmas / (1 + (LIGHTX2V.shift - 1) * sigmas)
    assert torch.allclose(shifted, torch.tensor([1.0, 0.9375, 5 / 6, 0.625]))
    assert LIGHTX2V.guidance_scale == 1.0
    with pytest.raises(ValueError, match="strictly decreasing"):
        distill_unshifted_sigmas((500, 750))


def test_pipeline_loads_the_distillation_on_the_converted_cache(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The converted cache holds the PoseGen checkpoints alone: a distilled job reuses the plain job's copies (no new
    conversion, no CPU merge), and its switches copy PoseGen tensors into the LoRA-wrapped base layers."""
    from posegen_cli.longvideo.loading import DiTWeights, load_pipeline
    from posegen_cli.models import checkpoint_cache as cc
    from posegen_cli.models.distill import DistillChoice

    plain = load_pipeline(tiny_models, device="cpu", dtype="float32", load_encoders=False)
    monkeypatch.setattr(cc, "load_release_model", lambda *a, **k: pytest.fail("the distilled job must reuse the converted copies"))
    weights = DiTWeights(distill=DistillChoice("lightx2v", WEIGHT))
    distilled = load_pipeline(tiny_models, device="cpu", dtype="float32", load_encoders=False, weights=weights)
    assert distilled.variants is not None and distilled.variants.mode == "converted"
    for name in ("transition", "base"):
        plain.use_variant(name)
        distilled.use_variant(name)
        assert DISTILL_ADAPTER in distilled.transformer.active_adapters(), name
        ours = {k.replace(".base_layer.", "."): v for k, v in distilled.transformer.state_dict().items() if ".lora_" not in k}
        theirs = plain.transformer.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), name

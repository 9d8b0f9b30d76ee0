"""The diffusers port of the PoseGen DiT against an independent functional forward written from the spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from peft import LoraConfig
from posegen_reference import make_inputs, randomize_, reference_from_inputs, release_config, to_release_names

import posegen_cli.models.transformer as transformer_module
from posegen_cli.models import PoseGenTransformer3DModel, tiny_transformer_config

torch.set_num_threads(1)

BF16_ULP_BOUND = 0
"""Both sides run the same bf16 op sequence on CPU, so the stated bound is 0 ULP (bitwise)."""


def build(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PoseGenTransformer3DModel:
    model = PoseGenTransformer3DModel(**tiny_transformer_config(**overrides)).eval()
    return randomize_(model, seed).to(dtype)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in representable bf16 steps between matching elements."""
    ia = a.contiguous().view(torch.int16).int()
    ib = b.contiguous().view(torch.int16).int()
    # Map the sign-magnitude bit patterns onto a monotone integer line.
    ia = torch.where(ia < 0, -32768 - ia, ia)
    ib = torch.where(ib < 0, -32768 - ib, ib)
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("shift_ref_pos", [False, True])
@pytest.mark.parametrize("use_hand_proj", [False, True])
def test_forward_matches_reference_fp32_and_bf16(shift_ref_pos: bool, use_hand_proj: bool) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        model = build(1, dtype, num_layers=3, shift_ref_pos=shift_ref_pos, use_hand_proj=use_hand_proj)
        inputs = make_inputs(2, model.config)
        with torch.no_grad():
            out = model(**inputs).sample
            ref = reference_from_inputs(to_release_names(model.state_dict()), release_config(model.config), inputs)
        assert out.shape == (1, 16, 3, 6, 8) and out.dtype == dtype
        if dtype == torch.float32:
            assert (out - ref).abs().max().item() <= 1e-5
        else:
            assert ulp_distance(out, ref) <= BF16_ULP_BOUND


def test_shift_ref_pos_and_hand_inputs_change_the_output() -> None:
    """Guards the reference comparison itself: each option must matter, or the parametrisation proves nothing."""
    inputs = make_inputs(3, tiny_transformer_config())
    with torch.no_grad():
        base = build(4)(**inputs).sample
        shifted = build(4, shift_ref_pos=True)(**inputs).sample
        no_hand = build(4)(**{**inputs, "hand_latents": None}).sample
    assert (base - shifted).abs().max() > 1e-3
    assert (base - no_hand).abs().max() > 1e-3


def test_timestep_is_rounded_to_the_model_dtype_before_embedding() -> None:
    inputs = make_inputs(5, tiny_transformer_config())
    exact = {**inputs, "timestep": torch.tensor([991.7355])}
    rounded = {**inputs, "timestep": torch.tensor([992.0])}
    with torch.no_grad():
        bf16 = build(6, torch.bfloat16)
        assert torch.equal(bf16(**exact).sample, bf16(**rounded).sample)
        fp32 = build(6)
        assert not torch.equal(fp32(**exact).sample, fp32(**rounded).sample)


def test_save_and_from_pretrained_round_trip_in_bf16(tmp_path: Path) -> None:
    model = build(7, use_hand_proj=True, shift_ref_pos=True)
    model.save_pretrained(tmp_path)
    loaded = PoseGenTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.config.use_hand_proj and loaded.config.shift_ref_pos and loaded.config.use_hand
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}, "nothing may stay in fp32"
    assert type(loaded.blocks[0]).__name__ == "PoseGenTransformerBlock"
    inputs = make_inputs(8, model.config)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model.to(torch.bfloat16)(**inputs).sample)


def test_attention_goes_through_the_selected_dispatch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build(9, num_layers=2)
    inputs = make_inputs(10, model.config)
    with torch.no_grad():
        native = model(**inputs).sample
    seen: list[object] = []
    real = transformer_module.dispatch_attention_fn

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(transformer_module, "dispatch_attention_fn", spy)
    # diffusers also makes the backend process-wide and its reset does not undo that: restore it after the test.
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    model.set_attention_backend("_native_math")
    with torch.no_grad():
        math_out = model(**inputs).sample
    assert len(seen) == 3 * 2, "self, text and image attention in each of the 2 blocks"
    assert {str(getattr(b, "value", b)) for b in seen} == {"_native_math"}
    assert (math_out - native).abs().max().item() <= 1e-5


def test_peft_adapter_equals_merged_weights() -> None:
    model = build(11)
    inputs = make_inputs(12, model.config)
    with torch.no_grad():
        plain = model(**inputs).sample
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets), adapter_name="posegen")
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, plain), "fresh LoRA (B = 0) must not change the output"
        g = torch.Generator().manual_seed(13)
        merged = {k: v.clone() for k, v in to_release_names(build(11).state_dict()).items()}
        for name, module in model.named_modules():
            if hasattr(module, "lora_B") and "posegen" in module.lora_B:
                module.lora_B["posegen"].weight.copy_(torch.randn(module.lora_B["posegen"].weight.shape, generator=g) * 0.2)
                delta = module.lora_B["posegen"].weight @ module.lora_A["posegen"].weight
                key = to_release_names({name + ".weight": delta})
                (rel_name,) = key
                merged[rel_name] += delta
        adapted = model(**inputs).sample
        ref = reference_from_inputs(merged, release_config(model.config), inputs)
    assert (adapted - plain).abs().max() > 1e-3
    assert (adapted - ref).abs().max().item() <= 1e-4


def test_bad_shapes_are_rejected_with_the_expected_shape() -> None:
    model = build(14)
    inputs = make_inputs(15, model.config)
    with pytest.raises(ValueError, match="control_latents must be"):
        model(**{**inputs, "control_latents": inputs["control_latents"][:, :4]})
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(**{**inputs, **{k: inputs[k][..., :7] for k in ("hidden_states", "control_latents", "hand_latents")}})
    no_hand = build(14, use_hand=False)
    with pytest.raises(ValueError, match="no hand embedding"):
        no_hand(**inputs)
    with pytest.raises(ValueError, match="multiple of 6"):
        PoseGenTransformer3DModel(**tiny_transformer_config(attention_head_dim=16))


def test_rope_chunking_changes_no_bit() -> None:
    """RoPE runs in token chunks to bound its float64 temporaries; the op is elementwise, so no bit may move."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(1, 3 * 4 * 5, 2, 12, generator=g).to(torch.bfloat16)
    freqs = transformer_module.rope_freqs(12, (3, 4, 5), -5, torch.device("cpu"))
    assert torch.equal(transformer_module.apply_rope(x, freqs, chunk_tokens=7), transformer_module.apply_rope(x, freqs))
    assert not torch.equal(transformer_module.apply_rope(x, freqs), x)


def test_rope_table_is_computed_on_the_cpu_like_the_release(monkeypatch: pytest.MonkeyPatch) -> None:
    """The release precomputes its complex128 table on the CPU; CUDA float64 sin/cos/pow may differ in the last bit."""
    seen: list[torch.device] = []
    polar = torch.polar

    def spy(abs_: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        seen.append(angle.device)
        return polar(abs_, angle)

    monkeypatch.setattr(torch, "polar", spy)
    transformer_module._cpu_rope_freqs.cache_clear()
    moved = transformer_module.rope_freqs(12, (2, 3, 7), -7, torch.device("meta"))
    cpu = transformer_module.rope_freqs(12, (2, 3, 7), -7, torch.device("cpu"))
    assert seen == [torch.device("cpu")], "computed once on the CPU, then reused for the next forward"
    assert moved.device.type == "meta" and moved.shape == cpu.shape == (42, 1, 6) and moved.dtype == torch.complex128


def test_self_attention_output_projects_video_and_reference_rows_separately() -> None:
    """The release applies ``o`` to the video rows and to the reference rows as two GEMMs (their shapes matter on GPU)."""
    model = build(17, num_layers=2)
    inputs = make_inputs(18, model.config)
    rows: list[int] = []
    hooks = [b.attn1.to_out[0].register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    n_video, n_ref = 3 * 3 * 4, 3 * 4
    assert rows == [n_video, n_ref] * 2

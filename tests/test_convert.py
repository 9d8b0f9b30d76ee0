"""Release checkpoint conversion and the base/transition adapter form, on tiny folders in the release's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers.hooks.group_offloading import ModuleGroup
from posegen_reference import make_inputs, randomize_, reference_from_inputs, release_config, to_release_names

from posegen_cli.errors import InputError
from posegen_cli.models import (
    PoseGenTransformer3DModel,
    PoseGenVariants,
    convert_checkpoint,
    load_release_model,
    tiny_transformer_config,
)
from posegen_cli.models.convert import diffusers_key_to_release, release_key_to_diffusers
from posegen_cli.testing import LORA_TARGETS
from posegen_cli.testing import release_config as release_json

torch.set_num_threads(1)


def write_release_folder(
    folder: Path,
    cfg: dict,
    base: dict[str, torch.Tensor],
    seed: int,
    lora_dtype: torch.dtype = torch.float32,
    override: tuple[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Write ``base`` (release names) plus rank-2 LoRA pairs on ``LORA_TARGETS`` as three peft-named .bin shards.

    Returns the merged release-named state dict computed here, independently: W + B @ A in the base dtype.
    ``override`` puts a different value for one key into the *last* shard, which the release lets win.
    """
    folder.mkdir(parents=True)
    (folder / "model_config.json").write_text(json.dumps(release_json(cfg)))
    g = torch.Generator().manual_seed(seed)
    blocks = [f"blocks.{i}." for i in range(cfg["num_layers"])]
    targets = {b + t for b in blocks for t in LORA_TARGETS}
    entries: list[tuple[str, torch.Tensor]] = []
    expected = dict(base)
    if override is not None:
        expected[override[0]] = override[1]
    for key, value in base.items():
        module, _, param = key.rpartition(".")
        if module in targets:
            entries.append((f"pipe.dit.{module}.base_layer.{param}", value))
            if param == "weight":
                a = (torch.randn(2, value.shape[1], generator=g) * 0.5).to(lora_dtype)
                b = (torch.randn(value.shape[0], 2, generator=g) * 0.5).to(lora_dtype)
                entries.append((f"pipe.dit.{module}.lora_A.default.weight", a))
                entries.append((f"pipe.dit.{module}.lora_B.default.weight", b))
                expected[key] = expected[key] + b.to(value.dtype) @ a.to(value.dtype)
        else:
            entries.append((f"pipe.dit.{key}", value))
    # Interleave so a LoRA A and its B land in different shards, and shard order is file-name order.
    shards: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for i, (name, value) in enumerate(entries):
        shards[i % 3][name] = value
    if override is not None:
        shards[2][f"pipe.dit.{override[0]}"] = override[1]
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"pytorch_model-0000{i + 1}-of-00003.bin")
    return expected


def release_base(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    model = randomize_(PoseGenTransformer3DModel(**cfg), seed)
    return to_release_names(model.state_dict())


@pytest.mark.parametrize("use_hand_proj", [False, True])
def test_converted_folder_loads_strictly_and_matches_the_merged_reference(tmp_path: Path, use_hand_proj: bool) -> None:
    cfg = tiny_transformer_config(use_hand_proj=use_hand_proj, shift_ref_pos=use_hand_proj)
    base = release_base(cfg, 1)
    override = ("ref_patch_embedding.bias", torch.full_like(base["ref_patch_embedding.bias"], 0.25))
    expected = write_release_folder(tmp_path / "release", cfg, base, 2, lora_dtype=torch.bfloat16, override=override)

    dst = convert_checkpoint(tmp_path / "release", tmp_path / "diffusers")
    assert (dst / "config.json").is_file() and list(dst.glob("*.safetensors"))
    model, info = PoseGenTransformer3DModel.from_pretrained(dst, torch_dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.use_hand_proj == use_hand_proj and model.config.shift_ref_pos == use_hand_proj

    loaded = to_release_names(model.state_dict())
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value.to(torch.bfloat16)), key
    inputs = make_inputs(3, model.config)
    with torch.no_grad():
        out = model(**inputs).sample
        ref = reference_from_inputs({k: v.to(torch.bfloat16) for k, v in expected.items()}, release_config(model.config), inputs)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("use_hand_proj", [False, True])
def test_key_mapping_is_invertible_and_matches_the_spec_table(use_hand_proj: bool) -> None:
    keys = PoseGenTransformer3DModel(**tiny_transformer_config(use_hand_proj=use_hand_proj)).state_dict().keys()
    for key in keys:
        release = diffusers_key_to_release(key)
        assert release is not None and release_key_to_diffusers(release) == key, key
    assert set(to_release_names(dict.fromkeys(keys))) == {diffusers_key_to_release(k) for k in keys}
    assert diffusers_key_to_release("blocks.0.norm2.weight") == "blocks.0.norm3.weight"
    assert diffusers_key_to_release("scale_shift_table") == "head.modulation"
    assert diffusers_key_to_release("blocks.3.attn2.norm_added_k.weight") == "blocks.3.cross_attn.norm_k_img.weight"
    assert diffusers_key_to_release("blocks.0.attn1.to_q.lora_A.weight") is None
    assert diffusers_key_to_release("rope.freqs") is None


def test_merge_runs_in_the_dtype_of_the_first_base_tensor(tmp_path: Path) -> None:
    """fp32 base + bf16 LoRA: the product is taken in fp32 (the release's rule), then everything is cast."""
    cfg = tiny_transformer_config()
    base = release_base(cfg, 4)
    expected = write_release_folder(tmp_path / "release", cfg, base, 5, lora_dtype=torch.bfloat16)
    dst = convert_checkpoint(tmp_path / "release", tmp_path / "out", dtype=torch.float32)
    loaded = to_release_names(PoseGenTransformer3DModel.from_pretrained(dst).state_dict())
    key = "blocks.0.self_attn.q.weight"
    assert torch.equal(loaded[key], expected[key])
    assert not torch.equal(loaded[key], base[key]), "the LoRA must have been merged"


def corrupt(folder: Path, how: str) -> str:
    """Break a release folder one way; returns the text the error must contain."""
    shard = min(folder.glob("*.bin"))
    if how == "no_config":
        (folder / "model_config.json").unlink()
        return "model_config.json"
    if how == "bad_json":
        (folder / "model_config.json").write_text("{not json")
        return "not valid JSON"
    if how == "no_shards":
        for p in folder.glob("*.bin"):
            p.unlink()
        return "no .bin shards"
    if how == "garbage":
        shard.write_bytes(b"this is not a pickle")
        return shard.name
    if how == "pickle_code":
        torch.save({"pipe.dit.x": torch.nn.Linear(2, 2)}, shard)
        return shard.name
    if how == "prefix":
        data = torch.load(shard, weights_only=True)
        data["model.extra"] = torch.zeros(1)
        torch.save(data, shard)
        return "lacks the 'pipe.dit.' prefix"
    if how == "lone_lora":
        data = torch.load(shard, weights_only=True)
        data["pipe.dit.blocks.0.cross_attn.k_img.lora_B.default.weight"] = torch.zeros(24, 2)
        torch.save(data, shard)
        return "no matching lora_A"
    if how == "missing_key":
        data = torch.load(shard, weights_only=True)
        data.pop(next(k for k in data if "lora" not in k))
        torch.save(data, shard)
        return "missing"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no_config", "bad_json", "no_shards", "garbage", "pickle_code", "prefix", "lone_lora", "missing_key"])
def test_bad_release_folders_raise_input_error_naming_the_problem(tmp_path: Path, how: str) -> None:
    cfg = tiny_transformer_config(num_layers=1)
    write_release_folder(tmp_path / "release", cfg, release_base(cfg, 6), 7)
    needle = corrupt(tmp_path / "release", how)
    with pytest.raises(InputError, match=None) as err:
        convert_checkpoint(tmp_path / "release", tmp_path / "out")
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert err.value.exit_code == 2
    assert not (tmp_path / "out").exists(), "a failed conversion must leave no output folder"


def test_missing_source_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a folder"):
        convert_checkpoint(tmp_path / "nope", tmp_path / "out")


def two_variant_folders(tmp_path: Path) -> tuple[dict, dict, dict, dict]:
    """Base and transition folders sharing the Wan weights; the transition has its own patch embeddings,
    a differently shaped hand embedding (use_hand_proj) and shifted reference positions, as the release may."""
    cfg_base = tiny_transformer_config(num_layers=2)
    cfg_cond = tiny_transformer_config(num_layers=2, use_hand_proj=True, shift_ref_pos=True)
    shared = release_base(cfg_base, 8)
    cond_only = release_base(cfg_cond, 9)
    cond_base = {k: v for k, v in shared.items() if not k.startswith("hand_patch_embedding.")}
    for key, value in cond_only.items():
        if key.startswith(("patch_embedding.", "ref_patch_embedding.", "hand_patch_embedding.")):
            cond_base[key] = value
    merged_base = write_release_folder(tmp_path / "base", cfg_base, shared, 10)
    merged_cond = write_release_folder(tmp_path / "cond", cfg_cond, cond_base, 11)
    return merged_base, cfg_base, merged_cond, cfg_cond


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_variants_switch_in_place_bitwise_equal_to_merging(tmp_path: Path, dtype: torch.dtype) -> None:
    merged_base, cfg_base, merged_cond, cfg_cond = two_variant_folders(tmp_path)
    variants = PoseGenVariants.from_release(tmp_path / "base", tmp_path / "cond", dtype=dtype)
    model = variants.model
    inputs = make_inputs(12, model.config)
    with torch.no_grad():
        for name, merged, cfg in (
            ("transition", merged_cond, cfg_cond),
            ("base", merged_base, cfg_base),
            ("transition", merged_cond, cfg_cond),
        ):
            out = variants.activate(name)(**inputs).sample
            ref = reference_from_inputs({k: v.to(dtype) for k, v in merged.items()}, release_config(cfg), inputs)
            assert torch.equal(out, ref), name
    assert variants.model is model, "switching must not build a second model"
    memory = variants.memory
    merged_model_bytes = sum(p.nbytes for p in load_release_model(tmp_path / "base", dtype).parameters())
    assert memory.two_models_bytes == 2 * merged_model_bytes
    assert len(memory.switch_seconds) == 4


GROUP_OFFLOAD_DEVICES = [("cpu", False)] + ([("cuda", True)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize(("device", "use_stream"), GROUP_OFFLOAD_DEVICES)
def test_variants_switch_under_group_offloading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str, use_stream: bool) -> None:
    """``--offload group``: a resume that starts with transitions switches before the first forward, and the
    transition's hand embedding is another module. Each output must equal a resident model's, and the hooks must
    onload every weight the forward reads (on the CPU a module left out of the hooks runs anyway, so that is checked
    by recording what the groups onload; on CUDA it would be a device mismatch)."""
    two_variant_folders(tmp_path)
    resident = PoseGenVariants.from_release(tmp_path / "base", tmp_path / "cond", dtype=torch.float32, device=device)
    variants = PoseGenVariants.from_release(tmp_path / "base", tmp_path / "cond", dtype=torch.float32)
    model = variants.model
    model.enable_group_offload(torch.device(device), offload_type="block_level", num_blocks_per_group=1, use_stream=use_stream)
    onloaded: set[int] = set()
    onload = ModuleGroup.onload_

    def recording_onload(group: ModuleGroup) -> None:
        onloaded.update(id(p) for m in group.modules for p in m.parameters())
        onloaded.update(id(p) for p in group.parameters)
        onload(group)

    monkeypatch.setattr(ModuleGroup, "onload_", recording_onload)
    inputs = {k: v.to(device) for k, v in make_inputs(12, model.config).items()}
    with torch.no_grad():
        for name in ("transition", "base", "transition"):
            onloaded.clear()
            out = variants.activate(name)(**inputs).sample
            assert torch.equal(out, resident.activate(name)(**inputs).sample), name
            assert {id(p) for p in model.parameters()} <= onloaded, f"{name}: weights outside the offload groups"


def test_adapter_variants_stay_close_to_merging(tmp_path: Path) -> None:
    merged_base, cfg_base, merged_cond, cfg_cond = two_variant_folders(tmp_path)
    inputs = make_inputs(12, tiny_transformer_config())
    variants = PoseGenVariants.from_release(tmp_path / "base", tmp_path / "cond", dtype=torch.float32, mode="adapter")
    with torch.no_grad():
        for name, merged, cfg in (("transition", merged_cond, cfg_cond), ("base", merged_base, cfg_base)):
            out = variants.activate(name)(**inputs).sample
            assert (out - reference_from_inputs(merged, release_config(cfg), inputs)).abs().max().item() <= 1e-5, name
    memory = variants.memory
    assert memory.host_bytes == 0 and 0 < memory.held_bytes < memory.two_models_bytes

    with torch.no_grad():
        bf16 = PoseGenVariants.from_release(tmp_path / "base", tmp_path / "cond", dtype=torch.bfloat16, mode="adapter")
        out = bf16.activate("transition")(**inputs).sample.float()
        ref = reference_from_inputs({k: v.to(torch.bfloat16) for k, v in merged_cond.items()}, release_config(cfg_cond), inputs).float()
    # Unmerged adapters round differently from merged weights in bf16: close, not bitwise (stated bound).
    assert 0 < (out - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


def test_adapter_form_rejects_folders_of_different_models(tmp_path: Path) -> None:
    cfg = tiny_transformer_config(num_layers=1)
    write_release_folder(tmp_path / "base", cfg, release_base(cfg, 13), 14)
    other = tiny_transformer_config(num_layers=2)
    write_release_folder(tmp_path / "cond", other, release_base(other, 15), 16)
    with pytest.raises(InputError, match="num_layers"):
        PoseGenVariants.from_release(tmp_path / "base", tmp_path / "cond")

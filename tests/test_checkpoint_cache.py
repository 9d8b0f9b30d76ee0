"""Release checkpoints converted once into merged safetensors: reuse, rebuild on change, variants switched from them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from posegen_reference import make_inputs, reference_from_inputs, release_config
from test_convert import two_variant_folders

from posegen_cli.longvideo.loading import DiTWeights, load_pipeline
from posegen_cli.models import PoseGenVariants
from posegen_cli.models import checkpoint_cache as cc

torch.set_num_threads(1)


def test_conversion_is_reused_and_rebuilt_when_a_source_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    two_variant_folders(tmp_path)
    root = tmp_path / "converted"
    conversions: list[Path] = []
    real = cc.load_release_model

    def counting(folder, *args, **kwargs):  # noqa: ANN001, ANN202
        conversions.append(Path(folder))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(cc, "load_release_model", counting)
    first = cc.converted_checkpoint(tmp_path / "base", torch.float32, root=root)
    again = cc.converted_checkpoint(tmp_path / "base", torch.float32, root=root)
    assert first == again and conversions == [tmp_path / "base"], "the second job must reuse the converted copy"
    assert (first / "config.json").is_file() and list(first.glob("*.safetensors"))
    # a changed shard (new size and time) gives a new key: converted again, the stale copy removed
    shard = sorted((tmp_path / "base").glob("*.bin"))[-1]
    shard.write_bytes(shard.read_bytes())
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = cc.converted_checkpoint(tmp_path / "base", torch.float32, root=root)
    assert rebuilt != first and len(conversions) == 2 and not first.exists()
    # another dtype is another copy
    assert cc.converted_checkpoint(tmp_path / "base", torch.bfloat16, root=root) != rebuilt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_variants_switch_bitwise_equal_to_merging(tmp_path: Path, dtype: torch.dtype) -> None:
    merged_base, cfg_base, merged_cond, cfg_cond = two_variant_folders(tmp_path)
    root = tmp_path / "converted"
    base, cond = (cc.converted_checkpoint(tmp_path / name, dtype, root=root) for name in ("base", "cond"))
    variants = PoseGenVariants.from_converted(base, cond, dtype=dtype)
    assert variants.mode == "converted" and variants.memory.host_bytes == 0
    model = variants.model
    inputs = make_inputs(12, model.config)
    with torch.no_grad():
        for name, merged, cfg in (("base", merged_base, cfg_base), ("transition", merged_cond, cfg_cond), ("base", merged_base, cfg_base)):
            out = variants.activate(name)(**inputs).sample
            ref = reference_from_inputs({k: v.to(dtype) for k, v in merged.items()}, release_config(cfg), inputs)
            assert torch.equal(out, ref), name
    assert variants.model is model
    switched = variants.variants["transition"].files
    assert switched and all(k.startswith(("patch_embedding", "ref_patch_embedding", "blocks.")) for k in switched)


def test_pipeline_loads_the_converted_cache_and_reuses_it(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_pipeline(tiny_models, device="cpu", dtype="float32")
    assert first.variants is not None and first.variants.mode == "converted"
    monkeypatch.setattr(cc, "load_release_model", lambda *a, **k: pytest.fail("the second job must not convert again"))
    second = load_pipeline(tiny_models, device="cpu", dtype="float32")
    a, b = first.transformer.state_dict(), second.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    release = load_pipeline(tiny_models, device="cpu", dtype="float32", weights=DiTWeights(checkpoints="release"))
    for name in ("transition", "base"):
        second.use_variant(name)
        release.use_variant(name)
        ours, theirs = second.transformer.state_dict(), release.transformer.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name

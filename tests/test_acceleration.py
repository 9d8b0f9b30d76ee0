"""Attention kernels, compiled blocks and torchao weights of the PoseGen DiT (CPU, tiny models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
from diffusers.models.attention_dispatch import attention_backend
from posegen_reference import make_inputs, reference_from_inputs, release_config
from test_convert import two_variant_folders
from test_kv_share import build, run_segment, segment_inputs

from posegen_cli.errors import InputError
from posegen_cli.models import KVShareCache, PoseGenVariants, kv_sharing
from posegen_cli.models import transformer as transformer_module
from posegen_cli.models.acceleration import (
    ATTENTION_CHOICES,
    compile_blocks,
    quantization_config,
    resolve_attention,
    set_attention,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _restore_active_backend():
    """``set_attention_backend`` also makes its backend diffusers' process-wide default; give the next test native."""
    with attention_backend("native"):
        yield


def share_run(model, cache_blocks=(3, 4)) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Record (anchor), replay (another base segment) and plain outputs, both branches at two steps."""
    anchor, other = segment_inputs(21, model), segment_inputs(22, model)
    cache = KVShareCache({0, 1}, set(cache_blocks), [2, 3], max_map_block=2)
    recorded = run_segment(model, anchor, cache)
    cache.start_replay()
    return recorded, run_segment(model, other, cache), run_segment(model, other, None)


def test_every_attention_call_goes_through_the_dispatcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per block: one self-attention and two cross-attention calls; a replaying sharing block adds one, none masked."""
    calls: list[tuple[object, object]] = []
    dispatch = transformer_module.dispatch_attention_fn

    def counting(q, k, v, attn_mask=None, **kwargs):
        calls.append((attn_mask, kwargs.get("backend")))
        return dispatch(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(transformer_module, "dispatch_attention_fn", counting)
    model = build(5)
    model.set_attention_backend("_native_math")
    anchor, other = segment_inputs(23, model), segment_inputs(24, model)
    cache = KVShareCache({0}, {3, 4}, [2], max_map_block=2)
    run_segment(model, anchor, cache)
    assert len(calls) == 2 * 2 * 5 * 3, "record: 2 steps x 2 branches x 5 blocks x 3 calls"
    cache.start_replay()
    calls.clear()
    run_segment(model, other, cache)
    assert len(calls) == 2 * 2 * 5 * 3 + 2 * 2, "replay: the 2 sharing blocks of the shared step attend once more per branch"
    assert all(mask is None for mask, _ in calls)
    assert {str(backend.value) for _, backend in calls} == {"_native_math"}


def test_cpu_attention_choices_equal_native() -> None:
    model = build(6)
    native = share_run(model)
    auto = resolve_attention("auto", CPU, torch.float32)
    assert (auto.choice, auto.backend, auto.exact) == ("native", "native", True)
    set_attention(model, auto)
    flat = [out for outs in native for out in outs]
    assert all(torch.equal(a, b) for a, b in zip([o for outs in share_run(model) for o in outs], flat))
    model.set_attention_backend("_native_math")  # the CPU's other exact SDPA kernel, through the same dispatcher
    for a, b in zip([o for outs in share_run(model) for o in outs], flat):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("choice", "device", "dtype", "message"),
    [
        ("cudnn", CPU, torch.bfloat16, "needs a CUDA GPU"),
        ("flash", CPU, torch.bfloat16, "needs a CUDA GPU"),
        ("flash3", CPU, torch.bfloat16, "needs a CUDA GPU"),
        ("sage", CPU, torch.bfloat16, "needs a CUDA GPU"),
        ("xformers", CPU, torch.bfloat16, "not known"),
    ],
)
def test_unavailable_attention_is_a_clear_error(choice: str, device: torch.device, dtype: torch.dtype, message: str) -> None:
    with pytest.raises(InputError, match=message) as err:
        resolve_attention(choice, device, dtype)
    assert "\n" not in str(err.value)


def test_gpu_attention_needs_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """What auto picks and what an explicit choice needs, per compute capability (no GPU: the capability is faked)."""
    from posegen_cli.models import acceleration

    cuda = torch.device("cuda")
    monkeypatch.setattr(acceleration, "_importable", lambda name: False)
    for cap, auto in (((9, 0), "_native_cudnn"), ((8, 0), "_native_flash"), ((8, 9), "_native_flash"), ((7, 5), "native")):
        monkeypatch.setattr(acceleration, "_capability", lambda device, cap=cap: cap)
        assert resolve_attention("auto", cuda, torch.bfloat16).backend == auto
    assert resolve_attention("auto", cuda, torch.float32).backend == "native"
    monkeypatch.setattr(acceleration, "_capability", lambda device: (9, 0))
    with pytest.raises(InputError, match="pip install kernels"):
        resolve_attention("flash3", cuda, torch.bfloat16)
    with pytest.raises(InputError, match="pip install sageattention"):
        resolve_attention("sage", cuda, torch.bfloat16)
    monkeypatch.setattr(acceleration, "_importable", lambda name: name in ("kernels", "flash_attn_interface"))
    assert resolve_attention("flash3", cuda, torch.bfloat16).backend == "_flash_3"
    assert resolve_attention("auto", cuda, torch.bfloat16).backend == "_flash_3"
    assert not resolve_attention("sage", cuda, torch.bfloat16).exact
    monkeypatch.setattr(acceleration, "_capability", lambda device: (8, 0))
    with pytest.raises(InputError, match="Hopper"):
        resolve_attention("flash3", cuda, torch.bfloat16)
    with pytest.raises(InputError, match="bfloat16"):
        resolve_attention("cudnn", cuda, torch.float32)
    assert set(ATTENTION_CHOICES) == {"auto", "native", "cudnn", "flash", "flash3", "sage"}


def explain_block(model, cache: KVShareCache, inputs: dict, index: int, step: int, branch: str):
    """dynamo's account of block ``index`` run with the K/V share it had in a real forward (and that share)."""
    captured = {}

    def grab(module, args):
        captured.update(args=args, share=module.attn1.processor.share)

    handle = model.blocks[index].register_forward_pre_hook(grab)
    with torch.no_grad(), kv_sharing(model, cache), model.cache_context(branch, step_index=step):
        model(**inputs)
    handle.remove()
    block, share = model.blocks[index], captured["share"]
    block.attn1.processor.share = share
    share.recorded = None
    try:
        with torch.no_grad():
            return torch._dynamo.explain(block)(*captured["args"]), share
    finally:
        block.attn1.processor.share = None
        torch._dynamo.reset()


def test_one_block_has_no_graph_break_when_recording_or_replaying() -> None:
    model = build(5)
    anchor, other = segment_inputs(25, model), segment_inputs(26, model)
    cache = KVShareCache({0}, {3, 4}, [2], max_map_block=2)
    explained, share = explain_block(model, cache, anchor, 3, 0, "cond")
    assert share.record and explained.graph_break_count == 0, explained.break_reasons
    assert share.recorded is not None, "the traced block recorded its K/V"
    run_segment(model, anchor, cache)
    cache.start_replay()
    for index, branch in ((3, "cond"), (4, "uncond")):
        explained, share = explain_block(model, cache, other, index, 0, branch)
        assert share.source is not None and explained.graph_break_count == 0, explained.break_reasons


def test_compiled_blocks_equal_eager_and_a_swap_does_not_recompile(tmp_path: Path) -> None:
    model = build(6)
    eager = share_run(model)
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compile_blocks(model, backend=counter)
    compiled = share_run(model)
    for mode, ours, theirs in zip(("record", "replay", "plain"), compiled, eager):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=mode)
    assert 0 < counter.frame_count <= 8, "one graph per K/V role, shared by all blocks"

    merged_base, cfg_base, merged_cond, cfg_cond = two_variant_folders(tmp_path)
    variants = PoseGenVariants.from_release(tmp_path / "base", tmp_path / "cond", dtype=torch.float32)
    inputs = make_inputs(26, variants.model.config)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compile_blocks(variants.model, backend=counter)
    frames = []
    with torch.no_grad():
        for name, merged, cfg in (("base", merged_base, cfg_base), ("transition", merged_cond, cfg_cond), ("base", merged_base, cfg_base)):
            out = variants.activate(name)(**inputs).sample
            ref = reference_from_inputs(merged, release_config(cfg), inputs)
            assert torch.equal(out, ref), name
            frames.append(counter.frame_count)
    assert frames[0] > 0 and frames == [frames[0]] * 3, "a variant swap recompiles nothing"
    torch._dynamo.reset()


def test_aot_compiled_blocks_match_eager() -> None:
    """Through AOTAutograd (functionalised graphs, as inductor receives them) the custom ops and side effects hold.
    Inductor's own kernels are timed and checked against eager by ``benchmarks/gpu_suite.py`` (``--tiny`` on a CPU)."""
    model = build(5)
    eager = share_run(model)
    torch._dynamo.reset()
    compile_blocks(model, backend="aot_eager")
    for mode, ours, theirs in zip(("record", "replay", "plain"), share_run(model), eager):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=mode)
    torch._dynamo.reset()


INT8_TOLERANCE = 0.02
"""Relative L2 error of int8 weight-only outputs against bf16 on the tiny model (per-channel int8 rounds each weight by
at most half a step of |w|max/127, about 0.4 % of a row's scale; measured here about 0.5 %)."""


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_int8_weights_stay_close_after_base_transition_base(tmp_path: Path) -> None:
    two_variant_folders(tmp_path)
    reference = PoseGenVariants.from_release(tmp_path / "base", tmp_path / "cond", dtype=torch.bfloat16)
    variants = PoseGenVariants.from_release(tmp_path / "base", tmp_path / "cond", dtype=torch.bfloat16)
    variants.quantize(quantization_config("int8", CPU))
    inputs = {k: v.to(torch.bfloat16) for k, v in make_inputs(27, variants.model.config).items()}
    outs = {}
    with torch.no_grad():
        for i, name in enumerate(("base", "transition", "base")):
            expected = reference.activate(name)(**inputs).sample
            out = variants.activate(name)(**inputs).sample
            assert relative_error(out, expected) < INT8_TOLERANCE, name
            outs[(name, i)] = out
    assert torch.equal(outs[("base", 0)], outs[("base", 2)]), "re-quantising the same merged weights gives the same model"
    assert relative_error(outs[("base", 0)], outs[("transition", 1)]) > 10 * INT8_TOLERANCE, "the swap took effect"
    quantized = [n for n, p in variants.model.named_parameters() if type(p.data) is not torch.Tensor]
    assert quantized and all(n.startswith("blocks.") for n in quantized)


def test_fp8_needs_fp8_hardware() -> None:
    with pytest.raises(InputError, match="compute capability 8.9"):
        quantization_config("fp8", CPU)
    with pytest.raises(InputError, match="not known"):
        quantization_config("int4", CPU)
    assert quantization_config("none", CPU) is None


def test_pipeline_applies_quantize_attention_and_compile(tiny_models: Path) -> None:
    from posegen_cli.longvideo.loading import load_pipeline

    pipe = load_pipeline(tiny_models, device="cpu", dtype="bfloat16", load_encoders=False, attention="auto", compile=True, quantize="int8")
    assert pipe.attention is not None and pipe.attention.backend == "native"
    blocks = pipe.transformer.blocks
    assert all(block._compiled_call_impl is not None for block in blocks), "regional compilation of every block"
    assert all(type(block.attn1.to_q.weight.data) is not torch.Tensor for block in blocks), "int8 block linears"
    pipe.use_variant("transition")
    assert all(type(block.ffn.net[2].weight.data) is not torch.Tensor for block in blocks), "still quantised after a swap"
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        load_pipeline(tiny_models, device="cpu", attention="flash3")
    torch._dynamo.reset()

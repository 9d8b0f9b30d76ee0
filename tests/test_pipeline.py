"""``PoseGenPipeline`` on tiny random models: layout, determinism, the sampling loop and conditioning wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from animate_inputs import PIPELINE_SIZE
from diffusers.hooks import HookRegistry
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from safetensors.torch import load_file

from posegen_cli import hub
from posegen_cli.errors import InputError, MissingModelError
from posegen_cli.longvideo.loading import load_pipeline
from posegen_cli.models import KVShareCache, load_release_model
from posegen_cli.pipelines.conditioning import condition_mask
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline, check_model_size, release_generator
from posegen_cli.pipelines.scheduling import make_scheduler
from posegen_cli.pipelines.text import DEFAULT_NEGATIVE
from posegen_cli.pipelines.vae import decode_latents, encode_video, frames_to_tensor, tensor_to_frames
from posegen_cli.testing import make_tiny_models
from posegen_cli.video.framing import frame_to_model

H, W = PIPELINE_SIZE  # the ``pipe`` and ``embeds`` fixtures (conftest.py) work at this size
STEPS = 2


def driving(seed: int, n: int = 81, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_tiny_models_have_the_download_layout(tiny_models):
    wan = tiny_models / "wan-i2v-720p"
    for sub in ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor"):
        assert (wan / sub).is_dir(), sub
    assert not (wan / "transformer").exists()
    assert hub.model_path("wan-i2v-720p", tiny_models) == wan
    assert hub.model_path("posegen", tiny_models) == tiny_models / "posegen"
    for variant in ("720p-81f-base", "720p-81f-cond"):
        folder = tiny_models / "posegen" / variant
        shards = sorted(folder.glob("*.bin"))
        assert (folder / "model_config.json").is_file() and len(shards) == 2
        keys = [k for shard in shards for k in torch.load(shard, weights_only=True)]
        assert all(k.startswith("pipe.dit.") for k in keys)
        assert "pipe.dit.blocks.0.self_attn.q.lora_A.default.weight" in keys
        assert "pipe.dit.blocks.0.self_attn.q.base_layer.weight" in keys
        assert "pipe.dit.ref_patch_embedding.weight" in keys


def test_tiny_models_are_reproducible(tiny_models, tmp_path):
    again = make_tiny_models(tmp_path / "again")
    for rel in ("wan-i2v-720p/vae/diffusion_pytorch_model.safetensors", "wan-i2v-720p/text_encoder/model.safetensors"):
        a, b = load_file(tiny_models / rel), load_file(again / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = torch.load(tiny_models / "posegen/720p-81f-cond/pytorch_model-00001-of-00002.bin", weights_only=True)
    b = torch.load(again / "posegen/720p-81f-cond/pytorch_model-00001-of-00002.bin", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_models_are_reported(tmp_path):
    with pytest.raises(MissingModelError, match="wan-i2v-720p"):
        load_pipeline(tmp_path, device="cpu")


def test_embeddings_have_the_model_shapes(embeds):
    assert embeds["prompt_embeds"].shape == (1, 512, 32)
    assert embeds["negative_prompt_embeds"].shape == (1, 512, 32)
    assert not torch.equal(embeds["prompt_embeds"], embeds["negative_prompt_embeds"])
    assert embeds["image_embeds"].shape == (1, 257, 20)
    assert embeds["reference_latents"].shape == (1, 16, 1, H // 8, W // 8)


def test_segment_is_deterministic_per_seed(pipe, embeds):
    pipe.use_variant("base")
    pose, hand = driving(1), driving(2)
    first = pipe(**embeds, pose_frames=pose, hand_frames=hand, num_inference_steps=STEPS, generator=release_generator(7)).frames
    again = pipe(**embeds, pose_frames=pose, hand_frames=hand, num_inference_steps=STEPS, generator=release_generator(7)).frames
    other = pipe(**embeds, pose_frames=pose, hand_frames=hand, num_inference_steps=STEPS, generator=release_generator(8)).frames
    assert first.shape == (81, H, W, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    pipe.use_variant("transition")
    switched = pipe(**embeds, pose_frames=pose, hand_frames=hand, num_inference_steps=STEPS, generator=release_generator(7)).frames
    pipe.use_variant("base")
    assert not np.array_equal(first, switched)
    assert np.array_equal(pipe(**embeds, pose_frames=pose, hand_frames=hand, num_inference_steps=STEPS, generator=release_generator(7)).frames, first)


class RecordingTransformer(torch.nn.Module, CacheMixin):
    """Stands in for the DiT: records every call and returns a fixed velocity per branch."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.calls: list[dict] = []

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, **kwargs):
        self.calls.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
        positive = len(self.calls) % 2 == 1
        value = 0.25 if positive else -0.5
        out = torch.full_like(kwargs["hidden_states"], value)
        return Transformer2DModelOutput(sample=out)


def stand_in_pipeline(pipe: PoseGenPipeline, dtype: torch.dtype) -> tuple[PoseGenPipeline, RecordingTransformer]:
    recorder = RecordingTransformer(dtype)
    vae = pipe.vae.to(dtype)
    stand_in = PoseGenPipeline(None, None, None, vae, recorder, make_scheduler())
    return stand_in, recorder


def test_sampling_loop_follows_the_release(pipe, embeds):
    dtype = torch.bfloat16
    stand_in, recorder = stand_in_pipeline(pipe, dtype)
    try:
        pose, hand = driving(3), driving(4)
        seen = []
        frames = stand_in(
            **embeds,
            pose_frames=pose,
            hand_frames=hand,
            num_inference_steps=3,
            generator=release_generator(42),
            guidance_scale=5.0,
            callback_on_step_end=lambda p, i, t, d: seen.append((i, d["latents"].clone())),
        ).frames
        # Two forwards per step, positive prompt first; timesteps rounded to bf16.
        assert len(recorder.calls) == 6
        for i, call in enumerate(recorder.calls):
            expected = embeds["prompt_embeds"] if i % 2 == 0 else embeds["negative_prompt_embeds"]
            assert torch.equal(call["encoder_hidden_states"], expected.to(dtype))
            assert call["timestep"].dtype == dtype and call["timestep"].shape == (1,)
        # 3 steps: sigma = 1, 10/11, 5/7 -> 1000, 909.09, 714.29 -> bf16 1000, 908, 716.
        assert [c["timestep"].item() for c in recorder.calls[::2]] == [1000.0, 908.0, 716.0]
        # Noise: float32 randn on CPU from the seed, then cast; x <- x + v (sigma_next - sigma) in bf16.
        noise = torch.randn((1, 16, 21, H // 8, W // 8), generator=torch.Generator("cpu").manual_seed(42)).to(dtype)
        assert torch.equal(recorder.calls[0]["hidden_states"], noise)
        s = torch.linspace(1, 0, 4)[:-1]
        sigmas = torch.cat([5 * s / (1 + 4 * s), torch.zeros(1)])
        v = torch.tensor(-0.5, dtype=dtype) + 5.0 * (torch.tensor(0.25, dtype=dtype) - torch.tensor(-0.5, dtype=dtype))
        x = noise
        for i in range(3):
            x = x + v * (sigmas[i + 1] - sigmas[i])
            assert torch.equal(seen[i][1], x)
        # Output: tiled decode, truncated to uint8.
        assert np.array_equal(frames, tensor_to_frames(decode_latents(stand_in.vae, x)))
    finally:
        pipe.vae.to(torch.float32)


def test_transition_conditioning_uses_head_and_tail_frames(pipe, embeds):
    stand_in, recorder = stand_in_pipeline(pipe, torch.float32)
    pose, hand = driving(5), driving(6)
    head, tail = driving(7, 21), driving(8, 20)
    stand_in(**embeds, pose_frames=pose, hand_frames=hand, head_frames=head, tail_frames=tail, num_inference_steps=1, guidance_scale=1.0)
    assert len(recorder.calls) == 1  # guidance 1: no negative branch
    call = recorder.calls[0]
    control, hand_latents = call["control_latents"], call["hand_latents"]
    assert control.shape == (1, 20, 21, H // 8, W // 8)
    assert torch.equal(control[0, :4], condition_mask(81, 21, 20, H // 8, W // 8, torch.float32))
    pasted_pose = np.concatenate([head, pose[21:61], tail])
    pasted_hand = np.concatenate([head, hand[21:61], tail])
    assert torch.equal(control[:, 4:], encode_video(pipe.vae, frames_to_tensor(pasted_pose)))
    assert torch.equal(hand_latents, encode_video(pipe.vae, frames_to_tensor(pasted_hand)))
    assert torch.equal(call["reference_latents"], embeds["reference_latents"])
    assert torch.equal(call["encoder_hidden_states_image"], embeds["image_embeds"])

    recorder.calls.clear()
    stand_in(**embeds, pose_frames=pose, hand_frames=hand, num_inference_steps=1, guidance_scale=1.0)
    assert not recorder.calls[0]["control_latents"][:, :4].any()
    assert torch.equal(recorder.calls[0]["control_latents"][:, 4:], encode_video(pipe.vae, frames_to_tensor(pose)))


def test_frames_of_another_size_are_framed_like_the_release(pipe, embeds):
    stand_in, recorder = stand_in_pipeline(pipe, torch.float32)
    big_pose, big_hand = driving(9, h=100, w=60), driving(10, h=100, w=60)
    stand_in(**embeds, pose_frames=big_pose, hand_frames=big_hand, num_inference_steps=1, guidance_scale=1.0)
    framed = frame_to_model(big_pose, (H, W))
    assert torch.equal(recorder.calls[0]["control_latents"][:, 4:], encode_video(pipe.vae, frames_to_tensor(framed)))


def test_kv_share_views_are_passed_per_step_and_branch(pipe, embeds):
    """The pipeline names each forward's branch and step in ``cache_context``; the K/V hook asks the cache for that view."""
    stand_in, recorder = stand_in_pipeline(pipe, torch.float32)
    cache = KVShareCache(steps=[5], blocks=[1], subject_positions=[1], max_map_block=0)
    asked = []
    original = cache.view

    def view(step, branch):
        asked.append((step, branch))
        return original(step, branch)

    cache.view = view
    stand_in(**embeds, pose_frames=driving(1), hand_frames=driving(2), num_inference_steps=2, kv_share=cache)
    assert asked == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
    assert HookRegistry.check_if_exists_or_initialize(recorder).get_hook("posegen_kv_share") is None, "the hook is removed after the call"


def test_bad_segment_inputs_are_input_errors(pipe, embeds):
    with pytest.raises(InputError, match="4k\\+1"):
        pipe(**embeds, pose_frames=driving(1, 80), hand_frames=driving(2, 80), num_inference_steps=1)
    with pytest.raises(InputError, match="hand frames has 77 frames"):
        pipe(**embeds, pose_frames=driving(1, 81), hand_frames=driving(2, 77), num_inference_steps=1)
    with pytest.raises(InputError, match="pose frames must be uint8 RGB"):
        pipe(**embeds, pose_frames=driving(1).astype(np.float32), hand_frames=driving(2), num_inference_steps=1)
    with pytest.raises(InputError, match="head frames"):
        pipe(**embeds, pose_frames=driving(1), hand_frames=driving(2), head_frames=driving(3, 21, 32, 32), num_inference_steps=1)
    with pytest.raises(InputError, match="multiples of 16"):
        pipe.encode_reference(np.zeros((100, 60, 3), np.uint8), 100, 60)
    with pytest.raises(InputError, match="uint8 RGB"):
        pipe.encode_reference(np.zeros((100, 60), np.uint8), H, W)


def test_size_rule_names_what_was_given():
    """The CLI reuses the pipeline's multiple-of-16 rule for ``--resolution``; the message names the flag."""
    check_model_size(1280, 720, "--resolution")
    with pytest.raises(InputError, match=r"^--resolution 100x200 \(WxH\): .*multiples of 16"):
        check_model_size(200, 100, "--resolution")
    with pytest.raises(InputError, match="^model size 720x0"):
        check_model_size(0, 720)


def test_default_negative_prompt_is_the_wan_chinese_text():
    assert DEFAULT_NEGATIVE.startswith("色调艳丽，过曝，静态")
    assert DEFAULT_NEGATIVE.endswith("背景人很多，倒着走")
    assert "，" in DEFAULT_NEGATIVE and "," not in DEFAULT_NEGATIVE


def test_make_tiny_models_command(tmp_path):
    from typer.testing import CliRunner

    from posegen_cli.testing.__main__ import app

    result = CliRunner().invoke(app, ["make-tiny-models", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert f"--models-dir {tmp_path / 'm'}" in result.output
    assert hub.find_local("wan-i2v-720p", tmp_path / "m") == tmp_path / "m" / "wan-i2v-720p"
    assert hub.find_local("posegen", tmp_path / "m") == tmp_path / "m" / "posegen"


def test_onload_triggers_an_offload_hook_before_reading_the_device():
    from posegen_cli.pipelines.offload import onload

    class Hook:
        def __init__(self) -> None:
            self.calls = 0

        def pre_forward(self, module: torch.nn.Module) -> None:
            self.calls += 1
            module.to(torch.float64)  # stands in for the move to the execution device

    module = torch.nn.Linear(2, 2)
    assert onload(module) == torch.device("cpu")
    module._hf_hook = Hook()
    assert onload(module) == torch.device("cpu")
    assert module._hf_hook.calls == 1 and module.weight.dtype == torch.float64


def test_pipeline_variants_hold_the_release_merged_weights(pipe, tiny_models):
    """The pipeline switches from the converted cache: each variant's DiT equals the release's merge of that folder."""
    assert pipe.variants is not None and pipe.variants.mode == "converted"
    try:
        for name, folder in (("transition", "720p-81f-cond"), ("base", "720p-81f-base")):
            pipe.use_variant(name)
            merged = load_release_model(tiny_models / "posegen" / folder, pipe.transformer.dtype)
            ours = pipe.transformer.state_dict()
            assert pipe.transformer.config.shift_ref_pos == merged.config.shift_ref_pos
            assert all(torch.equal(ours[k], v) for k, v in merged.state_dict().items()), name
    finally:
        pipe.use_variant("base")


def test_generator_gives_the_release_seed_noise_and_diffusers_outputs(pipe, embeds):
    """A CPU generator seeded like the release draws the release's float32 noise: bit-identical to passing it as latents."""
    pipe.use_variant("base")
    pose, hand = driving(1), driving(2)
    common = {**embeds, "pose_frames": pose, "hand_frames": hand, "num_inference_steps": STEPS}
    noise = torch.randn((1, 16, 21, H // 8, W // 8), generator=torch.Generator("cpu").manual_seed(7), dtype=torch.float32)
    from_generator = pipe(**common, generator=release_generator(7), output_type="latent").frames
    (from_latents,) = pipe(**common, latents=noise, output_type="latent", return_dict=False)
    assert torch.equal(from_generator, from_latents)
    frames = pipe(**common, generator=release_generator(7)).frames
    assert np.array_equal(frames, tensor_to_frames(decode_latents(pipe.vae, from_generator)))
    with pytest.raises(ValueError, match="output_type 'pil'"):
        pipe(**common, generator=release_generator(7), output_type="pil")


def test_renderer_starts_every_segment_from_the_same_noise():
    """The release seeds a fresh CPU generator per segment; the renderer hands each call its own, seeded alike."""
    from posegen_cli.longvideo.options import AnimateOptions, resolve_settings
    from posegen_cli.longvideo.presets import KVShareRanges
    from posegen_cli.longvideo.renderer import JobEmbeddings, PipelineRenderer
    from posegen_cli.pipelines.pipeline_posegen import PoseGenPipelineOutput

    draws: list[torch.Tensor] = []

    class FakePipe:
        def encode_prompt(self, prompt):
            return torch.zeros(1), torch.zeros(1)

        def encode_reference(self, image, height, width):
            return torch.zeros(1), torch.zeros(1)

        def use_variant(self, name):
            pass

        def enable_feature_cache(self, name, threshold, num_inference_steps, kv_steps):
            assert name == "none"

        def __call__(self, **kwargs):
            draws.append(torch.randn(4, generator=kwargs["generator"]))
            return PoseGenPipelineOutput(frames=np.zeros((1, 2, 2, 3), np.uint8))

    kv = KVShareRanges(steps=(0, 1), blocks=(1, 2), max_map_block=0)
    embeddings = JobEmbeddings.encode(FakePipe(), "a man", np.zeros((2, 2, 3), np.uint8), 16, 16)
    job = resolve_settings(AnimateOptions(resolution="16x16", steps=1, guidance=5.0, seed=11, device="cpu"))
    renderer = PipelineRenderer(FakePipe(), embeddings, subject_positions=[1], kv=kv, job=job)
    frames = np.zeros((1, 2, 2, 3), np.uint8)
    renderer.render_anchor(frames, frames, lambda step: None, record=False)
    renderer.render_transition(frames, frames, frames, frames, lambda step: None)
    expected = torch.randn(4, generator=torch.Generator("cpu").manual_seed(11))
    assert len(draws) == 2 and all(torch.equal(d, expected) for d in draws)

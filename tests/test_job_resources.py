"""What a job keeps resident: encoders dropped after the embeddings, the black hand latent encoded once, VAE tiling."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from posegen_cli.errors import MissingModelError
from posegen_cli.longvideo.loading import load_pipeline
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline, release_generator
from posegen_cli.pipelines.vae import RELEASE_TILES, decode, encode, encode_video, frames_to_tensor

torch.set_num_threads(1)
H, W, F = 64, 32, 9


@pytest.fixture
def pipe(tiny_models: Path) -> PoseGenPipeline:
    return load_pipeline(tiny_models, device="cpu", dtype="float32")


def frames(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (F, H, W, 3), dtype=np.uint8)


def count_encoder_calls(pipe: PoseGenPipeline, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = pipe.vae.encode

    def counting(x: torch.Tensor, *args: object, **kwargs: object):  # noqa: ANN202
        calls.append(x.shape[2])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "encode", counting)
    return calls


def test_black_hand_video_is_encoded_once_per_job(pipe: PoseGenPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    black = np.zeros((F, H, W, 3), np.uint8)
    calls = count_encoder_calls(pipe, monkeypatch)
    first = pipe.encode_conditions(frames(1), black, None, None, H, W)
    second = pipe.encode_conditions(frames(2), black, None, None, H, W)
    # one tile per video at this size: pose + hand, then the pose only
    assert len(calls) == 3
    # hands that are not all black, or a transition's pasted neighbours, are encoded every time
    pipe.encode_conditions(frames(3), frames(4), None, None, H, W)
    pipe.encode_conditions(frames(3), black, frames(5)[:2], None, H, W)
    assert len(calls) == 3 + 2 + 2
    assert torch.equal(first[1], second[1])
    assert torch.equal(first[1], encode_video(pipe.vae, frames_to_tensor(black)))


def test_encoders_leave_the_gpu_and_host_memory_after_the_embeddings(pipe: PoseGenPipeline) -> None:
    prompt, negative = pipe.encode_prompt("a man dancing")
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    image_embeds, reference = pipe.encode_reference(image, H, W)
    refs = [weakref.ref(pipe.text_encoder), weakref.ref(pipe.image_encoder)]
    before = pipe(
        prompt_embeds=prompt, negative_prompt_embeds=negative, image_embeds=image_embeds, reference_latents=reference,
        pose_frames=frames(6), hand_frames=frames(7), num_inference_steps=1, generator=release_generator(1),
    ).frames  # fmt: skip
    pipe.release_encoders()
    gc.collect()
    assert pipe.text_encoder is None and pipe.image_encoder is None and pipe.tokenizer is None
    assert all(ref() is None for ref in refs), "nothing may keep the encoders alive"
    with pytest.raises(MissingModelError, match="without the text encoder"):
        pipe.encode_prompt("again")
    after = pipe(
        prompt_embeds=prompt, negative_prompt_embeds=negative, image_embeds=image_embeds, reference_latents=reference,
        pose_frames=frames(6), hand_frames=frames(7), num_inference_steps=1, generator=release_generator(1),
    ).frames  # fmt: skip
    np.testing.assert_array_equal(before, after)


def test_untiled_vae_option_runs_whole_frames(pipe: PoseGenPipeline) -> None:
    """Larger than one release tile (240x416 px), so the release path blends tiles and untiled differs from it."""
    video = frames_to_tensor(np.random.default_rng(8).integers(0, 256, (5, 256, 448, 3), dtype=np.uint8))
    tiled, whole = encode(pipe.vae, video, RELEASE_TILES), encode(pipe.vae, video, None)
    assert tiled.shape == whole.shape == (1, 16, 2, 32, 56)
    assert not torch.equal(tiled, whole)
    pixels = decode(pipe.vae, whole, None)
    assert pixels.shape == (1, 3, 5, 256, 448) and pixels.abs().max() <= 1


def test_group_offload_covers_every_component(pipe: PoseGenPipeline) -> None:
    """``--offload group`` on the CPU (no streams): every module is under the hooks and the segment is unchanged."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    prompt, negative = pipe.encode_prompt("a man dancing")
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    image_embeds, reference = pipe.encode_reference(image, H, W)
    call = {
        "prompt_embeds": prompt, "negative_prompt_embeds": negative, "image_embeds": image_embeds,
        "reference_latents": reference, "pose_frames": frames(6), "hand_frames": frames(7), "num_inference_steps": 1,
    }  # fmt: skip
    resident = pipe(**call, generator=release_generator(1)).frames
    pipe.enable_group_offload_all(torch.device("cpu"), use_stream=False)
    for name in ("text_encoder", "image_encoder", "vae", "transformer"):
        assert _is_group_offload_enabled(getattr(pipe, name)), name
    assert torch.equal(pipe.encode_prompt("a man dancing")[0], prompt)
    np.testing.assert_array_equal(pipe(**call, generator=release_generator(1)).frames, resident)

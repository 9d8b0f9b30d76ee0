"""``PoseGenPipeline``: one 81-frame PoseGen segment on diffusers, with the release's numerics (port.md §1.9, §4).

The long-video engine calls it once per segment: text and reference embeddings are computed once per job
(:meth:`PoseGenPipeline.encode_prompt`, :meth:`PoseGenPipeline.encode_reference`) and passed to every call; the base
and transition checkpoints share one in-memory DiT and are switched with :meth:`PoseGenPipeline.use_variant`. Loading
from the model registry lives with the engine (``longvideo/loading.py``); this module knows no hub names.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPVisionModel, PreTrainedTokenizerBase, UMT5EncoderModel

from posegen_cli.errors import InputError, MissingModelError, option, out_of_memory_as
from posegen_cli.models import KVShareCache, PoseGenTransformer3DModel, PoseGenVariants, kv_sharing
from posegen_cli.models.acceleration import AttentionChoice
from posegen_cli.models.feature_cache import FeatureCache, cache_settings
from posegen_cli.pipelines.conditioning import check_segment_frames, condition_mask, paste_head_tail
from posegen_cli.pipelines.image import encode_clip
from posegen_cli.pipelines.scheduling import euler_step, guided_velocity, model_timestep, set_release_timesteps
from posegen_cli.pipelines.text import DEFAULT_NEGATIVE, encode_text
from posegen_cli.pipelines.vae import (
    LATENT_CHANNELS,
    RELEASE_TILES,
    SPATIAL,
    Tiles,
    decode,
    encode,
    encode_untiled,
    frames_to_tensor,
    tensor_to_frames,
)
from posegen_cli.video.framing import MODEL_SIZE, frame_to_model

Variant = Literal["base", "transition"]
OUTPUT_TYPES = ("np", "latent")
DEFAULT_SEED = 42
SIZE_MULTIPLE = 16
"""VAE (x8) and patchify (x2) strides: frame sides must be multiples of 16."""

StepCallback = Callable[["PoseGenPipeline", int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]


def oom_message(what: str) -> str:
    """The advice when the GPU runs out of memory while ``what``."""
    return (
        f"GPU out of memory while {what} (try {option('offload')} group, a smaller {option('preview')} size, "
        "or a GPU with more memory)"
    )


def release_generator(seed: int = DEFAULT_SEED) -> torch.Generator:
    """The release's noise source: a CPU generator seeded with ``seed``, fresh for every segment (so every segment of
    a job starts from the same float32 noise, as the release's per-segment ``torch.Generator("cpu").manual_seed``)."""
    return torch.Generator("cpu").manual_seed(seed)


@dataclass
class PoseGenPipelineOutput(BaseOutput):
    """What :meth:`PoseGenPipeline.__call__` returns with ``return_dict=True``.

    ``frames``: uint8 RGB [F, H, W, 3] for ``output_type="np"``, or the denoised latents [1, 16, T, H/8, W/8] in the
    model dtype for ``output_type="latent"``.
    """

    frames: np.ndarray | torch.Tensor


class PoseGenPipeline(DiffusionPipeline):
    """Pose- and hand-conditioned image-to-video for one segment, on the PoseGen DiT.

    Components: umT5 ``tokenizer``/``text_encoder`` (optional: workers that get precomputed embeddings skip the
    11 GB encoder), CLIP ``image_encoder``, Wan ``vae``, the PoseGen ``transformer`` and a flow-match ``scheduler``
    configured with the release's sigmas (the transformer is optional too: a Ray driver only encodes). All numerics follow the release (bf16 update, bf16 timesteps, CPU float32
    noise from the seed, DiffSynth VAE tiling, squashed CLIP input, truncating output).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->vae"
    _optional_components: ClassVar[list[str]] = ["tokenizer", "text_encoder", "image_encoder", "transformer"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        text_encoder: UMT5EncoderModel | None,
        image_encoder: CLIPVisionModel | None,
        vae: AutoencoderKLWan,
        transformer: PoseGenTransformer3DModel | None,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )
        self.variants: PoseGenVariants | None = None
        self.vae_tiles: Tiles | None = RELEASE_TILES
        """VAE tiling of conditions and output: the release's (default), other (size, stride), or None (untiled)."""
        self._black_latents: dict[tuple, torch.Tensor] = {}
        self.feature_cache: FeatureCache | None = None
        self.attention: AttentionChoice | None = None
        """The attention kernel ``load_pipeline`` set (None: diffusers' active backend)."""

    def enable_group_offload_all(self, device: torch.device, use_stream: bool = True) -> None:
        """Offloading "group": every component rests in (pinned) host memory and is streamed to ``device`` on use.

        The DiT block by block (one 0.8 GB block at a time, prefetched on a side stream), the encoders and the VAE
        leaf by leaf (they have no block list diffusers could group).
        """
        self.enable_group_offload(onload_device=device, offload_type="leaf_level", use_stream=use_stream, exclude_modules=["transformer"])
        if self.transformer is not None:  # an encoders-only pipeline has none
            self.transformer.enable_group_offload(onload_device=device, offload_type="block_level", num_blocks_per_group=1, use_stream=use_stream)

    def release_encoders(self) -> None:
        """Drop umT5, CLIP and the tokenizer once the job's embeddings exist: off the GPU and out of host memory.

        Calls that need them afterwards raise MissingModelError (pass precomputed embeddings). Under model CPU offload
        the hooks are re-applied to the remaining components.
        """
        hooked = bool(getattr(self, "_all_hooks", None))
        if hooked:
            self.remove_all_hooks()
        self.register_modules(tokenizer=None, text_encoder=None, image_encoder=None)
        if hooked:
            self.enable_model_cpu_offload(device=self._offload_device)
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def use_variant(self, name: Variant) -> None:
        """Switch the DiT to the "base" or "transition" checkpoint in place (no reload of the shared weights)."""
        if self.variants is None:
            raise RuntimeError("this pipeline was built without variants; load it with posegen_cli.longvideo.loading.load_pipeline")
        self.variants.activate(name)

    def enable_feature_cache(
        self, name: str, threshold: float | None, num_inference_steps: int, kv_steps: Sequence[int] = ()
    ) -> FeatureCache | None:
        """Put diffusers' ``name`` cache hook ("fbc", "magcache"; "none" removes it) on the DiT for this schedule.

        The first and last steps and ``kv_steps`` (where segments record or replay background K/V) always run every
        block; each guidance branch keeps its own cached state. Raises ValueError for an unknown cache or threshold.
        """
        if self.feature_cache is not None:
            self.feature_cache.disable()
            self.feature_cache = None
        settings = cache_settings(name, threshold, num_inference_steps, kv_steps)
        if settings.name != "none":
            self.feature_cache = FeatureCache(self.transformer, settings)
        return self.feature_cache

    def _cache_context(self, branch: str, step: int, num_inference_steps: int) -> contextlib.AbstractContextManager[None]:
        """The DiT's ``cache_context`` for one forward of ``branch`` at ``step``, which both the K/V-sharing hook and
        diffusers' cache hooks read; the feature cache's guards run first (:meth:`FeatureCache.before_forward`)."""
        if self.feature_cache is not None:
            self.feature_cache.before_forward(step, branch)
        return self.transformer.cache_context(branch, step_index=step, num_inference_steps=num_inference_steps)

    @property
    def model_dtype(self) -> torch.dtype:
        """The DiT's dtype (the VAE's in an encoders-only pipeline, ``loading.load_encoder_pipeline``)."""
        return (self.transformer if self.transformer is not None else self.vae).dtype

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str = DEFAULT_NEGATIVE) -> tuple[torch.Tensor, torch.Tensor]:
        """umT5 embeddings [1, 512, 4096] of the prompt and of the negative prompt (once per job)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise MissingModelError("this pipeline was loaded without the text encoder; pass precomputed prompt embeddings")
        with out_of_memory_as(oom_message("encoding the prompt")):
            positive = encode_text(self.tokenizer, self.text_encoder, prompt)
            negative = encode_text(self.tokenizer, self.text_encoder, negative_prompt)
        device = self._execution_device
        return positive.to(device), negative.to(device)

    @torch.no_grad()
    def encode_reference(
        self, image: np.ndarray, height: int = MODEL_SIZE[0], width: int = MODEL_SIZE[1]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP tokens [1, 257, 1280] and the untiled VAE latent [1, 16, 1, height/8, width/8] of the reference photo.

        The uint8 RGB image is cropped to 9:16 and resized to ``height`` x ``width`` as the release does.
        """
        if self.image_encoder is None:
            raise MissingModelError("this pipeline was loaded without the image encoder; pass precomputed image embeddings")
        check_model_size(height, width)
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"the reference image must be uint8 RGB [H, W, 3], got {image.dtype} {tuple(image.shape)}")
        framed = image if image.shape[:2] == (height, width) else frame_to_model(image, (height, width))
        pixels = frames_to_tensor(framed[None]).to(self.model_dtype)
        with out_of_memory_as(oom_message("encoding the reference image")):
            latents = encode_untiled(self.vae, pixels)
            embeds = encode_clip(self.image_encoder, pixels[:, :, 0])
        device = self._execution_device
        return embeds.to(device), latents.to(device)

    @torch.no_grad()
    def encode_conditions(
        self,
        pose_frames: np.ndarray,
        hand_frames: np.ndarray,
        head_frames: np.ndarray | None,
        tail_frames: np.ndarray | None,
        height: int,
        width: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``control_latents`` [1, 20, T, h, w] (4 mask + 16 pose channels) and ``hand_latents`` [1, 16, T, h, w].

        Head/tail frames overwrite the first/last pose *and* hand frames before the tiled encode (spec §1.9).
        """
        num_frames = len(pose_frames)
        pose = _to_model_size(pose_frames, height, width)
        hand = _to_model_size(hand_frames, height, width)
        check_segment_frames("pose frames", pose, num_frames, height, width)
        check_segment_frames("hand frames", hand, num_frames, height, width)
        if (num_frames - 1) % 4:
            raise InputError(f"a segment needs 4k+1 frames (81 for PoseGen), got {num_frames}")
        for name, given in (("head frames", head_frames), ("tail frames", tail_frames)):
            if given is not None:
                check_segment_frames(name, given, len(given), height, width)
        head = len(head_frames) if head_frames is not None else 0
        tail = len(tail_frames) if tail_frames is not None else 0
        if head + tail > num_frames:
            raise InputError(f"{head} head + {tail} tail frames do not fit in a {num_frames}-frame segment")
        dt = self.model_dtype
        pose_latents = encode(self.vae, frames_to_tensor(paste_head_tail(pose, head_frames, tail_frames)).to(dt), self.vae_tiles)
        hand_latents = self._encode_hand(paste_head_tail(hand, head_frames, tail_frames))
        mask = condition_mask(num_frames, head, tail, height // SPATIAL, width // SPATIAL, dt)[None]
        device = self._execution_device
        return torch.cat([mask, pose_latents], dim=1).to(device), hand_latents.to(device)

    def _encode_hand(self, frames: np.ndarray) -> torch.Tensor:
        """Hand latents; an all-black hand video (no hands found, or the release's hand dropout) is encoded once.

        The latent of black frames depends only on their shape, the dtype, the tiling and the VAE, so it is kept
        for the pipeline's life under that key (≈10 MB at 720p) instead of re-running the encoder every segment.
        """
        dt = self.model_dtype
        if frames.any():
            return encode(self.vae, frames_to_tensor(frames).to(dt), self.vae_tiles)
        key = (frames.shape, dt, self.vae_tiles)
        if key not in self._black_latents:
            self._black_latents[key] = encode(self.vae, frames_to_tensor(frames).to(dt), self.vae_tiles)
        return self._black_latents[key]

    def check_inputs(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        image_embeds: torch.Tensor,
        reference_latents: torch.Tensor,
        output_type: str,
        latents: torch.Tensor | None,
    ) -> None:
        """Raise InputError (ValueError for programming errors) unless the embeddings fit together and the model.

        Frame counts and sizes are checked where the frames are encoded (:meth:`encode_conditions`).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {OUTPUT_TYPES}")
        if prompt_embeds.ndim != 3 or negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"prompt_embeds and negative_prompt_embeds must both be [1, 512, C], got {tuple(prompt_embeds.shape)} "
                f"and {tuple(negative_prompt_embeds.shape)}"
            )
        if image_embeds.ndim != 3:
            raise ValueError(f"image_embeds must be [1, 257, C], got {tuple(image_embeds.shape)}")
        if reference_latents.ndim != 5 or reference_latents.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"reference_latents must be [1, {LATENT_CHANNELS}, 1, h, w], got {tuple(reference_latents.shape)}")
        check_model_size(reference_latents.shape[-2] * SPATIAL, reference_latents.shape[-1] * SPATIAL)
        if latents is not None and (latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS):
            raise ValueError(f"latents must be [1, {LATENT_CHANNELS}, T, h, w], got {tuple(latents.shape)}")

    @torch.no_grad()
    def __call__(
        self,
        *,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        image_embeds: torch.Tensor,
        reference_latents: torch.Tensor,
        pose_frames: np.ndarray,
        hand_frames: np.ndarray,
        head_frames: np.ndarray | None = None,
        tail_frames: np.ndarray | None = None,
        negative_pose_frames: np.ndarray | None = None,
        negative_hand_frames: np.ndarray | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        sigmas: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        kv_share: KVShareCache | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
    ) -> PoseGenPipelineOutput | tuple[np.ndarray | torch.Tensor]:
        """Generate one segment at the reference latent's size (x8).

        Args:
            prompt_embeds: umT5 embeddings [1, 512, C] of the prompt (:meth:`encode_prompt`).
            negative_prompt_embeds: umT5 embeddings [1, 512, C] of the negative prompt.
            image_embeds: CLIP tokens [1, 257, C'] of the reference (:meth:`encode_reference`).
            reference_latents: untiled VAE latent [1, 16, 1, H/8, W/8] of the reference; sets the output size.
            pose_frames: uint8 [F, H, W, 3] skeleton frames, F = 4k+1 (81 for PoseGen); other sizes get the release's
                9:16 crop and resize.
            hand_frames: uint8 [F, H, W, 3] hand-normal frames, as ``pose_frames``.
            head_frames: for transition segments, the previous segment's last frames, uint8 [h, H, W, 3].
            tail_frames: for transition segments, the next segment's first frames, uint8 [t, H, W, 3].
            negative_pose_frames: uint8 [F, H, W, 3] pose frames for the negative guidance branch only, e.g. a camera
                pattern for PoseAnything's decoupled guidance ε = ε(∅s, zc) + s·(ε(zs, ∅c) − ε(∅s, zc)) (arXiv
                2512.13465). Encoded once per call with the same head/tail frames and mask. None: the positive
                branch's, so without either negative input both branches get the same conditioning, as in the release.
            negative_hand_frames: uint8 [F, H, W, 3] hand frames for the negative branch only (e.g. black); None: the
                positive branch's.
            num_inference_steps: denoising steps, on the release's shifted sigmas.
            guidance_scale: classifier-free guidance scale; 1.0 skips the negative branch.
            sigmas: unshifted float32 sigmas [num_inference_steps] replacing the release's ``linspace(1, 0, N + 1)[:-1]``
                (a distilled model's schedule); the scheduler's shift 5 applies to them as to the release's.
            generator: source of the initial noise, drawn in float32 [1, 16, T, H/8, W/8] on the generator's device
                and cast to the model dtype; :func:`release_generator` (a CPU generator, fresh per segment) gives the
                release's noise. None draws from the global RNG.
            latents: initial noise [1, 16, T, H/8, W/8] to use instead of drawing it (``generator`` is then unused).
            kv_share: the background-sharing cache (recording for the anchor, replaying for other base segments).
            output_type: "np" for uint8 frames (the release's truncating conversion), "latent" for the latents.
            return_dict: return a :class:`PoseGenPipelineOutput` (True) or a one-element tuple.
            callback_on_step_end: ``callback(pipe, step, timestep, {"latents": ...})`` after every step; it may
                return a dict with new ``latents``.

        Returns:
            PoseGenPipelineOutput (or ``(frames,)``): uint8 frames [F, H, W, 3], or latents for ``output_type="latent"``.

        Raises:
            InputError: frames of the wrong count, dtype or size, or head and tail frames that do not fit.
            ResourceError: the GPU ran out of memory.
            ValueError: embeddings of the wrong shape, an unknown ``output_type``.
        """
        self.check_inputs(prompt_embeds, negative_prompt_embeds, image_embeds, reference_latents, output_type, latents)
        height, width = reference_latents.shape[-2] * SPATIAL, reference_latents.shape[-1] * SPATIAL
        with out_of_memory_as(oom_message("generating a segment")):
            control_latents, hand_latents = self.encode_conditions(pose_frames, hand_frames, head_frames, tail_frames, height, width)
            negative_conditions: dict[str, torch.Tensor] = {}
            if negative_pose_frames is not None or negative_hand_frames is not None:
                negative_control, negative_hand = self.encode_conditions(
                    pose_frames if negative_pose_frames is None else negative_pose_frames,
                    hand_frames if negative_hand_frames is None else negative_hand_frames,
                    head_frames, tail_frames, height, width,
                )  # fmt: skip
                negative_conditions = {"control_latents": negative_control, "hand_latents": negative_hand}
            if latents is None:
                shape = (1, LATENT_CHANNELS, *control_latents.shape[2:])
                noise_device = generator.device if generator is not None else torch.device("cpu")
                latents = randn_tensor(shape, generator=generator, device=noise_device, dtype=torch.float32)
            elif latents.shape[2:] != control_latents.shape[2:]:
                raise ValueError(f"latents {tuple(latents.shape)} do not match the segment's latent grid {tuple(control_latents.shape[2:])}")
            latents = self._denoise(
                latents,
                {
                    "encoder_hidden_states_image": image_embeds,
                    "control_latents": control_latents,
                    "reference_latents": reference_latents,
                    "hand_latents": hand_latents,
                },
                (prompt_embeds, negative_prompt_embeds),
                num_inference_steps,
                guidance_scale,
                sigmas,
                kv_share,
                callback_on_step_end,
                negative_conditions,
            )
            frames = latents if output_type == "latent" else tensor_to_frames(decode(self.vae, latents, self.vae_tiles))
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return PoseGenPipelineOutput(frames=frames)

    def _denoise(
        self,
        noise: torch.Tensor,
        conditions: dict[str, torch.Tensor],
        prompts: tuple[torch.Tensor, torch.Tensor],
        num_inference_steps: int,
        guidance_scale: float,
        sigmas: torch.Tensor | None,
        kv_share: KVShareCache | None,
        callback_on_step_end: StepCallback | None,
        negative_conditions: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The release's sampling loop: float32 noise cast to the model dtype, positive branch before negative, bf16 Euler updates.

        ``negative_conditions`` replaces the ``control_latents``/``hand_latents`` of the negative branch's forward.
        """
        dt = self.model_dtype
        device = self._execution_device
        latents = noise.to(dt).to(device)
        set_release_timesteps(self.scheduler, num_inference_steps, sigmas)
        if self.feature_cache is not None:
            settings = self.feature_cache.settings
            if settings.num_inference_steps != num_inference_steps:
                raise ValueError(f"the feature cache was built for {settings.num_inference_steps} steps, not {num_inference_steps}")
            unguarded = sorted(kv_share.steps - settings.guarded_steps) if kv_share is not None else []
            if unguarded:
                raise ValueError(f"K/V-sharing steps {unguarded} are not guarded by the feature cache (pass them as kv_steps)")
            if kv_share is not None and kv_share.recompute_model is not None:
                raise ValueError("a feature cache cannot run beside K/V recomputation (the anchor's forward would pass through the cached blocks)")
        schedule = self.scheduler.sigmas
        shared: dict[str, Any] = {name: value.to(device, dt) for name, value in conditions.items()}
        positive, negative = (embeds.to(device, dt) for embeds in prompts)
        negative_only = {name: value.to(device, dt) for name, value in (negative_conditions or {}).items()}
        with kv_sharing(self.transformer, kv_share):
            for step, t in enumerate(self.scheduler.timesteps):
                forward = functools.partial(self.transformer, hidden_states=latents, timestep=model_timestep(t, dt, device), **shared)
                # positive first: in base segments the negative branch reads the maps the positive one just made;
                # cache_context names the branch and step for the K/V-sharing hook (and diffusers' cache hooks)
                with self._cache_context("cond", step, num_inference_steps):
                    velocity = forward(encoder_hidden_states=positive).sample
                if guidance_scale != 1.0:
                    with self._cache_context("uncond", step, num_inference_steps):
                        velocity_negative = forward(encoder_hidden_states=negative, **negative_only).sample
                    velocity = guided_velocity(velocity, velocity_negative, guidance_scale)
                latents = euler_step(latents, velocity, schedule[step], schedule[step + 1])
                if callback_on_step_end is not None:
                    update = callback_on_step_end(self, step, t, {"latents": latents})
                    if update and "latents" in update:
                        latents = update["latents"]
        return latents


def check_model_size(height: int, width: int, what: str = "model size") -> None:
    """Raise an InputError unless both sides are positive multiples of 16: the one rule for the pipeline and the resolution option.

    ``what`` names the size in the message (the engine passes the resolution setting).
    """
    if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise InputError(
            f"{what} {width}x{height} (WxH): width and height must be positive multiples of {SIZE_MULTIPLE} (e.g. 720x1280, 288x512)"
        )


def _to_model_size(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames already at the model size pass through; others get the release's 9:16 crop and resize."""
    frames = np.asarray(frames)
    if frames.ndim == 4 and frames.dtype == np.uint8 and frames.shape[1:3] != (height, width):
        return frame_to_model(frames, (height, width))
    return frames

"""The long-video engine's handle on a loaded ``PoseGenPipeline``: one job's embeddings, variants and K/V cache."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from posegen_cli.fsutil import atomic_path
from posegen_cli.longvideo.memory import KVPlan
from posegen_cli.longvideo.options import JobSettings
from posegen_cli.longvideo.presets import KVShareRanges
from posegen_cli.longvideo.segments import ProgressCallback
from posegen_cli.models import KVShareCache
from posegen_cli.models.kv_store import TieredStore
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline, release_generator


@dataclass(frozen=True)
class JobEmbeddings:
    """One job's prompt and reference embeddings, computed once and handed to every segment (and every worker).

    ``prompt_embeds``/``negative_embeds`` [1, 512, 4096] umT5, ``image_embeds`` [1, 257, 1280] CLIP, ``reference_latents``
    [1, 16, 1, H/8, W/8] VAE; all in the model dtype, about 5 MB at 720p in bf16.
    """

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    image_embeds: torch.Tensor
    reference_latents: torch.Tensor

    @classmethod
    def encode(cls, pipe: PoseGenPipeline, prompt: str, reference: np.ndarray, height: int, width: int) -> JobEmbeddings:
        """Encode ``prompt`` (and the default negative prompt) and the uint8 RGB ``reference`` with ``pipe``'s encoders."""
        prompt_embeds, negative_embeds = pipe.encode_prompt(prompt)
        image_embeds, reference_latents = pipe.encode_reference(reference, height, width)
        return cls(prompt_embeds, negative_embeds, image_embeds, reference_latents)

    def save(self, path: Path) -> None:
        """Write the four tensors atomically as safetensors (how a Ray driver hands them to its workers)."""
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({name: getattr(self, name).detach().cpu().contiguous() for name in self.__dataclass_fields__}, str(tmp))

    @classmethod
    def load(cls, path: Path) -> JobEmbeddings:
        """The embeddings :meth:`save` wrote, on the CPU."""
        from safetensors.torch import load_file

        return cls(**load_file(str(path)))

    def to(self, device: torch.device | str) -> JobEmbeddings:
        """The same embeddings on ``device`` (CPU to ship them to workers, the worker's device to use them)."""
        return replace(self, **{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


@dataclass(frozen=True)
class RenderSpec:
    """Everything besides the models that fixes a job's segments: what each process builds its renderer from.

    ``kv``: the shared steps and blocks (None: no K/V sharing, as with a camera in the negative branch); ``kv_plan``:
    where the anchor's K/V live (``memory.plan_kv``, planned once per job before any work; None: on the device).
    ``seed``: every segment is denoised from the same seed (the release's rule), so no segment depends on which
    worker ran it or when.
    """

    embeddings: JobEmbeddings
    subject_positions: tuple[int, ...]
    kv: KVShareRanges | None
    kv_plan: KVPlan | None
    job: JobSettings
    """Steps, guidance, seed and speed settings (a distilled schedule, the feature cache) of every segment."""

    def renderer(self, pipe: PoseGenPipeline, anchor_inputs: Path | None, kv_dir: Path | None) -> PipelineRenderer:
        """A renderer of this job on ``pipe``, its K/V placed as planned (disk entries in ``kv_dir``); ``anchor_inputs``:
        where the anchor's shared-step latents are kept."""
        renderer = PipelineRenderer(
            pipe, self.embeddings.to(pipe._execution_device), subject_positions=self.subject_positions, kv=self.kv,
            job=self.job, anchor_inputs=anchor_inputs,
        )  # fmt: skip
        renderer.place_kv(self.kv_plan, kv_dir)
        return renderer


def save_anchor_inputs(path: Path, latents: dict[int, torch.Tensor]) -> None:
    """Write the anchor's latents at its shared steps (step index -> [1, 16, T, h, w]) atomically as safetensors."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({f"step_{step}": value.detach().cpu().contiguous() for step, value in latents.items()}, str(tmp))


def load_anchor_inputs(path: Path) -> dict[int, torch.Tensor]:
    """The latents :func:`save_anchor_inputs` wrote (CPU tensors)."""
    from safetensors.torch import load_file

    return {int(name.removeprefix("step_")): value for name, value in load_file(str(path)).items()}


class _Recorded(Exception):
    """Raised from the step callback once the anchor has recorded its last shared step (cache rebuild only)."""


class PipelineRenderer:
    """Runs segments on one pipeline with the job's prompt and reference encoded once.

    Base segments (anchor included) run on the "base" variant and transitions on the "transition" variant, swapped
    in place; the anchor's K/V cache lives here from the anchor's run until :meth:`release_kv`, stored as
    :meth:`place_kv` says (all on the device until it is called). ``kv=None`` shares nothing: the anchor records no
    cache and base segments run on their own.
    """

    def __init__(
        self,
        pipe: PoseGenPipeline,
        embeddings: JobEmbeddings,
        *,
        subject_positions: Sequence[int],
        kv: KVShareRanges | None,
        job: JobSettings,
        anchor_inputs: Path | None = None,
    ) -> None:
        """``embeddings``: the job's prompt and reference, encoded once (:class:`JobEmbeddings`, on ``pipe``'s device).
        ``kv``: the background K/V sharing ranges (None: no sharing, as with a camera pattern). ``anchor_inputs``: where
        the anchor's shared-step latents are kept for rebuilds. ``job`` gives the steps, guidance, seed and speed settings: a distilled model's schedule (sigmas) and diffusers' feature
        cache for every segment, which never skips the anchor's K/V steps (``kv.step_list``) nor the first and last."""
        self.pipe = pipe
        self.num_steps = job.steps
        self.guidance = job.guidance
        self.seed = job.seed
        speed = job.speed
        self.sigmas = None if speed.sigmas is None else torch.tensor(speed.sigmas, dtype=torch.float32)
        self.kv = kv
        self.subject_positions = list(subject_positions)
        self.embeddings = embeddings
        self.anchor_inputs = anchor_inputs
        self.kv_plan: KVPlan | None = None
        self.kv_dir: Path | None = None
        self.cache: KVShareCache | None = None
        self._variant: str | None = None
        pipe.enable_feature_cache(speed.cache, speed.cache_threshold, job.steps, () if kv is None else kv.step_list)

    def _use(self, variant: str) -> None:
        if self._variant != variant:
            self.pipe.use_variant(variant)
            self._variant = variant

    def _run(
        self,
        pose: np.ndarray,
        hand: np.ndarray,
        on_step: ProgressCallback,
        *,
        head: np.ndarray | None = None,
        tail: np.ndarray | None = None,
        kv_share: KVShareCache | None = None,
        stop_after: int | None = None,
        negative_pose: np.ndarray | None = None,
        on_latents: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    ) -> np.ndarray:
        """One pipeline call; ``on_latents(step, latents)`` sees the input latents of each step after the first and
        may return replacements (diffusers' ``callback_on_step_end`` contract)."""

        def callback(pipe: PoseGenPipeline, step: int, timestep: torch.Tensor, tensors: dict) -> dict | None:
            on_step(step + 1)
            update = on_latents(step + 1, tensors["latents"]) if on_latents is not None else None
            if stop_after is not None and step + 1 >= stop_after:
                raise _Recorded
            return None if update is None else {"latents": update}

        return self.pipe(
            prompt_embeds=self.embeddings.prompt_embeds,
            negative_prompt_embeds=self.embeddings.negative_embeds,
            image_embeds=self.embeddings.image_embeds,
            reference_latents=self.embeddings.reference_latents,
            pose_frames=pose,
            hand_frames=hand,
            head_frames=head,
            tail_frames=tail,
            negative_pose_frames=negative_pose,
            negative_hand_frames=None if negative_pose is None else np.zeros_like(hand),
            num_inference_steps=self.num_steps,
            guidance_scale=self.guidance,
            sigmas=self.sigmas,
            generator=release_generator(self.seed),  # fresh per segment: every segment starts from the same noise
            kv_share=kv_share,
            callback_on_step_end=callback,
        ).frames

    def anchor_steps(self) -> int:
        return 0 if self.kv is None else self.kv.steps[1]

    def render_anchor(
        self,
        pose: np.ndarray,
        hand: np.ndarray,
        on_step: ProgressCallback,
        *,
        record: bool,
        frames_needed: bool = True,
        negative_pose: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """Denoise the anchor; with ``record`` keep its K/V for the bases.

        A full run (``frames_needed``) that records also saves the input latents of its shared steps to
        ``anchor_inputs`` as soon as the last shared step is done: any worker can rebuild the same K/V from them. A
        rebuild (``frames_needed=False``) starts each shared step from those saved latents and stops after the last
        one: ``anchor_steps()`` guided steps (2 forwards each with CFG), no decode. The input of step 0 is the seed's
        noise, which needs no file.
        """
        self._use("base")
        self.release_kv()
        if record and self.kv is not None:
            self.cache = self._new_cache()
        rebuild = not frames_needed
        path = self.anchor_inputs
        saved = load_anchor_inputs(path) if rebuild and path is not None and path.exists() else {}
        kept: dict[int, torch.Tensor] = {}

        def on_latents(step: int, latents: torch.Tensor) -> torch.Tensor | None:
            if step in saved:
                return saved[step].to(latents.device, latents.dtype)
            if record and not rebuild and path is not None and step <= self.anchor_steps():
                if step in self.kv.step_list:
                    kept[step] = latents.detach().cpu().clone()
                if step == self.anchor_steps():
                    save_anchor_inputs(path, kept)
            return None

        frames = None
        try:
            stop_after = None if frames_needed else self.anchor_steps()
            frames = self._run(
                pose, hand, on_step, kv_share=self.cache, stop_after=stop_after, negative_pose=negative_pose, on_latents=on_latents
            )
        except _Recorded:
            self.pipe.maybe_free_model_hooks()
        if self.cache is not None:
            self.cache.start_replay()
        return frames

    def place_kv(self, plan: KVPlan | None, folder: Path | None) -> None:
        """Store the anchor's K/V as ``plan`` says (``memory.plan_kv``; None: on the device), disk entries in ``folder``."""
        self.kv_plan, self.kv_dir = plan, folder

    def _new_cache(self) -> KVShareCache:
        """An empty recording cache placed as the job's K/V plan says."""
        ranges = (self.kv.step_list, self.kv.block_list, self.subject_positions)
        plan = self.kv_plan
        if plan is None:
            return KVShareCache(*ranges, max_map_block=self.kv.max_map_block)
        if plan.placement == "recompute":
            return KVShareCache(*ranges, max_map_block=self.kv.max_map_block, recompute_model=self.pipe.transformer)
        return KVShareCache(*ranges, max_map_block=self.kv.max_map_block, store=plan_store(plan, self.kv_dir), kv_format=plan.fmt)

    def render_base(
        self, pose: np.ndarray, hand: np.ndarray, on_step: ProgressCallback, *, negative_pose: np.ndarray | None = None
    ) -> np.ndarray:
        if self.cache is None and self.kv is not None:
            raise RuntimeError("base segments need the anchor's K/V: render the anchor first")
        self._use("base")
        return self._run(pose, hand, on_step, kv_share=self.cache, negative_pose=negative_pose)

    def render_transition(
        self,
        pose: np.ndarray,
        hand: np.ndarray,
        head: np.ndarray,
        tail: np.ndarray,
        on_step: ProgressCallback,
        *,
        negative_pose: np.ndarray | None = None,
    ) -> np.ndarray:
        self._use("transition")
        return self._run(pose, hand, on_step, head=head, tail=tail, negative_pose=negative_pose)

    def release_kv(self) -> None:
        if self.cache is not None:
            self.cache.release()
            self.cache = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def plan_store(plan: KVPlan, disk_dir: Path | None) -> TieredStore:
    """A store with the plan's byte budget per tier; the last tier it uses takes any rounding excess.

    Leftovers of an earlier, killed run in ``disk_dir`` are removed first.
    """
    used = [tier for tier in ("gpu", "host", "disk") if plan.tiers[tier]] or ["gpu"]
    caps: dict[str, int | None] = {tier: plan.tiers[tier] for tier in ("gpu", "host")}
    if used[-1] in caps:
        caps[used[-1]] = None
    if "disk" in used:
        if disk_dir is None:
            raise ValueError("this K/V plan writes to disk: give the renderer a kv_dir")
        shutil.rmtree(disk_dir, ignore_errors=True)
    return TieredStore(gpu_bytes=caps["gpu"], host_bytes=caps["host"], disk_dir=disk_dir if "disk" in used else None)

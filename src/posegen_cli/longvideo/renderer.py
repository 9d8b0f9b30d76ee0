"""The long-video engine's handle on a loaded ``PoseGenPipeline``: one job's embeddings, variants and K/V cache."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from posegen_cli.longvideo.memory import KVPlan
from posegen_cli.longvideo.options import JobSettings
from posegen_cli.longvideo.presets import KVShareRanges
from posegen_cli.longvideo.segments import ProgressCallback
from posegen_cli.models import KVShareCache
from posegen_cli.models.kv_store import TieredStore
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline, release_generator


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
        *,
        prompt: str,
        subject_positions: Sequence[int],
        reference: np.ndarray,
        kv: KVShareRanges | None,
        job: JobSettings,
    ) -> None:
        """``kv``: the background K/V sharing ranges (None: no sharing, as with a camera pattern). ``job`` gives the
        size, steps, guidance, seed and speed settings: a distilled model's schedule (sigmas) and diffusers' feature
        cache for every segment, which never skips the anchor's K/V steps (``kv.step_list``) nor the first and last."""
        self.pipe = pipe
        self.num_steps = job.steps
        self.guidance = job.guidance
        self.seed = job.seed
        speed = job.speed
        self.sigmas = None if speed.sigmas is None else torch.tensor(speed.sigmas, dtype=torch.float32)
        self.kv = kv
        self.subject_positions = list(subject_positions)
        self.prompt_embeds, self.negative_embeds = pipe.encode_prompt(prompt)
        self.image_embeds, self.reference_latents = pipe.encode_reference(reference, job.height, job.width)
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
    ) -> np.ndarray:
        def callback(pipe: PoseGenPipeline, step: int, timestep: torch.Tensor, tensors: dict) -> None:
            on_step(step + 1)
            if stop_after is not None and step + 1 >= stop_after:
                raise _Recorded

        return self.pipe(
            prompt_embeds=self.prompt_embeds,
            negative_prompt_embeds=self.negative_embeds,
            image_embeds=self.image_embeds,
            reference_latents=self.reference_latents,
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
        self._use("base")
        self.release_kv()
        if record and self.kv is not None:
            self.cache = self._new_cache()
        frames = None
        try:
            stop_after = None if frames_needed else self.anchor_steps()
            frames = self._run(pose, hand, on_step, kv_share=self.cache, stop_after=stop_after, negative_pose=negative_pose)
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

"""Who generates a job's segments: this process in order (:mod:`.local`), or one worker per GPU on Ray (:mod:`.ray`).

Both run each segment through :func:`posegen_cli.longvideo.segments.generate_segment` on a renderer built from the
same :class:`~posegen_cli.longvideo.renderer.RenderSpec`, and both keep the work folder's layout, so a job can be
resumed by either. Ray is imported only by :mod:`.ray`, and only when a job asks for workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from posegen_cli.longvideo.plan import Segment
from posegen_cli.longvideo.renderer import RenderSpec
from posegen_cli.longvideo.segments import SegmentStats
from posegen_cli.longvideo.sources import BlankFrames, CameraFrames, FrameReader, FrameSource
from posegen_cli.models.distill import DistillChoice
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline
from posegen_cli.pose.camera import CameraMotion
from posegen_cli.report import Reporter


@dataclass(frozen=True)
class ModelSpec:
    """How every process loads the models: the single-GPU run's options, so each worker computes the same numbers."""

    models_dir: Path | None
    device: str
    """A resolved device type ("cuda" or "cpu"); a Ray worker's "cuda" is the GPU Ray gave it."""
    dtype: torch.dtype
    offload: str
    attention: str = "auto"
    compile: bool = False
    quantize: str = "none"
    vae_tiling: str = "release"
    """"release" (the release's VAE tiles) or "untiled"."""
    distill: DistillChoice | None = None
    """The step-distillation LoRA joined to both variants (the distill setting, or the turbo speed preset); None: none."""

    def load(self, *, encoders: bool, reporter: Reporter | None = None) -> PoseGenPipeline:
        """The generating pipeline (with or without the text and image encoders), loaded from the converted
        checkpoint cache like a single-GPU run."""
        from posegen_cli.longvideo.loading import DiTWeights, load_pipeline

        pipe = load_pipeline(
            self.models_dir, device=self.device, dtype=self.dtype, offload=self.offload, load_encoders=encoders,
            weights=DiTWeights(distill=self.distill), attention=self.attention, compile=self.compile, quantize=self.quantize, reporter=reporter,
        )  # fmt: skip
        if self.vae_tiling == "untiled":
            pipe.vae_tiles = None
        return pipe


@dataclass(frozen=True)
class SegmentJob:
    """One job's segment phase in plain values (it is shipped to Ray workers): the plan and the files it reads and writes.

    ``pose_video``/``hand_video`` are the conditioning videos (extracted into the work folder, or the user's own; no
    ``hand_video``: black hands); ``camera``: the experimental camera motion of the negative guidance branch, which
    every process draws itself from these few numbers; ``frame_shape`` is (height, width).
    """

    plan: list[Segment]
    work_path: Path
    work_settings: dict[str, Any]
    pose_video: Path
    hand_video: Path | None
    frame_shape: tuple[int, int]
    total_frames: int
    head: int
    tail: int
    compat_mp4: bool
    camera: CameraMotion | None = None

    def open_sources(self) -> tuple[FrameReader, ...]:
        """The readers :func:`~posegen_cli.longvideo.segments.generate_segment` takes: pose, hand and, with a camera,
        its pattern (close each when done)."""
        pose = FrameSource(self.pose_video, self.frame_shape)
        hand = BlankFrames(self.frame_shape) if self.hand_video is None else FrameSource(self.hand_video, self.frame_shape)
        if self.camera is None:
            return pose, hand
        return pose, hand, CameraFrames(self.camera, self.frame_shape)


class Executor(Protocol):
    """Loads the models, then makes sure every segment of a job is in its work folder."""

    def encoder_pipeline(self, reporter: Reporter) -> PoseGenPipeline:
        """A pipeline with the text and image encoders, to compute the job's embeddings once in this process."""
        ...

    def release_encoders(self) -> None:
        """Free the encoders once the job's embeddings exist (they are not needed again)."""
        ...

    def start(self, spec: RenderSpec, job: SegmentJob, reporter: Reporter) -> None:
        """Get the segment generators ready: models loaded, renderers built from ``spec``, K/V placed as it plans."""
        ...

    def run(self, reporter: Reporter, after_segment: Callable[[Segment], None] | None) -> SegmentStats:
        """Generate every segment not yet finished; ``after_segment`` runs once each new segment is stored."""
        ...

    @property
    def attention(self) -> Any:
        """The attention kernel the DiT runs with (``posegen_cli.models.acceleration``'s choice), once started."""
        ...

    def worker_summary(self) -> dict[str, dict[str, Any]] | None:
        """Per-worker segment counts and seconds (None when segments ran in this process)."""
        ...

    def close(self) -> None:
        """Free the models and stop every worker; safe after an error or Ctrl-C, and to call twice."""
        ...

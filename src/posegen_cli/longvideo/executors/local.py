"""Today's single-process path: one pipeline in this process, segments in generation order (no Ray needed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posegen_cli.longvideo.executors import ModelSpec, SegmentJob
from posegen_cli.longvideo.loading import load_pipeline
from posegen_cli.longvideo.plan import Segment
from posegen_cli.longvideo.presets import KVShareRanges
from posegen_cli.longvideo.renderer import PipelineRenderer, RenderSpec
from posegen_cli.longvideo.segments import SegmentStats, render_segments
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline
from posegen_cli.report import Reporter


class LocalExecutor:
    """Loads every model once (the encoders too) and runs :func:`render_segments` on it."""

    def __init__(self, models: ModelSpec) -> None:
        self.models = models
        self.pipe: PoseGenPipeline | None = None
        self.renderer: PipelineRenderer | None = None
        self.job: SegmentJob | None = None

    def encoder_pipeline(self, reporter: Reporter) -> PoseGenPipeline:
        m = self.models
        self.pipe = load_pipeline(
            m.models_dir, device=m.device, dtype=m.dtype, offload=m.offload, attention=m.attention, compile=m.compile,
            quantize=m.quantize, reporter=reporter,
        )  # fmt: skip
        return self.pipe

    def start(self, spec: RenderSpec, job: SegmentJob, reporter: Reporter) -> KVShareRanges | None:
        if self.pipe is None:
            raise RuntimeError("call encoder_pipeline() first: the local executor's pipeline also generates")
        self.job = job
        self.renderer = spec.renderer(self.pipe, WorkDir(job.work_path, job.work_settings).anchor_inputs_path)
        return self.renderer.kv

    def run(self, reporter: Reporter, after_segment: Callable[[Segment], None] | None) -> SegmentStats:
        if self.renderer is None or self.job is None:
            raise RuntimeError("call start() before run()")
        job = self.job
        sources = job.open_sources()
        try:
            return render_segments(
                job.plan, self.renderer, sources, WorkDir(job.work_path, job.work_settings), total_frames=job.total_frames,
                frame_shape=job.frame_shape, overlap=(job.head, job.tail), reporter=reporter, compat_mp4=job.compat_mp4,
                after_segment=after_segment,
            )  # fmt: skip
        finally:
            for source in sources:
                source.close()

    @property
    def attention(self) -> Any:
        return getattr(self.pipe, "attention", None)

    def worker_summary(self) -> dict[str, dict[str, Any]] | None:
        return None

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.release_kv()
        self.renderer = None
        self.pipe = None

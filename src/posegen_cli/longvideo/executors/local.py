"""Today's single-process path: one pipeline in this process, segments in generation order (no Ray needed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posegen_cli.longvideo.executors import ModelSpec, SegmentJob
from posegen_cli.longvideo.plan import Segment
from posegen_cli.longvideo.renderer import PipelineRenderer, RenderSpec
from posegen_cli.longvideo.segments import SegmentStats, render_segments
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline
from posegen_cli.report import Reporter


class LocalExecutor:
    """Loads every model once (the encoders too, freed once the embeddings exist) and runs :func:`render_segments`."""

    def __init__(self, models: ModelSpec) -> None:
        self.models = models
        self.pipe: PoseGenPipeline | None = None
        self.renderer: PipelineRenderer | None = None
        self.job: SegmentJob | None = None

    def encoder_pipeline(self, reporter: Reporter) -> PoseGenPipeline:
        self.pipe = self.models.load(encoders=True, reporter=reporter)
        return self.pipe

    def release_encoders(self) -> None:
        if self.pipe is not None:
            self.pipe.release_encoders()

    def start(self, spec: RenderSpec, job: SegmentJob, reporter: Reporter) -> None:
        if self.pipe is None:
            raise RuntimeError("call encoder_pipeline() first: the local executor's pipeline also generates")
        self.job = job
        work = WorkDir(job.work_path, job.work_settings)
        self.renderer = spec.renderer(self.pipe, work.anchor_inputs_path, work.stage_dir("kv"))

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

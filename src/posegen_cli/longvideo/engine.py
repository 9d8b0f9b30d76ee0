"""``posegen animate``: reference photo + driving video in, the whole long video out, in one process.

Phases: pose extraction → caption and subject tokens → shot preset → model load (once; base and transition
variants share it) → segments in order (anchor, bases replaying its K/V, transitions) into a resumable work
folder → cross-fade merge trimmed to the driving length → H.264 at the driving fps with its audio.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posegen_cli.errors import InputError, ResourceError, option, require_file
from posegen_cli.longvideo.merge import iter_merged
from posegen_cli.longvideo.options import AnimateOptions, JobSettings, fps_text, resolve_settings
from posegen_cli.longvideo.plan import (
    TRANSITION,
    Segment,
    output_frames,
    overlap_before,
    plan_segments,
    timeline_order,
)
from posegen_cli.longvideo.planner import WAN_I2V_14B, JobPlan, JobSpec, ModelShape, expected_kernel, find_gpu, plan_job
from posegen_cli.longvideo.presets import (
    DEFAULT_SHOT,
    KV_STEP_RULE,
    SHOT_PRESETS,
    KVShareRanges,
    classify_shot,
    kv_share_ranges,
    map_kv_steps,
)
from posegen_cli.longvideo.segments import SegmentStats, render_segments
from posegen_cli.longvideo.sources import FrameSource
from posegen_cli.longvideo.speed import RELEASE_STEPS, SpeedSettings
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.models.acceleration import quantization_config, resolve_attention
from posegen_cli.pose.types import PersonPose
from posegen_cli.report import Reporter
from posegen_cli.video import VideoInfo, VideoWriter, available_bytes, probe_video
from posegen_cli.video.framing import frame_to_model, warn_if_cropped
from posegen_cli.video.image import ReferenceImage

ENGINE_VERSION = 2
"""Part of every work folder's key: bump when a change makes old finished segments wrong."""


@dataclass
class PhaseTimer:
    """Wall time per named phase, in the order the phases ran, and the memory peak of each phase.

    GPU peaks are per phase (the allocator's peak is reset when a phase starts); the process's resident-set
    peak can only grow, so each phase records the peak reached by its end.
    """

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    gpu_peak: int = 0

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            peaks = {"rss_peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}
            if cuda:
                peak = torch.cuda.max_memory_allocated(self.device)
                self.gpu_peak = max(self.gpu_peak, peak)
                peaks["gpu_peak_gb"] = round(peak / 1024**3, 3)
            self.memory[name] = peaks


@dataclass
class AnimateResult:
    """What ``animate`` made and what it cost."""

    output: Path
    frames: int
    fps: Fraction
    width: int
    height: int
    audio: bool
    segments: int
    computed: list[int]
    reused: list[int]
    kv_rebuilt: bool
    segment_seconds: dict[int, float]
    shot: str
    kv: KVShareRanges
    kv_rule: str | None
    speed: SpeedSettings
    steps: int
    prompt: str
    subject: str
    phases: dict[str, float]
    phase_memory: dict[str, dict[str, float]]
    peak_gpu_memory_bytes: int | None
    work_dir: Path | None

    def summary(self) -> dict[str, Any]:
        """Plain values for ``Reporter.summary`` (and the JSON output)."""
        return {
            "output": str(self.output),
            "frames": self.frames,
            "fps": float(self.fps),
            "size": f"{self.width}x{self.height}",
            "audio": self.audio,
            "segments": self.segments,
            "segments_computed": len(self.computed),
            "segments_reused": len(self.reused),
            "anchor_kv_rebuilt": self.kv_rebuilt,
            "seconds_per_segment": round(sum(self.segment_seconds.values()) / len(self.segment_seconds), 2)
            if self.segment_seconds
            else None,
            "shot": self.shot,
            "kv_steps": "{}-{}".format(*self.kv.steps),
            "kv_blocks": "{}-{}".format(*self.kv.blocks),
            "kv_steps_rule": self.kv_rule,
            "speed": self.speed.speed,
            "steps": self.steps,
            "guidance": self.speed.guidance,
            "approximations": list(self.speed.approximations) or "none (release-exact)",
            "subject": self.subject,
            "seconds": {name: round(value, 2) for name, value in self.phases.items()},
            "total_seconds": round(sum(self.phases.values()), 2),
            "memory_gb": self.phase_memory,
            "peak_gpu_memory_gb": None if self.peak_gpu_memory_bytes is None else round(self.peak_gpu_memory_bytes / 1024**3, 2),
            "work_dir": None if self.work_dir is None else str(self.work_dir),
        }


def check_output_path(output: Path, inputs: list[Path]) -> Path:
    """The output must be a new .mp4 path that does not overwrite an input."""
    output = Path(output)
    if output.suffix.lower() != ".mp4":
        raise InputError(f"output {output} must end in .mp4 (the video is H.264 in an MP4 container)")
    if output.is_dir():
        raise InputError(f"output {output} is a folder (give a file name such as {output / 'posegen.mp4'})")
    for path in inputs:
        if output.resolve() == path.resolve():
            raise InputError(f"output {output} would overwrite the input {path} (choose another -o name)")
    return output


def pick_shot(options: AnimateOptions, image: np.ndarray, device: torch.device, reporter: Reporter) -> tuple[str, PersonPose | None]:
    """The ``auto`` shot reads the reference person's visible keypoints and height; an explicit shot is kept.

    The person is detected on the reference framed at the model's full 720x1280, whatever the job's size, so a
    preview picks the same preset as the real run. That is also the frame pose alignment detects on, so the
    person is returned too (None with an explicit shot) for ``extract_pose`` to reuse instead of loading the
    detector again.
    """
    if options.shot != "auto":
        return options.shot, None
    from posegen_cli.pose.backends import extract_reference_pose

    framed_reference = frame_to_model(image)
    person = extract_reference_pose(framed_reference, options.pose_backend, device=device, models_dir=options.models_dir)
    if person is None:
        reporter.warn(f"no person found in the reference image; using the {DEFAULT_SHOT} K/V preset (set {option('shot')} to choose)")
        return DEFAULT_SHOT, None
    shot = classify_shot(person.keypoints, person.scores, person.box, framed_reference.shape[0])
    reporter.info(f"reference framing: {shot} (override with {option('shot')})")
    return shot, person


def check_disk_space(work: WorkDir, plan: list[Segment], size: tuple[int, int], output: Path) -> None:
    """Fail before hours of GPU work when the unfinished segments cannot fit in the work folder's disk."""
    finished = work.finished()
    missing = sum(seg.frames for seg in plan if seg.index not in finished)
    needed = missing * size[0] * size[1] * 3
    free = available_bytes(work.path)
    if needed > free:
        raise ResourceError(
            f"the segments need {needed / 1024**3:.1f} GB in {work.path} but only {free / 1024**3:.1f} GB are free "
            f"(free some space, or pass {option('work_dir')} on a larger disk; the video {output.name} itself is small)"
        )


def work_settings(options: AnimateOptions, job: JobSettings, reference: ReferenceImage, model_dirs: list[Path]) -> dict[str, Any]:
    """Every setting that changes a segment's pixels, for the work folder's key (not offloading, crf, audio).

    Model folders count by their resolved path: a Hugging Face snapshot path names the commit.
    """
    return {
        "engine": ENGINE_VERSION,
        **job.key_fields(),
        "kv_steps": job.kv_steps,
        "kv_blocks": job.kv_blocks,
        "shot": options.shot,
        "prompt": options.prompt,
        "subject": options.subject,
        "align": options.align,
        "pose_backend": options.pose_backend,
        "anchor": options.anchor,
        "pad": options.pad,
        "compat_mp4": options.compat_mp4,
        "segment": [options.segment_frames, options.head, options.tail],
        "models": [str(path.resolve()) for path in model_dirs],
        "device": job.device.type,
        "dtype": str(job.dtype),
        "reference": reference.digest,
    }


def _write_video(
    output: Path,
    plan: list[Segment],
    work: WorkDir,
    *,
    length: int,
    info: VideoInfo,
    options: AnimateOptions,
    reporter: Reporter,
) -> bool:
    """Cross-fade the stored segments into ``output`` at the driving fps; returns whether audio was muxed."""
    line = timeline_order(plan)
    clips = ((work.load_segment(seg.index), overlap_before(seg, options.head, options.tail)) for seg in line)
    audio = options.audio and info.has_audio
    if options.audio and not info.has_audio:
        reporter.info(f"{info.path.name} has no audio track; the output is silent")
    with reporter.progress() as progress:
        task = progress.add_task("merging and encoding", total=length, unit="frames")
        with VideoWriter(output, info.fps, crf=options.crf, audio_from=info.path if audio else None) as writer:
            for frame in iter_merged(clips, length):
                writer.write(np.ascontiguousarray(frame))
                progress.advance(task)
    return audio


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """``kill`` (SIGTERM) stops the job as Ctrl-C does, so partial files are removed and the K/V cache is freed.

    Python's default SIGTERM action ends the process without running any cleanup; finished segments survive
    either way. Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def model_shape(models_dir: Path | None) -> tuple[ModelShape, str]:
    """The DiT's shape from the base checkpoint's ``model_config.json`` when it is on disk (read, not loaded), else
    the release's 14B shape; and where it came from."""
    import json

    from posegen_cli.hub import find_local
    from posegen_cli.longvideo.loading import BASE_FOLDER
    from posegen_cli.models.convert import release_config_to_diffusers

    root = find_local("posegen", models_dir)
    config_file = None if root is None else Path(root) / BASE_FOLDER / "model_config.json"
    if config_file is None or not config_file.is_file():
        return WAN_I2V_14B, "Wan2.1-I2V-14B-720P + PoseGen (models not downloaded: the release's shape)"
    config = release_config_to_diffusers(json.loads(config_file.read_text()), config_file)
    return ModelShape.from_config(config), str(config_file)


def plan_animate(driving: Path, *, options: AnimateOptions, reporter: Reporter) -> JobPlan:
    """A dry run: the segment plan, transformer passes, FLOPs, memory and time of the job, loading no model.

    The GPU is ``options.gpu`` (a name of ``planner.GPUS``) or the one present; the attention kernel is what the run
    would take there (``auto`` resolved as on that GPU, assuming no FlashAttention-3 package when it is not this one).
    """
    job = resolve_settings(options)
    driving = require_file(driving, "driving video")
    info = probe_video(driving)
    plan = plan_segments(info.frame_count, options.segment_frames, options.head, options.tail, options.pad, options.anchor)
    shape, shape_source = model_shape(options.models_dir)
    shot = options.shot if options.shot != "auto" else DEFAULT_SHOT
    kv_steps, _ = kv_steps_for(shot, job)
    kv = kv_share_ranges(shot, job.steps, shape.layers, kv_steps, job.kv_blocks)
    attention, quantize = job.speed.attention, job.speed.quantize
    device = job.device
    dtype = torch.bfloat16 if options.gpu is not None and options.dtype == "auto" else job.dtype
    if options.gpu is not None:
        try:
            gpu = find_gpu(options.gpu)
        except ValueError as exc:
            raise InputError(f"{option('gpu')}: {exc}") from None
        kernel = expected_kernel(attention, gpu.capability)
    else:
        gpu = find_gpu(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        kernel = resolve_attention(attention, device, dtype).choice if gpu is not None else expected_kernel(attention, None)
    preset_fp8 = quantize == "fp8" and "quantize" in job.speed.preset_parts
    if preset_fp8 and (gpu is None or gpu.fp8_tflops is None):
        quantize = "none"  # the run would drop the preset's fp8 there too (fit_speed_to_device)
    if quantize == "fp8" and (gpu is None or gpu.fp8_tflops is None):
        raise InputError(
            f"{option('quantize')} fp8 needs an FP8 GPU; {gpu.name if gpu else 'no GPU'} has none (use int8 or none, or {option('gpu')} H100)"
        )
    spec = JobSpec(
        height=job.height, width=job.width, frames=options.segment_frames, steps=job.steps, guidance=job.guidance,
        kv_steps=kv.steps, kv_blocks=kv.blocks, max_map_block=kv.max_map_block, attention=kernel, compiled=options.compile,
        quantize=quantize, offload=options.offload, dtype_bytes=2 if dtype != torch.float32 else 4,
    )  # fmt: skip
    result = plan_job(plan, shape, spec, gpu)
    result.settings.update(driving_frames=info.frame_count, fps=float(info.fps), shot=shot, model=shape_source)
    if options.shot == "auto":
        result.notes.append(f"shot auto: planned with the {DEFAULT_SHOT} preset; the run picks the preset from the reference person")
    if quantize != job.speed.quantize:
        result.notes.append(f"{option('speed')} {job.speed.speed}: planned without its fp8 weights, which need an FP8 GPU")
    if job.speed.cache != "none":
        result.notes.append(f"cache {job.speed.cache}: every step counted in full (the cache skips some, by content)")
    if gpu is None:
        result.notes.append("no GPU named or present: no time estimate (name one: H100, H200, A100-80GB, L40S or 'RTX 4090')")
    return result


def animate(
    reference: Path,
    driving: Path,
    output: Path,
    *,
    options: AnimateOptions,
    reporter: Reporter,
    after_segment: Callable[[Segment], None] | None = None,
) -> AnimateResult:
    """Generate ``output`` from the ``reference`` photo and the ``driving`` video's motion.

    Re-running after a crash, Ctrl-C or ``kill`` with the same inputs and settings continues from the finished
    segments. ``after_segment`` runs after each newly generated segment is stored.
    """
    with terminate_as_interrupt():
        return _animate(reference, driving, output, options=options, reporter=reporter, after_segment=after_segment)


def kv_steps_for(shot: str, job: JobSettings) -> tuple[tuple[int, int] | None, str | None]:
    """The K/V steps a job shares and how they were chosen: explicit ``kv_steps`` as given, the shot preset on the
    release's schedule, or the preset moved onto a distilled schedule by :data:`KV_STEP_RULE` (then also the rule)."""
    if job.kv_steps is not None or job.speed.sigmas is None or shot not in SHOT_PRESETS:
        return job.kv_steps, None
    from posegen_cli.pipelines.scheduling import shifted_sigmas, unshifted_sigmas

    release_levels = shifted_sigmas(unshifted_sigmas(RELEASE_STEPS)).tolist()
    levels = shifted_sigmas(torch.tensor(job.speed.sigmas)).tolist()
    preset = SHOT_PRESETS[shot][0]
    steps = map_kv_steps(preset, release_levels, levels)
    rule = (
        f"release steps {preset[0]}-{preset[1]} of {RELEASE_STEPS} (sigma {release_levels[preset[0]]:.4f}-"
        f"{release_levels[preset[1] - 1]:.4f}) -> steps {steps[0]}-{steps[1]} of {len(levels)}: {KV_STEP_RULE}"
    )
    return steps, rule


def fit_speed_to_device(job: JobSettings, reporter: Reporter) -> JobSettings:
    """``job`` with a preset's attention kernel or quantisation that cannot run on its device (SageAttention on the
    CPU, fp8 without an FP8 GPU) set back to the exact default, with a warning; one given explicitly raises.

    Raises InputError (from :mod:`posegen_cli.models.acceleration`) for an explicit setting that cannot run here.
    """
    speed = job.speed
    checks = {
        "attention": lambda value: resolve_attention(value, job.device, job.dtype),
        "quantize": lambda value: quantization_config(value, job.device),
    }
    for part, check in checks.items():
        try:
            check(getattr(speed, part))
        except InputError as exc:
            if part not in speed.preset_parts:
                raise
            reporter.warn(f"{option(part)} {getattr(speed, part)} of {option('speed')} {speed.speed} cannot run here ({exc}); running without it")
            speed = speed.without(part, str(exc))
    return replace(job, speed=speed)


def _animate(
    reference: Path,
    driving: Path,
    output: Path,
    *,
    options: AnimateOptions,
    reporter: Reporter,
    after_segment: Callable[[Segment], None] | None,
) -> AnimateResult:
    job = resolve_settings(options)
    reference = require_file(reference, "reference image")
    driving = require_file(driving, "driving video")
    output = check_output_path(output, [reference, driving])
    device = job.device
    job = fit_speed_to_device(job, reporter)  # a kernel or quantisation that cannot run fails before any work
    timer = PhaseTimer(device)
    size = (job.height, job.width)

    with timer("inputs"):
        from posegen_cli.hub import model_path

        ref = ReferenceImage.load(reference)  # decoded and hashed once for the whole job
        image = ref.pixels
        warn_if_cropped(reporter, image.shape[1], image.shape[0], f"reference image {reference.name}", size)
        framed = frame_to_model(image, size)
        info = probe_video(driving)
        model_dirs = [model_path(name, options.models_dir) for name in ("wan-i2v-720p", "posegen")]
        plan = plan_segments(info.frame_count, options.segment_frames, options.head, options.tail, options.pad, options.anchor)
        length = output_frames(plan, info.frame_count)
        root = Path(options.work_dir) if options.work_dir is not None else None
        work = WorkDir.for_job([driving], work_settings(options, job, ref, model_dirs), root)
        check_disk_space(work, plan, size, output)
    reporter.info(
        f"{info.frame_count} driving frames at {fps_text(info.fps)} fps -> {len(plan)} segments of {options.segment_frames} "
        f"frames at {job.width}x{job.height}, {job.steps} steps (work folder {work.path})"
    )
    if length < info.frame_count:
        reporter.warn(f"without padding the output covers only the first {length} of {info.frame_count} frames")

    with timer("pose"):
        from posegen_cli.pose.extract import extract_pose
        from posegen_cli.pose.settings import PoseOptions

        shot, reference_pose = pick_shot(options, image, device, reporter)
        pose_options = PoseOptions(backend=options.pose_backend, align=options.align, device=device, models_dir=options.models_dir)
        poses = extract_pose(
            driving, work.stage_dir("pose"), pose_options, align_to=ref, reporter=reporter, info=info, reference_pose=reference_pose
        )
        if poses.frame_count != info.frame_count:
            raise InputError(f"pose extraction of {driving} gave {poses.frame_count} frames, not {info.frame_count} (re-encode the video)")

    with timer("prompt"):
        from posegen_cli.prompting import PromptOptions, run_prompt

        prompt_options = PromptOptions(
            prompt=options.prompt, subject=options.subject, seed=options.seed, device=device, dtype=job.dtype,
            models_dir=options.models_dir,
        )  # fmt: skip
        prompt = run_prompt(ref, work.stage_dir("prompt"), prompt_options, reporter=reporter)

    with timer("load models"):
        from posegen_cli.longvideo.loading import load_pipeline
        from posegen_cli.longvideo.renderer import PipelineRenderer
        from posegen_cli.models.distill import DistillChoice

        speed = job.speed
        pipe = load_pipeline(
            options.models_dir, device=device, dtype=job.dtype, offload=options.offload,
            distill=None if speed.distill is None else DistillChoice(speed.distill, speed.distill_weight),
            attention=speed.attention, compile=options.compile, quantize=speed.quantize, reporter=reporter,
        )  # fmt: skip
        if pipe.attention is not None:
            reporter.info(f"attention: {pipe.attention.describe()}")
        kv_steps, kv_rule = kv_steps_for(shot, job)
        kv = kv_share_ranges(shot, job.steps, pipe.transformer.config.num_layers, kv_steps, job.kv_blocks)
        renderer = PipelineRenderer(
            pipe, prompt=prompt.prompt, subject_positions=prompt.token_positions, reference=framed, kv=kv, job=job,
        )  # fmt: skip
    reporter.info(f"K/V sharing ({shot}): steps {kv.steps[0]}-{kv.steps[1]}, blocks {kv.blocks[0]}-{kv.blocks[1]} (end exclusive)")
    if kv_rule is not None:
        reporter.info(f"K/V steps on the distilled schedule: {kv_rule}")
    for line in speed.approximations:
        reporter.info(f"approximation ({speed.speed}): {line}")

    pose_source, hand_source = FrameSource(poses.pose_video, size), FrameSource(poses.hand_video, size)
    try:
        with timer("segments"):
            stats: SegmentStats = render_segments(
                plan, renderer, (pose_source, hand_source), work, total_frames=info.frame_count, frame_shape=size,
                overlap=(options.head, options.tail), reporter=reporter, compat_mp4=options.compat_mp4,
                after_segment=after_segment,
            )  # fmt: skip
    finally:
        pose_source.close()
        hand_source.close()
        del renderer, pipe
    transitions = sum(1 for seg in plan if seg.kind == TRANSITION)
    if stats.reused:
        reporter.info(f"reused {len(stats.reused)} finished segment(s) from {work.path}")

    with timer("merge + encode"):
        audio = _write_video(output, plan, work, length=length, info=info, options=options, reporter=reporter)

    if options.keep_intermediates:
        kept: Path | None = work.path
    else:
        work.remove()
        kept = None
    reporter.info(f"{len(plan) - transitions} base and {transitions} transition segment(s) -> {output}")
    return AnimateResult(
        output=output, frames=length, fps=info.fps, width=job.width, height=job.height, audio=audio,
        segments=len(plan), computed=stats.computed, reused=stats.reused, kv_rebuilt=stats.rebuilt_anchor,
        segment_seconds=stats.seconds, shot=shot, kv=kv, kv_rule=kv_rule, speed=job.speed, steps=job.steps,
        prompt=prompt.prompt, subject=prompt.subject, phases=timer.seconds, phase_memory=timer.memory,
        peak_gpu_memory_bytes=timer.gpu_peak if device.type == "cuda" else None, work_dir=kept,
    )  # fmt: skip

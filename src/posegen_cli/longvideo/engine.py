"""``posegen animate``: reference photo + driving video in, the whole long video out, in one process.

Phases: pose extraction → caption and subject tokens → shot preset → model load (once; base and transition
variants share it) → segments in order (anchor, bases replaying its K/V, transitions) into a resumable work
folder → cross-fade merge trimmed to the driving length → H.264 at the driving fps with its audio.

Instead of a driving video, the caller may give its own condition videos (``options.pose_video``, optionally
``options.hand_video``): they are used as they are, framed like extracted renders, with no extraction and no
alignment, and the pose video sets the length, fps and audio. ``options.camera`` (experimental) feeds a camera
pattern to the negative guidance branch and turns background K/V sharing off (docs/conditioning.md says why).
"""

from __future__ import annotations

import contextlib
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posegen_cli.errors import InputError, ResourceError, option, require_file
from posegen_cli.longvideo.executors import Executor, ModelSpec, SegmentJob
from posegen_cli.longvideo.executors.local import LocalExecutor
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
from posegen_cli.longvideo.presets import DEFAULT_SHOT, KVShareRanges, classify_shot, kv_share_ranges
from posegen_cli.longvideo.segments import SegmentStats
from posegen_cli.longvideo.sources import CameraFrames, FrameReader
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.models.acceleration import APPROXIMATE_ATTENTION, quantization_config, resolve_attention
from posegen_cli.pose.camera import CameraMotion, zoom_factor
from posegen_cli.pose.types import PersonPose
from posegen_cli.report import Reporter
from posegen_cli.video import VideoInfo, VideoWriter, available_bytes, check_audio_file, probe_video
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
    shot: str | None
    kv: KVShareRanges | None
    """None: no background K/V sharing (``camera`` set)."""
    prompt: str
    subject: str
    phases: dict[str, float]
    phase_memory: dict[str, dict[str, float]]
    peak_gpu_memory_bytes: int | None
    work_dir: Path | None
    conditions: str
    """Where the pose and hand conditions came from, in words."""
    camera: str | None = None
    camera_video: Path | None = None
    workers: dict[str, dict[str, Any]] | None = None
    """Per Ray worker: node, segments made, seconds (None for a single-process run)."""

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
            "conditions": self.conditions,
            "camera": self.camera,
            "camera_video": None if self.camera_video is None else str(self.camera_video),
            "shot": self.shot,
            "kv_steps": "off" if self.kv is None else "{}-{}".format(*self.kv.steps),
            "kv_blocks": "off" if self.kv is None else "{}-{}".format(*self.kv.blocks),
            "subject": self.subject,
            "seconds": {name: round(value, 2) for name, value in self.phases.items()},
            "total_seconds": round(sum(self.phases.values()), 2),
            "memory_gb": self.phase_memory,
            "peak_gpu_memory_gb": None if self.peak_gpu_memory_bytes is None else round(self.peak_gpu_memory_bytes / 1024**3, 2),
            "work_dir": None if self.work_dir is None else str(self.work_dir),
            **({"workers": self.workers} if self.workers is not None else {}),
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


def motion_input(driving: Path | None, pose_video: Path | None) -> Path:
    """The one video that sets the motion, length and fps: the driving video or the caller's own pose video."""
    if driving is not None and pose_video is not None:
        raise InputError(f"give either a driving video ({driving}) or {option('pose_video')} ({pose_video}), not both")
    if driving is None and pose_video is None:
        raise InputError(f"nothing to follow: give a driving video, or your own condition video with {option('pose_video')}")
    return require_file(driving, "driving video") if driving is not None else require_file(pose_video, "pose video")


def describe_video(info: VideoInfo) -> str:
    """``"20 frames of 72x128 at 10 fps"``."""
    return f"{info.frame_count} frames of {info.width}x{info.height} at {fps_text(info.fps)} fps"


def check_hand_video(hand: VideoInfo, pose: VideoInfo) -> None:
    """A hand condition video must match its pose video frame for frame: same length, size and fps."""
    if (hand.frame_count, hand.width, hand.height, hand.fps) != (pose.frame_count, pose.width, pose.height, pose.fps):
        raise InputError(
            f"hand video {hand.path} is {describe_video(hand)} but pose video {pose.path} is {describe_video(pose)} "
            f"(render both from the same clip, or leave {option('hand_video')} out for black hands)"
        )


def camera_video_path(output: Path) -> Path:
    """Where the camera pattern given to the negative branch is written: ``<output stem>.camera.mp4`` beside it."""
    return output.with_name(f"{output.stem}.camera.mp4")


def write_camera_video(path: Path, camera: FrameReader, length: int, fps: Fraction, crf: int) -> Path:
    """The camera pattern of timeline frames 0 … ``length - 1`` at the job's size, as the negative branch saw it."""
    with VideoWriter(path, fps, crf=crf) as writer:
        for position in range(length):
            writer.write(camera.read(np.array([position]))[0])
    return path


ZOOM_WARNING = 4.0
"""A zoom pattern this many times larger or smaller than at the start has strokes of ~2 or ~36 px on the canvas."""


def warn_on_long_zoom(motion: CameraMotion, length: int, reporter: Reporter) -> None:
    """Zooms compound: over a long video the pattern ends up far from anything the branch is meant to see."""
    factor = zoom_factor(motion, length - 1)
    if max(factor, 1 / factor) > ZOOM_WARNING:
        reporter.warn(
            f"{motion.kind} at {motion.speed:g} % per second scales the camera pattern {max(factor, 1 / factor):.1f}x over "
            f"{length} frames; its strokes will be far from the 9 px the pattern starts with (lower {option('camera_speed')})"
        )


def pick_audio(options: AnimateOptions, info: VideoInfo, audio_file: Path | None, reporter: Reporter) -> Path | None:
    """The file whose audio the output gets: ``audio_file``, else the motion video's own track, or None."""
    if not options.audio:
        return None
    if audio_file is not None:
        return audio_file
    if not info.has_audio:
        reporter.info(f"{info.path.name} has no audio track; the output is silent")
        return None
    return info.path


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

    Model folders count by their resolved path: a Hugging Face snapshot path names the commit. Given condition
    videos and the camera add keys only when used, so the work folders of jobs without them keep their names.
    """
    optional: dict[str, Any] = {}
    if options.pose_video is not None:
        optional["conditions"] = "given"
    if options.camera is not None:
        optional["camera"] = [options.camera, options.camera_speed]
    return {
        **optional,
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
        # exact kernels and compilation change only rounding; quantised weights and approximate attention change more
        "quantize": options.quantize,
        "attention": "approximate" if options.attention in APPROXIMATE_ATTENTION else "exact",
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
    audio_from: Path | None,
) -> bool:
    """Cross-fade the stored segments into ``output`` at the driving fps with ``audio_from``'s sound; returns whether audio was muxed."""
    line = timeline_order(plan)
    clips = ((work.load_segment(seg.index), overlap_before(seg, options.head, options.tail)) for seg in line)
    with reporter.progress() as progress:
        task = progress.add_task("merging and encoding", total=length, unit="frames")
        with VideoWriter(output, info.fps, crf=options.crf, audio_from=audio_from) as writer:
            for frame in iter_merged(clips, length):
                writer.write(np.ascontiguousarray(frame))
                progress.advance(task)
    return audio_from is not None


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


def make_executor(options: AnimateOptions, job: JobSettings) -> Executor:
    """This process for a plain run; Ray workers with ``options.gpus`` or ``options.ray_address`` (Ray is imported only then)."""
    models = ModelSpec(options.models_dir, job.device.type, job.dtype, options.offload, options.attention, options.compile, options.quantize)
    if options.gpus is None and options.ray_address is None:
        return LocalExecutor(models)
    from posegen_cli.longvideo.executors.ray import RayExecutor

    return RayExecutor(models, gpus=options.gpus, address=options.ray_address)


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


def plan_animate(driving: Path | None, *, options: AnimateOptions, reporter: Reporter) -> JobPlan:
    """A dry run: the segment plan, transformer passes, FLOPs, memory and time of the job, loading no model.

    The GPU is ``options.gpu`` (a name of ``planner.GPUS``) or the one present; the attention kernel is what the run
    would take there (``auto`` resolved as on that GPU, assuming no FlashAttention-3 package when it is not this one).
    """
    job = resolve_settings(options)
    info = probe_video(motion_input(driving, options.pose_video))
    plan = plan_segments(info.frame_count, options.segment_frames, options.head, options.tail, options.pad, options.anchor)
    shape, shape_source = model_shape(options.models_dir)
    shot = options.shot if options.shot != "auto" else DEFAULT_SHOT
    kv = kv_share_ranges(shot, job.steps, shape.layers, job.kv_steps, job.kv_blocks)
    device = job.device
    dtype = torch.bfloat16 if options.gpu is not None and options.dtype == "auto" else job.dtype
    if options.gpu is not None:
        try:
            gpu = find_gpu(options.gpu)
        except ValueError as exc:
            raise InputError(f"{option('gpu')}: {exc}") from None
        kernel = expected_kernel(options.attention, gpu.capability)
    else:
        gpu = find_gpu(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        kernel = resolve_attention(options.attention, device, dtype).choice if gpu is not None else expected_kernel(options.attention, None)
    if options.quantize == "fp8" and (gpu is None or gpu.fp8_tflops is None):
        raise InputError(
            f"{option('quantize')} fp8 needs an FP8 GPU; {gpu.name if gpu else 'no GPU'} has none (use int8 or none, or {option('gpu')} H100)"
        )
    spec = JobSpec(
        height=job.height, width=job.width, frames=options.segment_frames, steps=job.steps, guidance=job.guidance,
        kv_steps=kv.steps, kv_blocks=kv.blocks, max_map_block=kv.max_map_block, attention=kernel, compiled=options.compile,
        quantize=options.quantize, offload=options.offload, dtype_bytes=2 if dtype != torch.float32 else 4,
    )  # fmt: skip
    result = plan_job(plan, shape, spec, gpu)
    result.settings.update(driving_frames=info.frame_count, fps=float(info.fps), shot=shot, model=shape_source)
    if options.shot == "auto":
        result.notes.append(f"shot auto: planned with the {DEFAULT_SHOT} preset; the run picks the preset from the reference person")
    if gpu is None:
        result.notes.append("no GPU named or present: no time estimate (name one: H100, H200, A100-80GB, L40S or 'RTX 4090')")
    return result


def animate(
    reference: Path,
    driving: Path | None,
    output: Path,
    *,
    options: AnimateOptions,
    reporter: Reporter,
    after_segment: Callable[[Segment], None] | None = None,
) -> AnimateResult:
    """Generate ``output`` from the ``reference`` photo and the ``driving`` video's motion.

    ``driving`` is None when ``options.pose_video`` gives the conditions instead (exactly one of the two).
    Re-running after a crash, Ctrl-C or ``kill`` with the same inputs and settings continues from the finished
    segments. ``after_segment`` runs after each newly generated segment is stored.
    """
    with terminate_as_interrupt():
        return _animate(reference, driving, output, options=options, reporter=reporter, after_segment=after_segment)


def _animate(
    reference: Path,
    driving: Path | None,
    output: Path,
    *,
    options: AnimateOptions,
    reporter: Reporter,
    after_segment: Callable[[Segment], None] | None,
) -> AnimateResult:
    job = resolve_settings(options)
    reference = require_file(reference, "reference image")
    motion = motion_input(driving, options.pose_video)
    hand_video = None if options.hand_video is None else require_file(options.hand_video, "hand video")
    audio_file = None if options.audio_file is None else check_audio_file(options.audio_file)
    videos = [motion, *([hand_video] if hand_video is not None else [])]
    output = check_output_path(output, [reference, *videos, *([audio_file] if audio_file is not None else [])])
    camera_video = None if options.camera is None else check_output_path(camera_video_path(output), [reference, *videos])
    device = job.device
    resolve_attention(options.attention, device, job.dtype)  # a kernel or quantisation that cannot run fails before any work
    quantization_config(options.quantize, device)
    timer = PhaseTimer(device)
    size = (job.height, job.width)
    executor = make_executor(options, job)  # before any work: a missing Ray fails here

    with timer("inputs"):
        from posegen_cli.hub import model_path

        ref = ReferenceImage.load(reference)  # decoded and hashed once for the whole job
        image = ref.pixels
        warn_if_cropped(reporter, image.shape[1], image.shape[0], f"reference image {reference.name}", size)
        framed = frame_to_model(image, size)
        info = probe_video(motion)
        if options.pose_video is not None:
            warn_if_cropped(reporter, info.width, info.height, f"pose video {motion.name}", size)
        if hand_video is not None:
            check_hand_video(probe_video(hand_video), info)
        model_dirs = [model_path(name, options.models_dir) for name in ("wan-i2v-720p", "posegen")]
        plan = plan_segments(info.frame_count, options.segment_frames, options.head, options.tail, options.pad, options.anchor)
        length = output_frames(plan, info.frame_count)
        root = Path(options.work_dir) if options.work_dir is not None else None
        work = WorkDir.for_job(videos, work_settings(options, job, ref, model_dirs), root)
        check_disk_space(work, plan, size, output)
    reporter.info(
        f"{info.frame_count} {'pose' if options.pose_video else 'driving'} frames at {fps_text(info.fps)} fps -> {len(plan)} "
        f"segments of {options.segment_frames} frames at {job.width}x{job.height}, {job.steps} steps (work folder {work.path})"
    )
    if length < info.frame_count:
        reporter.warn(f"without padding the output covers only the first {length} of {info.frame_count} frames")

    share_kv = options.camera is None
    with timer("pose"):
        if options.pose_video is None:
            from posegen_cli.pose.extract import extract_pose
            from posegen_cli.pose.settings import PoseOptions

            shot, reference_pose = pick_shot(options, image, device, reporter) if share_kv else (None, None)
            pose_options = PoseOptions(backend=options.pose_backend, align=options.align, device=device, models_dir=options.models_dir)
            poses = extract_pose(
                motion, work.stage_dir("pose"), pose_options, align_to=ref, reporter=reporter, info=info, reference_pose=reference_pose
            )
            if poses.frame_count != info.frame_count:
                raise InputError(f"pose extraction of {motion} gave {poses.frame_count} frames, not {info.frame_count} (re-encode the video)")
            pose_video, hand_condition = poses.pose_video, poses.hand_video
            conditions = f"extracted from {motion.name} ({options.pose_backend} backend, alignment {options.align})"
        else:
            shot = pick_shot(options, image, device, reporter)[0] if share_kv else None
            pose_video, hand_condition = motion, hand_video
            hands = hand_video.name if hand_video is not None else "black hands"
            conditions = f"{motion.name} + {hands}, used as given: no extraction, no alignment"
            reporter.info(f"conditions: {conditions}")
    camera_motion = None if options.camera is None else CameraMotion(options.camera, options.camera_speed, info.fps)
    camera = None if camera_motion is None else CameraFrames(camera_motion, size)
    if camera is not None:
        warn_on_long_zoom(camera.motion, length, reporter)

    with timer("prompt"):
        from posegen_cli.prompting import PromptOptions, run_prompt

        prompt_options = PromptOptions(
            prompt=options.prompt, subject=options.subject, seed=options.seed, device=device, dtype=job.dtype,
            models_dir=options.models_dir,
        )  # fmt: skip
        prompt = run_prompt(ref, work.stage_dir("prompt"), prompt_options, reporter=reporter)

    try:
        with timer("load models"):
            from posegen_cli.longvideo.renderer import JobEmbeddings, RenderSpec

            encoders = executor.encoder_pipeline(reporter)
            spec = RenderSpec(
                JobEmbeddings.encode(encoders, prompt.prompt, framed, job.height, job.width).to("cpu"),
                subject_positions=tuple(prompt.token_positions), shot=shot, kv_steps=job.kv_steps, kv_blocks=job.kv_blocks,
                num_steps=job.steps, guidance=job.guidance, seed=job.seed,
            )  # fmt: skip
            del encoders
            segment_job = SegmentJob(
                plan=plan, work_path=work.path, work_settings=work.settings, pose_video=pose_video, hand_video=hand_condition,
                frame_shape=size, total_frames=info.frame_count, head=options.head, tail=options.tail, compat_mp4=options.compat_mp4,
                camera=camera_motion,
            )  # fmt: skip
            kv = executor.start(spec, segment_job, reporter)
        if executor.attention is not None:
            reporter.info(f"attention: {executor.attention.describe()}")
        if kv is None:
            reporter.info(f"camera {options.camera} (experimental) in the negative guidance branch; background K/V sharing is off")
        else:
            reporter.info(f"K/V sharing ({shot}): steps {kv.steps[0]}-{kv.steps[1]}, blocks {kv.blocks[0]}-{kv.blocks[1]} (end exclusive)")
        with timer("segments"):
            stats: SegmentStats = executor.run(reporter, after_segment)
        workers = executor.worker_summary()
    finally:
        executor.close()
    transitions = sum(1 for seg in plan if seg.kind == TRANSITION)
    if stats.reused:
        reporter.info(f"reused {len(stats.reused)} finished segment(s) from {work.path}")

    with timer("merge + encode"):
        audio_from = pick_audio(options, info, audio_file, reporter)
        audio = _write_video(output, plan, work, length=length, info=info, options=options, reporter=reporter, audio_from=audio_from)
        if camera is not None and camera_video is not None:
            write_camera_video(camera_video, camera, length, info.fps, options.crf)
            reporter.info(f"camera pattern given to the negative branch -> {camera_video}")

    if options.keep_intermediates:
        kept: Path | None = work.path
    else:
        work.remove()
        kept = None
    reporter.info(f"{len(plan) - transitions} base and {transitions} transition segment(s) -> {output}")
    return AnimateResult(
        output=output, frames=length, fps=info.fps, width=job.width, height=job.height, audio=audio,
        segments=len(plan), computed=stats.computed, reused=stats.reused, kv_rebuilt=stats.rebuilt_anchor,
        segment_seconds=stats.seconds, shot=shot, kv=kv,
        prompt=prompt.prompt, subject=prompt.subject, phases=timer.seconds, phase_memory=timer.memory,
        peak_gpu_memory_bytes=timer.gpu_peak if device.type == "cuda" else None, work_dir=kept,
        conditions=conditions, camera=None if options.camera is None else f"{options.camera} at {options.camera_speed:g}",
        camera_video=camera_video, workers=workers,
    )  # fmt: skip

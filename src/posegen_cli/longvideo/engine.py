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
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posegen_cli.cache import cache_root
from posegen_cli.device import available_host_bytes, free_device_bytes
from posegen_cli.errors import InputError, MissingModelError, ResourceError, option
from posegen_cli.fsutil import copy_file
from posegen_cli.longvideo.executors import Executor, ModelSpec, SegmentJob
from posegen_cli.longvideo.executors.local import LocalExecutor
from posegen_cli.longvideo.memory import (
    WAN_I2V_14B,
    JobShape,
    KVFitError,
    KVPlan,
    MemoryBudget,
    ModelShape,
    format_bytes,
    plan_kv,
    resident_bytes,
)
from posegen_cli.longvideo.merge import iter_merged
from posegen_cli.longvideo.options import AnimateOptions, JobSettings, fps_text, resolve_settings
from posegen_cli.longvideo.plan import (
    BASE,
    TRANSITION,
    Segment,
    output_frames,
    overlap_before,
    plan_segments,
    timeline_order,
)
from posegen_cli.longvideo.planner import JobPlan, JobSpec, expected_kernel, find_gpu, plan_job
from posegen_cli.longvideo.presets import (
    DEFAULT_SHOT,
    KV_STEP_RULE,
    SHOT_PRESETS,
    KVShareRanges,
    classify_shot,
    kv_share_ranges,
    map_kv_steps,
)
from posegen_cli.longvideo.segments import SegmentStats
from posegen_cli.longvideo.sources import CameraFrames, FrameReader
from posegen_cli.longvideo.speed import RELEASE_STEPS, SpeedSettings
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.models.acceleration import quantization_config, resolve_attention
from posegen_cli.pose.backends import resolve_backend, resolve_hand_normals
from posegen_cli.pose.camera import CameraMotion, zoom_factor
from posegen_cli.pose.keypoints import parse_person
from posegen_cli.pose.reference import PERSON, UNCHECKED, ReferenceFraming
from posegen_cli.pose.types import PersonPose
from posegen_cli.preflight import VIDEO_MODELS, animate_models, check_animate_files, check_output_video, check_video, ensure_models
from posegen_cli.report import Reporter, plural
from posegen_cli.video import VideoInfo, VideoWriter, available_bytes, check_audio_file, parse_color, probe_video
from posegen_cli.video.framing import MODEL_SIZE, warn_if_cropped
from posegen_cli.video.image import ReferenceImage

ENGINE_VERSION = 3
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
    kv_plan: KVPlan | None
    kv_rule: str | None
    """How the K/V steps were moved onto a distilled schedule (None: the preset's or the given steps as they are)."""
    speed: SpeedSettings
    steps: int
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
    alignment_png: Path | None = None
    pose_video: Path | None = None
    hand_video: Path | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    """How the inputs were read: reference framing and background, people seen, alignment anchors."""
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
            "kv_placement": None if self.kv_plan is None else self.kv_plan.describe(),
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
            "alignment_png": None if self.alignment_png is None else str(self.alignment_png),
            "pose_video": None if self.pose_video is None else str(self.pose_video),
            "hand_video": None if self.hand_video is None else str(self.hand_video),
            **self.inputs,
            **({"workers": self.workers} if self.workers is not None else {}),
        }


def motion_input(driving: Path | None, pose_video: Path | None) -> Path:
    """The one video that sets the motion, length and fps: the driving video or the caller's own pose video."""
    if driving is not None and pose_video is not None:
        raise InputError(f"give either a driving video ({driving}) or {option('pose_video')} ({pose_video}), not both")
    if driving is None and pose_video is None:
        raise InputError(f"nothing to follow: give a driving video, or your own condition video with {option('pose_video')}")
    return check_video(driving, "driving video") if driving is not None else check_video(pose_video, "pose video")


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


def pick_audio(options: AnimateOptions, info: VideoInfo, audio_file: Path | None, reporter: Reporter) -> tuple[Path, float] | None:
    """The file whose audio the output gets and the second of that file the output's first frame plays with.

    ``audio_file`` is a soundtrack and plays from its own start (0 s: none of its picture, if it has one, is in the
    output). Else the motion video's own track (the driving video or the ``pose_video``, ``info``) plays from
    ``info.start_time``, the second its first frame shows, which is the output's first frame. None: silent output.
    """
    if not options.audio:
        return None
    if audio_file is not None:
        return audio_file, 0.0
    if not info.has_audio:
        reporter.info(f"{info.path.name} has no audio track; the output is silent")
        return None
    return info.path, info.start_time


def pick_shot(options: AnimateOptions, person: PersonPose | None, reporter: Reporter) -> str:
    """The ``auto`` shot reads the reference person's visible keypoints and height; an explicit shot is kept.

    ``person`` is the reference person on the reference framed at the model's full 720x1280 (whatever the job's
    size, so a preview picks the same preset as the real run), as ``reference_framing`` found it.
    """
    if options.shot != "auto":
        return options.shot
    if person is None:
        reporter.warn(f"no person found in the reference image; using the {DEFAULT_SHOT} K/V preset (set {option('shot')} to choose)")
        return DEFAULT_SHOT
    shot = classify_shot(person.keypoints, person.scores, person.box, MODEL_SIZE[0])
    reporter.info(f"reference framing: {shot} (override with {option('shot')})")
    return shot


def prepare_reference(
    reference: ReferenceImage, options: AnimateOptions, size: tuple[int, int], reporter: Reporter
) -> tuple[ReferenceFraming, dict[str, Any]]:
    """The 9:16 framing of the reference photo (already composited onto its background when transparent) around its
    person, found with one detector for the whole job, and what the summary says about both."""
    from posegen_cli.pose.backends import reference_framing

    name = reference.path.name
    notes: dict[str, Any] = {}
    if reference.transparent:
        reporter.info(f"{name} is transparent: composited onto {options.background} (set {option('background')} to change)")
        notes["reference_background"] = options.background
    height, width = reference.pixels.shape[:2]
    framing = reference_framing(
        reference.pixels, options.pose_backend, name=str(reference.path), person_check=options.person_check,
        fill=reference.background, device=options.device, models_dir=options.models_dir,
    )  # fmt: skip
    if framing.rule == UNCHECKED:
        reporter.warn(f"no person found in {name}; going on because of {option('no_person_check')} (centre crop, no alignment)")
    elif framing.rule == PERSON:
        reporter.info(framing.describe(width, height, name))
    else:
        warn_if_cropped(reporter, width, height, f"reference image {name}", size)
    notes["reference_framing"] = {"rule": framing.rule, "box": list(framing.box)}
    return framing, notes


def check_disk_space(work: WorkDir, plan: list[Segment], size: tuple[int, int], output: Path) -> None:
    """Fail before hours of GPU work when the unfinished segments cannot fit in the work folder's disk."""
    needed = segment_frame_bytes(work, plan, size)
    free = available_bytes(work.path)
    if needed > free:
        raise ResourceError(
            f"the segments need {needed / 1024**3:.1f} GB in {work.path} but only {free / 1024**3:.1f} GB are free "
            f"(free some space, or pass {option('work_dir')} on a larger disk; the video {output.name} itself is small)"
        )


def segment_frame_bytes(work: WorkDir, plan: list[Segment], size: tuple[int, int]) -> int:
    """Bytes the unfinished segments' frames will take in the work folder (uint8 RGB)."""
    finished = work.finished()
    return sum(seg.frames for seg in plan if seg.index not in finished) * size[0] * size[1] * 3


def read_model_shape(posegen_dir: Path) -> ModelShape:
    """The DiT's shape from the base checkpoint's ``model_config.json``, without reading any weights."""
    import json

    from posegen_cli.longvideo.loading import BASE_FOLDER
    from posegen_cli.models.convert import CONFIG_NAME, release_config_to_diffusers

    path = posegen_dir / BASE_FOLDER / CONFIG_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingModelError(f"{path} is missing (re-run `posegen download posegen`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); re-download it with `posegen download posegen`") from exc
    return ModelShape.from_config(release_config_to_diffusers(raw, path))


def measure_budget(device: torch.device, resident: int, disk_folder: Path, disk_reserved: int) -> MemoryBudget:
    """Free device, host and disk bytes now; on a CPU run the device is host memory and there is no separate host tier."""
    disk = max(0, available_bytes(disk_folder) - disk_reserved)
    if device.type == "cuda":
        return MemoryBudget(free_device_bytes(device), resident, available_host_bytes(), disk)
    return MemoryBudget(available_host_bytes(), resident, 0, disk)


def plan_job_kv(model: ModelShape, job: JobShape, kv: KVShareRanges, budget: MemoryBudget, requested: str) -> KVPlan:
    """Where this job's anchor K/V go; a ResourceError naming the options that fit when nothing does."""
    steps, blocks = kv.steps[1] - kv.steps[0], kv.blocks[1] - kv.blocks[0]
    try:
        return plan_kv(model, job, steps, blocks, budget, requested)
    except KVFitError as exc:
        raise ResourceError(exc.describe(kv.steps, kv.blocks)) from None


def check_cache_placement(cache: str, kv_plan: KVPlan) -> None:
    """A feature cache cannot run beside the ``recompute`` K/V placement (``options.check_cache_combination``); when
    ``auto`` picked it because nothing else fits, say so and what would fit. Raises ResourceError."""
    if cache != "none" and kv_plan.placement == "recompute":
        raise ResourceError(
            f"the anchor's K/V fit here only when recomputed ({option('kv_placement')} auto chose recompute), which {option('cache')} "
            f"{cache} cannot run beside (use {option('cache')} none, or free host memory or disk for {option('kv_placement')} host/disk)"
        )


def distill_model(speed: SpeedSettings) -> str | None:
    """The registry model of the job's distillation LoRA (None: no distillation)."""
    from posegen_cli.models.distill import get_distill_preset

    return None if speed.distill is None else get_distill_preset(speed.distill).model


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
        "background": list(reference.background),
        "person": options.person,
        "anchor": options.anchor,
        "pad": options.pad,
        "compat_mp4": options.compat_mp4,
        "vae_tiling": options.vae_tiling,
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
    audio: tuple[Path, float] | None,
) -> bool:
    """Cross-fade the stored segments into ``output`` at the driving fps with ``audio``'s sound (a file and the second of
    it the first frame plays with, as ``pick_audio`` gives); returns whether audio was muxed."""
    line = timeline_order(plan)
    clips = ((work.load_segment(seg.index), overlap_before(seg, options.head, options.tail)) for seg in line)
    with reporter.progress() as progress:
        task = progress.add_task("merging and encoding", total=length, unit="frames")
        audio_from, audio_start = audio if audio is not None else (None, 0.0)
        with VideoWriter(output, info.fps, crf=options.crf, audio_from=audio_from, audio_start=audio_start) as writer:
            for frame in iter_merged(clips, length):
                writer.write(np.ascontiguousarray(frame))
                progress.advance(task)
    return audio is not None


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
    from posegen_cli.models.distill import DistillChoice

    speed = job.speed
    models = ModelSpec(
        options.models_dir, job.device.type, job.dtype, options.offload, speed.attention, options.compile, speed.quantize,
        options.vae_tiling, None if speed.distill is None else DistillChoice(speed.distill, speed.distill_weight),
    )  # fmt: skip
    if options.gpus is None and options.ray_address is None:
        return LocalExecutor(models)
    from posegen_cli.longvideo.executors.ray import RayExecutor

    return RayExecutor(models, gpus=options.gpus, address=options.ray_address)


def model_shape(models_dir: Path | None) -> tuple[ModelShape, str]:
    """The DiT's shape (:func:`read_model_shape`) when the posegen checkpoints are on disk, else the release's 14B
    shape; and where it came from."""
    from posegen_cli.hub import find_local
    from posegen_cli.longvideo.loading import BASE_FOLDER
    from posegen_cli.models.convert import CONFIG_NAME

    root = find_local("posegen", models_dir)
    if root is None or not (Path(root) / BASE_FOLDER / CONFIG_NAME).is_file():
        return WAN_I2V_14B, "Wan2.1-I2V-14B-720P + PoseGen (models not downloaded: the release's shape)"
    return read_model_shape(Path(root)), str(Path(root) / BASE_FOLDER / CONFIG_NAME)


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
    kv_steps, kv_rule = kv_steps_for(shot, job)
    kv = kv_share_ranges(shot, job.steps, shape.num_layers, kv_steps, job.kv_blocks)
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
    work_root = Path(options.work_dir) if options.work_dir is not None else cache_root()
    spec = JobSpec(
        height=job.height, width=job.width, frames=options.segment_frames, steps=job.steps, guidance=job.guidance,
        kv_steps=kv.steps, kv_blocks=kv.blocks, max_map_block=kv.max_map_block, attention=kernel, compiled=options.compile,
        quantize=quantize, offload=options.offload, dtype_bytes=2 if dtype != torch.float32 else 4,
        kv_placement=options.kv_placement, host_free=available_host_bytes(), disk_free=available_bytes(work_root),
    )  # fmt: skip
    result = plan_job(plan, shape, spec, gpu)
    result.settings.update(driving_frames=info.frame_count, fps=float(info.fps), shot=shot, model=shape_source)
    speed = job.speed
    result.settings.update(
        speed=speed.speed, distill=speed.distill, cache=speed.cache, cache_threshold=speed.cache_threshold, kv_steps_rule=kv_rule,
        approximations=list(speed.approximations) or "none (release-exact)",
    )  # fmt: skip
    result.notes.append(
        f"K/V placement sized with {format_bytes(spec.host_free or 0)} of host memory free on this machine and "
        f"{format_bytes(spec.disk_free or 0)} of disk under {work_root}"
    )
    if options.shot == "auto":
        others = []
        for other in SHOT_PRESETS:
            ranges = kv_share_ranges(other, job.steps, shape.num_layers, kv_steps_for(other, job)[0], job.kv_blocks)
            other_kv = plan_job(plan, shape, replace(spec, kv_steps=ranges.steps, kv_blocks=ranges.blocks), gpu).kv
            others.append(f"{other}: {other_kv.get('describe', other_kv['placement'])}")
        result.kv["by_shot"] = others
        result.notes.append(
            f"shot auto: planned with the {DEFAULT_SHOT} preset; the run picks the preset from the reference person "
            f"(K/V by preset: {'; '.join(others)})"
        )
    if quantize != job.speed.quantize:
        result.notes.append(f"{option('speed')} {job.speed.speed}: planned without its fp8 weights, which need an FP8 GPU")
    if job.speed.cache != "none":
        result.notes.append(f"cache {job.speed.cache}: every step counted in full (the cache skips some, by content)")
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
    driving: Path | None,
    output: Path,
    *,
    options: AnimateOptions,
    reporter: Reporter,
    after_segment: Callable[[Segment], None] | None,
) -> AnimateResult:
    job = resolve_settings(options)
    parse_person(options.person)
    background = parse_color(options.background)
    root = Path(options.work_dir) if options.work_dir is not None else None
    motion = motion_input(driving, options.pose_video)
    reference, motion, output = check_animate_files(
        reference, motion, output, root if root is not None else cache_root(), "driving video" if driving is not None else "pose video"
    )
    hand_video = None if options.hand_video is None else check_video(options.hand_video, "hand video")
    audio_file = None if options.audio_file is None else check_audio_file(options.audio_file)
    videos = [motion, *([hand_video] if hand_video is not None else [])]
    output = check_output_video(output, [reference, *videos, *([audio_file] if audio_file is not None else [])])
    camera_video = None if options.camera is None else check_output_video(camera_video_path(output), [reference, *videos])
    device = job.device
    job = fit_speed_to_device(job, reporter)  # a kernel or quantisation that cannot run fails before any work
    timer = PhaseTimer(device)
    size = (job.height, job.width)
    executor = make_executor(options, job)  # before any work: a missing Ray fails here

    with timer("inputs"):
        from posegen_cli.hub import model_path

        ref = ReferenceImage.load(reference, background=background)  # decoded and hashed once for the whole job
        info = probe_video(motion)
        if options.pose_video is not None:
            warn_if_cropped(reporter, info.width, info.height, f"pose video {motion.name}", size)
        if hand_video is not None:
            check_hand_video(probe_video(hand_video), info)
        # every model the job loads, checked (or fetched) once the inputs are known good and before any work
        backend, _ = resolve_backend(options.pose_backend, device)
        needed = animate_models(
            backend, resolve_hand_normals("auto", backend), captioned=options.prompt is None, distill_model=distill_model(job.speed)
        )
        ensure_models(needed, options.models_dir, reporter.info)
        model_dirs = [model_path(name, options.models_dir) for name in VIDEO_MODELS]  # [1] is the PoseGen release
        if (lora := distill_model(job.speed)) is not None:
            model_dirs.append(model_path(lora, options.models_dir))
        framing, reference_notes = prepare_reference(ref, options, size, reporter)  # runs the detector: models are present
        framed = framing.frame(ref.pixels, size)
        plan = plan_segments(info.frame_count, options.segment_frames, options.head, options.tail, options.pad, options.anchor)
        length = output_frames(plan, info.frame_count)
        work = WorkDir.for_job(videos, work_settings(options, job, ref, model_dirs), root)
        check_disk_space(work, plan, size, output)
    if (note := info.timing_note()) is not None:
        reporter.info(note)
    reporter.info(
        f"{info.frame_count} {'pose' if options.pose_video else 'driving'} frames at {fps_text(info.fps)} fps -> {plural(len(plan), 'segment')} "
        f"of {options.segment_frames} frames at {job.width}x{job.height}, {job.steps} steps (work folder {work.path})"
    )
    if length < info.frame_count:
        reporter.warn(f"without padding the output covers only the first {length} of {info.frame_count} frames")

    shot = pick_shot(options, framing.person, reporter) if options.camera is None else None  # the camera turns K/V sharing off
    with timer("pose"):
        kv, kv_plan, kv_rule = None, None, None
        if shot is not None:  # planned before any extraction: a K/V cache that cannot fit refuses the job here
            model_shape = read_model_shape(model_dirs[1])
            kv_steps, kv_rule = kv_steps_for(shot, job)  # a distilled schedule shares fewer steps
            kv = kv_share_ranges(shot, job.steps, model_shape.num_layers, kv_steps, job.kv_blocks)
            if any(seg.kind == BASE for seg in plan):
                job_shape = JobShape(job.height, job.width, options.segment_frames, torch.finfo(job.dtype).bits // 8, job.guidance != 1.0)
                resident = resident_bytes(model_shape, job_shape, options.offload, options.quantize)
                budget = measure_budget(device, resident, work.path, segment_frame_bytes(work, plan, size))
                kv_plan = plan_job_kv(model_shape, job_shape, kv, budget, options.kv_placement)
                check_cache_placement(job.speed.cache, kv_plan)
                reporter.info(f"K/V placement {kv_plan.describe()}")
        if options.pose_video is None:
            from posegen_cli.pose.extract import extract_pose
            from posegen_cli.pose.settings import PoseOptions

            pose_options = PoseOptions(
                backend=options.pose_backend, align=options.align, device=device, models_dir=options.models_dir,
                person=options.person, background=ref.background, person_check=options.person_check,
            )  # fmt: skip
            poses = extract_pose(motion, work.stage_dir("pose"), pose_options, align_to=ref, reporter=reporter, info=info, framing=framing)
            if poses.frame_count != info.frame_count:
                raise InputError(
                    f"pose extraction of {motion} gave {poses.frame_count} frames, not {info.frame_count} (re-encode the video)"
                )
            pose_video, hand_condition = poses.pose_video, poses.hand_video
            has_alignment = poses.alignment_png is not None and poses.alignment_png.is_file()
            if has_alignment:
                reporter.info(f"pose alignment preview: {poses.alignment_png} (the driving skeleton drawn on the reference)")
            conditions = f"extracted from {motion.name} ({options.pose_backend} backend, alignment {options.align})"
            pose_notes = poses.input_notes()
        else:
            poses, has_alignment = None, False
            pose_video, hand_condition = motion, hand_video
            hands = hand_video.name if hand_video is not None else "black hands"
            conditions = f"{motion.name} + {hands}, used as given: no extraction, no alignment"
            pose_notes = {}
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
                subject_positions=tuple(prompt.token_positions), kv=kv, kv_plan=kv_plan, job=job,
            )  # fmt: skip
            del encoders
            executor.release_encoders()
            segment_job = SegmentJob(
                plan=plan, work_path=work.path, work_settings=work.settings, pose_video=pose_video, hand_video=hand_condition,
                frame_shape=size, total_frames=info.frame_count, head=options.head, tail=options.tail, compat_mp4=options.compat_mp4,
                camera=camera_motion,
            )  # fmt: skip
            executor.start(spec, segment_job, reporter)
        if executor.attention is not None:
            reporter.info(f"attention: {executor.attention.describe()}")
        if kv is None:
            reporter.info(f"camera {options.camera} (experimental) in the negative guidance branch; background K/V sharing is off")
        else:
            reporter.info(f"K/V sharing ({shot}): steps {kv.steps[0]}-{kv.steps[1]}, blocks {kv.blocks[0]}-{kv.blocks[1]} (end exclusive)")
        if kv_rule is not None:
            reporter.info(f"K/V steps on the distilled schedule: {kv_rule}")
        for line in job.speed.approximations:
            reporter.info(f"approximation ({job.speed.speed}): {line}")
        with timer("segments"):
            stats: SegmentStats = executor.run(reporter, after_segment)
        workers = executor.worker_summary()
    finally:
        executor.close()
    transitions = sum(1 for seg in plan if seg.kind == TRANSITION)
    if stats.reused:
        reporter.info(f"reused {plural(len(stats.reused), 'finished segment')} from {work.path}")

    with timer("merge + encode"):
        audio = _write_video(
            output, plan, work, length=length, info=info, options=options, reporter=reporter,
            audio=pick_audio(options, info, audio_file, reporter),
        )  # fmt: skip
        if camera is not None and camera_video is not None:
            write_camera_video(camera_video, camera, length, info.fps, options.crf)
            reporter.info(f"camera pattern given to the negative branch -> {camera_video}")

    # beside the output once it is complete: the work folder, where it was made, goes with the job
    alignment_png = (
        copy_file(poses.alignment_png, output.with_name(f"{output.stem}_alignment.png")) if poses is not None and has_alignment else None
    )
    if options.keep_intermediates:
        kept: Path | None = work.path
    else:
        work.remove()
        kept = None
    reporter.info(f"{plural(len(plan) - transitions, 'base segment')} and {plural(transitions, 'transition segment')} -> {output}")
    return AnimateResult(
        output=output, frames=length, fps=info.fps, width=job.width, height=job.height, audio=audio,
        segments=len(plan), computed=stats.computed, reused=stats.reused, kv_rebuilt=stats.rebuilt_anchor,
        segment_seconds=stats.seconds, shot=shot, kv=kv, kv_plan=kv_plan, kv_rule=kv_rule, speed=job.speed, steps=job.steps,
        prompt=prompt.prompt, subject=prompt.subject, phases=timer.seconds, phase_memory=timer.memory,
        peak_gpu_memory_bytes=timer.gpu_peak if device.type == "cuda" else None, work_dir=kept, alignment_png=alignment_png,
        pose_video=poses.pose_video if kept and poses is not None else None,
        hand_video=poses.hand_video if kept and poses is not None else None,
        conditions=conditions, camera=None if options.camera is None else f"{options.camera} at {options.camera_speed:g}",
        camera_video=camera_video, inputs={**reference_notes, **pose_notes}, workers=workers,
    )  # fmt: skip

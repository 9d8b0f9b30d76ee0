"""`posegen extract-pose`: a driving video in, the two conditioning videos (and their keypoints) out.

:class:`PoseOptions` says what is asked for; :meth:`PoseOptions.resolve` checks it and makes it concrete once
(:class:`PoseSettings`: the backend that runs, a real ``torch.device``). The frames stream through
``pose/stream.py``; the backends and the reference detection live in ``pose/backends.py``. Results are cached by
the video's content and every setting that shapes them, so ``animate`` never extracts the same video twice.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from posegen_cli.cache import CacheEntry, cache_dir, cache_key
from posegen_cli.errors import InputError, option
from posegen_cli.fsutil import copy_tree
from posegen_cli.pose.backends import extract_reference_pose, reference_framing
from posegen_cli.pose.keypoints import frame_ranges, identity_switches
from posegen_cli.pose.reference import CENTRE, PERSON, UNCHECKED, ReferenceFraming
from posegen_cli.pose.settings import KEYPOINTS_BACKEND, PoseOptions, PoseSettings
from posegen_cli.pose.stream import (
    ALIGNED_KEYPOINTS_FILE,
    ALIGNMENT_PNG,
    HAND_FILE,
    KEYPOINTS_FILE,
    OPENPOSE_DIR,
    OVERLAY_FILE,
    POSE_FILE,
    render_aligned,
    render_outputs,
)
from posegen_cli.pose.types import PersonPose
from posegen_cli.preflight import check_extract_pose_files, ensure_models, pose_models
from posegen_cli.report import Reporter
from posegen_cli.video import VideoInfo, probe_video
from posegen_cli.video.framing import crop_box_9x16, warn_if_cropped
from posegen_cli.video.image import ReferenceImage

__all__ = ["ExtractResult", "extract_pose", "extract_reference_pose", "reference_framing"]
"""The pose stage's entry points: the extraction and the two ways of finding the reference person."""

_CACHE_VERSION = 5  # bump when the rendering or the file layout changes


@dataclass(frozen=True)
class ExtractResult:
    """Where the outputs are and what went into them; ``width``/``height`` are those of pose.mp4 and hand.mp4."""

    pose_video: Path
    hand_video: Path
    keypoints: Path
    overlay: Path
    frame_count: int
    fps: Fraction
    width: int
    height: int
    backend: str
    frames_without_person: int
    cached: bool
    hand_normals: str = "none"
    openpose_dir: Path | None = None
    aligned_keypoints: Path | None = None
    alignment_png: Path | None = None
    alignment: dict[str, Any] | None = None
    people_seen: int = 1
    identity_switches: tuple[int, ...] = ()
    reference_framing: dict[str, Any] | None = None
    frames_outside_canvas: tuple[int, ...] = ()

    def input_notes(self) -> dict[str, Any]:
        """What ``animate``'s summary reports about the driving people and the alignment."""
        notes: dict[str, Any] = {"people_seen": self.people_seen, "identity_switches": list(self.identity_switches)}
        if self.alignment is not None:
            notes["align_anchors"] = self.alignment.get("align_anchors")
        if self.frames_outside_canvas:
            notes["frames_outside_canvas"] = len(self.frames_outside_canvas)
        return notes

    def summary(self) -> dict[str, Any]:
        """Plain values for ``Reporter.summary``."""
        data = {k: (str(v) if isinstance(v, (Path, Fraction)) else v) for k, v in asdict(self).items()}
        data["fps"] = float(self.fps)
        return data


def extract_pose(
    video: Path,
    out_dir: Path | None = None,
    options: PoseOptions | None = None,
    *,
    from_keypoints: Path | None = None,
    align_to: Path | ReferenceImage | None = None,
    reporter: Reporter | None = None,
    info: VideoInfo | None = None,
    reference_pose: PersonPose | None = None,
    framing: ReferenceFraming | None = None,
) -> ExtractResult:
    """Make ``pose.mp4``, ``hand.mp4``, ``keypoints.npz`` and ``overlay.mp4`` for ``video`` in ``out_dir``.

    Args:
        video: the driving video.
        out_dir: output folder; defaults to ``<video stem>_pose`` beside the video.
        options: what to extract (:class:`PoseOptions`; defaults throughout when None).
        from_keypoints: our npz, or OpenPose JSON files, rendered instead of detecting.
        align_to: a reference photo (a path, or a :class:`ReferenceImage` already decoded and hashed): the skeleton
            is retargeted onto that person (``options.align``) and ``pose.mp4``/``hand.mp4`` are rendered on the
            model's 720x1280 canvas, with ``keypoints_aligned.npz`` and ``alignment.png``; ``keypoints.npz`` and
            ``overlay.mp4`` stay in the source frame.
        reporter: where progress and warnings go.
        info: ``probe_video(video)`` when the caller already holds it (probing decodes the whole video).
        reference_pose: the highest-scoring person on ``frame_to_model(align_to)`` when the caller already detected
            it: the release's centre crop, with no reframing.
        framing: how ``align_to`` is framed and its person (``backends.reference_framing``), when the caller already
            found it; otherwise it is found here: the reference is framed around its person (a transparent one
            composited onto ``options.background``), and with nobody in it the job stops unless
            ``options.person_check`` is False.

    Returns:
        ExtractResult: the output paths, frame count, fps, canvas size, backend and alignment summary.

    Raises:
        InputError: a missing or unreadable input, keypoints that do not match the video, nobody in any frame or in the
            reference, or an option value that cannot be used (an OptionError).
        MissingModelError: a Sapiens model is not downloaded.
    """
    reporter = reporter or Reporter()
    options = options or PoseOptions()
    video, out_dir = check_extract_pose_files(video, out_dir, None if isinstance(align_to, ReferenceImage) else align_to)
    settings, why = options.resolve(keypoints_given=from_keypoints is not None)
    needed = pose_models(settings.backend, settings.hand_normals, settings.model_size, settings.seg_size, settings.normal_size)
    ensure_models(needed, settings.models_dir, reporter.info)
    reference = None
    if align_to is not None:
        reference = ReferenceImage.load(align_to, f"reference image ({option('align_to')})", options.background)
    if info is None:
        info = probe_video(video)
        if (note := info.timing_note()) is not None:
            reporter.info(note)
    if from_keypoints is not None:
        from_keypoints = Path(from_keypoints)
        if not from_keypoints.exists():
            raise InputError(f"keypoints not found: {from_keypoints} (pass a keypoints.npz, an OpenPose JSON file or a folder of them)")
        reporter.info(f"rendering keypoints from {from_keypoints} (no detection)")
    else:
        reporter.info(f"pose backend: {settings.backend} ({why})")
    if settings.hand_normals == "none":
        reporter.info("hand-normal video: black (no normal model; the release trained with the hand signal dropped 10% of the time)")
    if reference is not None and settings.align == "none":
        # Only unaligned framing crops the driving frame; aligned poses are redrawn on the reference's canvas.
        warn_if_cropped(reporter, info.width, info.height, f"driving video {video.name}")

    def produce(target: Path) -> dict[str, Any]:
        track, people_seen = render_outputs(info, target, settings, from_keypoints=from_keypoints, reporter=reporter)
        switches = identity_switches(track.keypoints, track.scores, settings.body_threshold)
        seen = max(people_seen, len(switches) + 1) if track.frames_without_person() < track.frame_count else 0
        return {
            "frame_count": track.frame_count, "backend": track.backend, "frames_without_person": track.frames_without_person(),
            "people_seen": seen, "identity_switches": switches,
        }  # fmt: skip

    framing_notes: dict[str, Any] = {}
    if reference is not None:
        if framing is None:  # else the caller has framed it and said how
            framing = _frame_reference(reference, settings, reference_pose, options.person_check, reporter)
            if reference.transparent:
                framing_notes["background"] = list(reference.background)
        framing_notes.update(rule=framing.rule, box=list(framing.box))

    def produce_aligned(source: Path, target: Path) -> dict[str, Any]:
        framed = framing.frame(reference.pixels)
        return render_aligned(source, target, settings, reference=(reference.path.name, framed, framing.person), reporter=reporter)

    key = cache_key([video, *_keypoint_files(from_keypoints)], {"version": _CACHE_VERSION, **settings.key_fields()})
    use_cache = options.use_cache
    with contextlib.ExitStack() as stack:
        if use_cache:
            source = cache_dir("pose", key)
        else:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            source = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
            )
        record, cached = _cached_or_made(source, use_cache, produce, reporter, "pose outputs")
        files = {name: source / name for name in (KEYPOINTS_FILE, OVERLAY_FILE, POSE_FILE, HAND_FILE)}
        if settings.openpose_json:
            files[OPENPOSE_DIR] = source / OPENPOSE_DIR
        size = (info.width, info.height)
        alignment, outside = None, []
        if reference is not None:
            framing_key = {"box": list(framing.box), "fill": list(framing.fill), "rule": framing.rule}
            align_key = cache_key(
                [],
                {
                    "version": _CACHE_VERSION,
                    "extraction": key,
                    "align": settings.align,
                    "reference": reference.digest,
                    "framing": framing_key,
                },
            )
            aligned_dir = cache_dir("pose-aligned", align_key) if use_cache else source / "aligned"
            aligned, aligned_cached = _cached_or_made(
                aligned_dir, use_cache, lambda target: produce_aligned(source, target), reporter, "aligned pose"
            )
            cached = cached and aligned_cached
            files.update({name: aligned_dir / name for name in (POSE_FILE, HAND_FILE, ALIGNED_KEYPOINTS_FILE, ALIGNMENT_PNG)})
            size, alignment = (aligned["width"], aligned["height"]), aligned["alignment"]
            outside = aligned.get("frames_outside_canvas", [])
        for name, path in files.items():
            copy_tree(path, out_dir / name)

    result = ExtractResult(
        pose_video=out_dir / POSE_FILE, hand_video=out_dir / HAND_FILE, keypoints=out_dir / KEYPOINTS_FILE,
        overlay=out_dir / OVERLAY_FILE, frame_count=record["frame_count"], fps=info.fps, width=size[0],
        height=size[1], backend=record["backend"], frames_without_person=record["frames_without_person"],
        cached=cached, hand_normals=settings.hand_normals, openpose_dir=out_dir / OPENPOSE_DIR if settings.openpose_json else None,
        aligned_keypoints=out_dir / ALIGNED_KEYPOINTS_FILE if reference is not None else None,
        alignment_png=out_dir / ALIGNMENT_PNG if reference is not None else None, alignment=alignment,
        people_seen=record.get("people_seen", 1), identity_switches=tuple(record.get("identity_switches", ())),
        reference_framing=framing_notes or None, frames_outside_canvas=tuple(outside),
    )  # fmt: skip
    _warn_about_people(result, video.name, reporter)
    return result


def _frame_reference(
    reference: ReferenceImage, settings: PoseSettings, reference_pose: PersonPose | None, person_check: bool, reporter: Reporter
) -> ReferenceFraming:
    """How the reference is framed when the caller has not said: the release's centre crop around ``reference_pose``
    when one is given, else framed around its person (``backends.reference_framing``), with a line saying how."""
    height, width = reference.pixels.shape[:2]
    name = reference.path.name
    if reference.transparent:
        reporter.info(f"{name} is transparent: composited onto RGB {reference.background} (set {option('background')} to change)")
    if reference_pose is not None:
        return ReferenceFraming(crop_box_9x16(width, height), reference_pose, CENTRE, reference.background)
    detector = settings.backend if settings.backend != KEYPOINTS_BACKEND else "auto"
    framing = reference_framing(
        reference.pixels, detector, name=str(reference.path), person_check=person_check, fill=reference.background,
        device=settings.device, models_dir=settings.models_dir,
    )  # fmt: skip
    if framing.rule == PERSON:
        reporter.info(framing.describe(width, height, name))
    elif framing.rule == UNCHECKED:
        reporter.warn(f"no person found in {name}; going on because of {option('no_person_check')} (centre crop, no alignment)")
    return framing


def _warn_about_people(result: ExtractResult, video_name: str, reporter: Reporter) -> None:
    """Warn about aligned frames left mostly off the canvas, identity switches and frames without anyone."""
    if result.frames_outside_canvas:
        outside = result.frames_outside_canvas
        reporter.warn(
            f"the aligned pose is mostly outside the {result.width}x{result.height} canvas in frame(s) {frame_ranges(list(outside))} "
            f"({len(outside)} of {result.frame_count}; those pose frames are nearly empty: check alignment.png, try "
            f"{option('align')} none or {option('person')})"
        )
    if result.identity_switches:
        hint = (
            f"; MediaPipe follows one person at a time, {option('backend')} sapiens tells people apart"
            if result.backend == "mediapipe"
            else ""
        )
        reporter.warn(
            f"the followed person seems to change at frame(s) {frame_ranges(list(result.identity_switches))} of {video_name} "
            f"(the pose jumps to another place: someone else was picked up; choose with {option('person')} N or X,Y{hint})"
        )
    if result.frames_without_person:
        reporter.warn(f"nobody was found in {result.frames_without_person} of {result.frame_count} frames (their pose frames are black)")


def _cached_or_made(
    folder: Path, use_cache: bool, make: Callable[[Path], dict[str, Any]], reporter: Reporter, what: str
) -> tuple[dict[str, Any], bool]:
    """The data of an intact cache ``folder``, or ``make`` it atomically; also says whether it was cached."""
    found = CacheEntry(folder).get_or_make(make, use_cache)
    if found.cached:
        reporter.info(f"{what} cached from an earlier run ({folder})")
    elif found.damaged:
        reporter.warn(f"{what} in the cache had changed since they were stored ({', '.join(found.damaged)}); made them again")
    return found.data, found.cached


def _keypoint_files(source: Path | None) -> list[Path]:
    """The files whose content the rendering depends on when keypoints are given."""
    if source is None:
        return []
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file())
    return [source]

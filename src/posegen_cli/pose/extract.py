"""`posegen extract-pose`: a driving video in, the two conditioning videos (and their keypoints) out.

:class:`PoseOptions` says what is asked for; :meth:`PoseOptions.resolve` checks it and makes it concrete once
(:class:`PoseSettings`: the backend that runs, a real ``torch.device``). The frames stream through
``pose/stream.py``; the backends and the reference detection live in ``pose/backends.py``. Results are cached by
the video's content and every setting that shapes them, so ``animate`` never extracts the same video twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from posegen_cli.cache import cache_dir, cache_key
from posegen_cli.errors import InputError, option
from posegen_cli.fsutil import atomic_dir, atomic_path
from posegen_cli.pose.backends import extract_reference_pose
from posegen_cli.pose.settings import KEYPOINTS_BACKEND, PoseOptions
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
from posegen_cli.report import Reporter
from posegen_cli.video import VideoInfo, probe_video
from posegen_cli.video.framing import frame_to_model, warn_if_cropped
from posegen_cli.video.image import ReferenceImage

_RESULT_FILE = "result.json"
_CACHE_VERSION = 3  # bump when the rendering or the file layout changes
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

    def summary(self) -> dict[str, Any]:
        """Plain values for ``Reporter.summary``."""
        data = {k: (str(v) if isinstance(v, (Path, Fraction)) else v) for k, v in asdict(self).items()}
        data["fps"] = float(self.fps)
        return data


def _link_or_copy(src: Path, dst: Path) -> None:
    """Publish ``src`` under ``dst`` atomically, sharing the bytes when the filesystem allows."""
    if src.is_dir():
        with atomic_dir(dst) as tmp:
            for child in src.iterdir():
                _link_or_copy(child, tmp / child.name)
        return
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


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
        reference_pose: the highest-scoring person on ``frame_to_model(align_to)``, as
            :func:`~posegen_cli.pose.backends.extract_reference_pose` finds it, when the caller already detected it.

    Returns:
        ExtractResult: the output paths, frame count, fps, canvas size, backend and alignment summary.

    Raises:
        InputError: a missing or unreadable input, keypoints that do not match the video, nobody in any frame, or an
            option value that cannot be used (an OptionError).
        MissingModelError: a Sapiens model is not downloaded.
    """
    reporter = reporter or Reporter()
    options = options or PoseOptions()
    video = Path(video)
    settings, why = options.resolve(keypoints_given=from_keypoints is not None)
    reference = ReferenceImage.load(align_to, f"reference image ({option('align_to')})") if align_to is not None else None
    if info is None:
        info = probe_video(video)
    if from_keypoints is not None:
        from_keypoints = Path(from_keypoints)
        if not from_keypoints.exists():
            raise InputError(f"keypoints not found: {from_keypoints} (pass a keypoints.npz, an OpenPose JSON file or a folder of them)")
        reporter.info(f"rendering keypoints from {from_keypoints} (no detection)")
    else:
        reporter.info(f"pose backend: {settings.backend} ({why})")
    if settings.hand_normals == "none":
        reporter.info("hand-normal video: black (no normal model; the release trained with the hand signal dropped 10% of the time)")
    if reference is None:
        warn_if_cropped(reporter, info.width, info.height, f"driving video {video.name}")
    out_dir = Path(out_dir) if out_dir is not None else video.with_name(f"{video.stem}_pose")

    def produce(target: Path) -> dict[str, Any]:
        track = render_outputs(info, target, settings, from_keypoints=from_keypoints, reporter=reporter)
        return {"frame_count": track.frame_count, "backend": track.backend, "frames_without_person": track.frames_without_person()}

    def produce_aligned(source: Path, target: Path) -> dict[str, Any]:
        framed = frame_to_model(reference.pixels)
        person = reference_pose
        if person is None:
            detector = settings.backend if settings.backend != KEYPOINTS_BACKEND else "auto"
            person = extract_reference_pose(framed, detector, device=settings.device, models_dir=settings.models_dir)
        return render_aligned(source, target, settings, reference=(reference.path.name, framed, person), reporter=reporter)

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
        alignment = None
        if reference is not None:
            align_key = cache_key([], {"version": _CACHE_VERSION, "extraction": key, "align": settings.align, "reference": reference.digest})
            aligned_dir = cache_dir("pose-aligned", align_key) if use_cache else source / "aligned"
            aligned, aligned_cached = _cached_or_made(
                aligned_dir, use_cache, lambda target: produce_aligned(source, target), reporter, "aligned pose"
            )
            cached = cached and aligned_cached
            files.update({name: aligned_dir / name for name in (POSE_FILE, HAND_FILE, ALIGNED_KEYPOINTS_FILE, ALIGNMENT_PNG)})
            size, alignment = (aligned["width"], aligned["height"]), aligned["alignment"]
        for name, path in files.items():
            _link_or_copy(path, out_dir / name)

    result = ExtractResult(
        pose_video=out_dir / POSE_FILE, hand_video=out_dir / HAND_FILE, keypoints=out_dir / KEYPOINTS_FILE,
        overlay=out_dir / OVERLAY_FILE, frame_count=record["frame_count"], fps=info.fps, width=size[0],
        height=size[1], backend=record["backend"], frames_without_person=record["frames_without_person"],
        cached=cached, hand_normals=settings.hand_normals, openpose_dir=out_dir / OPENPOSE_DIR if settings.openpose_json else None,
        aligned_keypoints=out_dir / ALIGNED_KEYPOINTS_FILE if reference is not None else None,
        alignment_png=out_dir / ALIGNMENT_PNG if reference is not None else None, alignment=alignment,
    )  # fmt: skip
    if result.frames_without_person:
        reporter.warn(f"nobody was found in {result.frames_without_person} of {result.frame_count} frames (their pose frames are black)")
    return result


def _cached_or_made(
    folder: Path, use_cache: bool, make: Callable[[Path], dict[str, Any]], reporter: Reporter, what: str
) -> tuple[dict[str, Any], bool]:
    """The record of a finished ``folder``, or ``make`` it atomically; also says whether it was cached."""
    done = folder / _RESULT_FILE
    if use_cache and done.is_file():
        reporter.info(f"{what} cached from an earlier run ({folder})")
        return json.loads(done.read_text()), True
    with atomic_dir(folder) as tmp:
        record = make(tmp)
        (tmp / _RESULT_FILE).write_text(json.dumps(record))
    return record, False


def _keypoint_files(source: Path | None) -> list[Path]:
    """The files whose content the rendering depends on when keypoints are given."""
    if source is None:
        return []
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file())
    return [source]

"""Checks that run before any expensive work: every input, output folder and model a job needs.

A job that would fail must fail in the first second, not after its pose extraction or an hour of generation:
input files exist, are not empty and are what they claim to be (a still image is not a driving video), every
folder the job writes can be written, and every model it will load is on disk or can be fetched now (all of
them named in one error otherwise). Only the standard library is imported here, so the CLI can run these
checks before it loads torch or OpenCV; decoding an image is the one check that loads OpenCV, on demand.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from posegen_cli import hub
from posegen_cli.errors import InputError, require_file

IMAGE_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "WebP": (b"RIFF",),  # with b"WEBP" at offset 8
}
"""File signatures (magic numbers) of the still-image formats OpenCV decodes for posegen (ISO/W3C specs)."""

VIDEO_MODELS = ("wan-i2v-720p", "posegen")
CAPTION_MODEL = "qwen2.5-vl-7b"
TEXT_MODEL = "wan-i2v-720p"
DETECTOR_MODEL = "sapiens-detector"


def still_image_format(path: Path) -> str | None:
    """The still-image format of ``path`` from its first bytes (PNG, JPEG, ...), or None for anything else."""
    with open(path, "rb") as f:
        head = f.read(12)
    for name, signatures in IMAGE_SIGNATURES.items():
        if any(head.startswith(sig) for sig in signatures) and (name != "WebP" or head[8:12] == b"WEBP"):
            return name
    return None


def check_image(path: str | Path, what: str) -> Path:
    """``path`` exists, is not empty and is a PNG/JPEG/WebP/BMP/TIFF file; InputError naming it otherwise."""
    path = require_file(path, what)
    if still_image_format(path) is None:
        raise InputError(f"cannot read {what} {path}: not a PNG/JPEG/WebP/BMP/TIFF image (convert it to PNG)")
    return path


def check_video(path: str | Path, what: str) -> Path:
    """``path`` exists, is not empty and is not a still image (ffmpeg would read one as a 1-frame video)."""
    path = require_file(path, what)
    kind = still_image_format(path)
    if kind is not None:
        raise InputError(f"{what} {path} is a still {kind} image, not a video (pass a video file such as an .mp4)")
    return path


def check_writable_folder(folder: str | Path, what: str) -> Path:
    """``folder`` exists and is writable, or can be created: its nearest existing ancestor is a writable folder."""
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write the {what} {folder}: {existing} is a file, not a folder (choose another folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the {what} {folder}: {existing} is not writable (choose another folder, or fix its permissions)")
    return folder


def check_output_video(output: str | Path, inputs: list[Path]) -> Path:
    """The output must be an .mp4 path in a writable folder that is not a folder and does not overwrite an input."""
    output = Path(output)
    if output.suffix.lower() != ".mp4":
        raise InputError(f"output {output} must end in .mp4 (the video is H.264 in an MP4 container)")
    if output.is_dir():
        raise InputError(f"output {output} is a folder (give a file name such as {output / 'posegen.mp4'})")
    for path in inputs:
        if output.resolve() == path.resolve():
            raise InputError(f"output {output} would overwrite the input {path} (choose another output name)")
    check_writable_folder(output.parent, "output folder")
    return output


def pose_output_dir(video: Path, out_dir: str | Path | None) -> Path:
    """Where ``extract-pose`` writes: ``out_dir``, else ``<video stem>_pose`` beside the video."""
    return Path(out_dir) if out_dir is not None else video.with_name(f"{video.stem}_pose")


def check_animate_files(
    reference: str | Path, motion: str | Path, output: str | Path, work_root: Path, motion_what: str = "driving video"
) -> tuple[Path, Path, Path]:
    """The cheap checks of an ``animate`` job, in the order a user reads the command; returns the three paths.

    ``motion`` is the video that sets the motion: the driving video, or the caller's own pose video (``motion_what``
    names it in messages).
    """
    reference = check_image(reference, "reference image")
    motion = check_video(motion, motion_what)
    output = check_output_video(output, [reference, motion])
    check_writable_folder(work_root, "work folder")
    return reference, motion, output


def check_extract_pose_files(video: str | Path, out_dir: str | Path | None, align_to: str | Path | None) -> tuple[Path, Path]:
    """The cheap checks of an ``extract-pose`` job; returns the video and the output folder."""
    video = check_video(video, "driving video")
    if align_to is not None:
        check_image(align_to, "reference image to align to")
    out = pose_output_dir(video, out_dir)
    check_writable_folder(out, "pose output folder")
    return video, out


def pose_models(backend: str, hand_normals: str, model_size: str = "2b", seg_size: str = "1b", normal_size: str = "2b") -> list[str]:
    """Registry names the pose stage loads for a resolved ``backend`` (sapiens, mediapipe) and hand-normal source."""
    if backend != "sapiens":
        names: list[str] = []
    else:
        names = [DETECTOR_MODEL, f"sapiens-pose-{model_size}"]
    if hand_normals == "sapiens":
        names += [f"sapiens-seg-{seg_size}", f"sapiens-normal-{normal_size}"]
    return names


def animate_models(pose_backend: str, hand_normals: str, captioned: bool, distill_model: str | None = None) -> list[str]:
    """Every model an ``animate`` job loads: pose stage, captioner (unless a prompt is given), Wan parts, PoseGen and
    the step-distillation LoRA (``distill_model``, its registry name) when the job uses one."""
    extra = [distill_model] if distill_model is not None else []
    return [*pose_models(pose_backend, hand_normals), *([CAPTION_MODEL] if captioned else []), *VIDEO_MODELS, *extra]


def prompt_models(captioned: bool) -> tuple[list[str], hub.Parts]:
    """What ``prompt`` loads: the Wan tokenizer (only that part of the Wan repository) and the captioner if it captions."""
    return [TEXT_MODEL, *([CAPTION_MODEL] if captioned else [])], {TEXT_MODEL: ("tokenizer/*",)}


def ensure_models(
    names: list[str], models_dir: str | Path | None, notify: Callable[[str], None], parts: hub.Parts | None = None
) -> None:
    """Make every model in ``names`` present before the job starts, or raise one MissingModelsError naming all missing.

    Models the Hugging Face cache lacks are downloaded now, one after the other (``notify`` is told each), so a
    network failure ends the job before any work, not between its stages. ``parts`` limits a model to the files
    a stage reads.
    """
    parts = parts or {}
    for name in hub.require_models(names, models_dir, parts):
        spec = hub.MODELS[name]
        notify(f"downloading {name}: {spec.repo_id} (~{spec.size_gb:g} GB, {spec.licence})")
        hub.fetch(spec, parts=parts.get(name))

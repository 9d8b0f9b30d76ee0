"""`posegen extract-pose`: a driving video in, the two conditioning videos (and their keypoints) out.

Frames stream through once: detect (or read keypoints), pick one person, render the skeleton, the hand
normals and a preview overlay, and hand each frame to its encoder, so memory stays flat whatever the
length. Results are cached by the video's content and every setting that shapes them, so ``animate``
never extracts the same video twice.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from posegen_cli.cache import cache_dir, cache_key
from posegen_cli.device import resolve_device
from posegen_cli.errors import InputError, require_file
from posegen_cli.fsutil import atomic_dir, atomic_path
from posegen_cli.pose.framing import crop_box_9x16, frame_to_model, map_points_to_model, warn_if_cropped
from posegen_cli.pose.keypoints import (
    KeypointTrack,
    PersonChoice,
    PersonFollower,
    frame_ranges,
    identity_switches,
    load_keypoints,
    load_npz,
    parse_person,
    save_npz,
    write_openpose_json,
)
from posegen_cli.pose.reference import CENTRE, PERSON, UNCHECKED, ReferenceFraming, frame_reference
from posegen_cli.pose.render import BODY_THRESHOLD, HAND_THRESHOLD, overlay_pose, render_hand_normals, render_pose
from posegen_cli.pose.types import NUM_KEYPOINTS, NormalBackend, PersonPose, PoseBackend
from posegen_cli.report import Reporter
from posegen_cli.video import VideoInfo, VideoWriter, iter_frames, load_image, probe_video, read_image
from posegen_cli.video.decode import constant_rate_command

BACKENDS = ("auto", "sapiens", "mediapipe")
HAND_NORMAL_SOURCES = ("auto", "sapiens", "none")
OUTPUT_FORMATS = ("npz", "openpose-json")
"""Keypoints are always written as keypoints.npz beside the videos; ``openpose-json`` adds ``openpose/``."""
POSE_FILE, HAND_FILE, KEYPOINTS_FILE, OVERLAY_FILE, OPENPOSE_DIR = "pose.mp4", "hand.mp4", "keypoints.npz", "overlay.mp4", "openpose"
ALIGNED_KEYPOINTS_FILE, ALIGNMENT_PNG = "keypoints_aligned.npz", "alignment.png"
_RESULT_FILE = "result.json"
CONDITIONING_PRESET = "veryfast"
"""x264 preset of pose.mp4 and hand.mp4: flat colours on black compress well even this fast."""
OVERLAY_CRF, OVERLAY_PRESET = 23, "ultrafast"
"""The overlay is only for people to look at, so it is encoded as cheaply as possible."""
OVERLAY_HALVE_ABOVE = 960
"""Sources whose longer side exceeds this get a half-size overlay: a quarter of the encoding work."""
_CACHE_VERSION = 4  # bump when the rendering or the file layout changes


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


@dataclass(frozen=True)
class ExtractSettings:
    """Everything besides the input files that changes the outputs (and so the cache key)."""

    backend: str
    hand_normals: str
    track: bool
    person: str | None
    lossless: bool
    openpose_json: bool
    body_threshold: float
    hand_threshold: float
    model_size: str
    seg_size: str
    normal_size: str


def resolve_backend(backend: str, device: str = "auto") -> tuple[str, str]:
    """The backend to run and why: ``auto`` is Sapiens with a CUDA GPU, else MediaPipe."""
    if backend not in BACKENDS:
        raise InputError(f"--backend {backend!r} is not known (use {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend, "requested"
    if resolve_device(device).type == "cuda":
        return "sapiens", "a CUDA GPU is available"
    return "mediapipe", "no CUDA GPU, so the CPU backend"


def resolve_hand_normals(hand_normals: str, backend: str) -> str:
    """``auto`` follows the pose backend: Sapiens normals with Sapiens, a black hand video with MediaPipe."""
    if hand_normals not in HAND_NORMAL_SOURCES:
        raise InputError(f"--hand-normals {hand_normals!r} is not known (use {', '.join(HAND_NORMAL_SOURCES)})")
    if hand_normals != "auto":
        return hand_normals
    return "sapiens" if backend == "sapiens" else "none"


def make_pose_backend(
    name: str,
    *,
    device: str = "auto",
    static: bool = False,
    model_size: str = "2b",
    models_dir: Path | None = None,
    batch_size: int = 8,
    reporter: Reporter | None = None,
) -> PoseBackend:
    """A constructed backend; the heavy imports happen only for the one asked for (MediaPipe takes one frame at a time)."""
    if name == "mediapipe":
        from posegen_cli.pose.mediapipe_backend import MediaPipePoseBackend

        return MediaPipePoseBackend(static_image_mode=static)
    if name == "sapiens":
        from posegen_cli.pose.sapiens import SapiensPoseBackend

        return SapiensPoseBackend(model_size=model_size, device=device, models_dir=models_dir, batch_size=batch_size, reporter=reporter)
    raise InputError(f"--backend {name!r} is not known (use {', '.join(BACKENDS)})")


def make_normal_backend(
    *,
    device: str = "auto",
    seg_size: str = "1b",
    normal_size: str = "2b",
    models_dir: Path | None = None,
    batch_size: int = 8,
    reporter: Reporter | None = None,
) -> NormalBackend:
    """Sapiens seg + normal models (the only normal source; MediaPipe bundles none)."""
    from posegen_cli.pose.sapiens import SapiensNormalBackend

    return SapiensNormalBackend(
        seg_size=seg_size, normal_size=normal_size, device=device, models_dir=models_dir, batch_size=batch_size, reporter=reporter
    )


def _closing(stack: contextlib.ExitStack, backend: object) -> None:
    """Backends that hold native resources (MediaPipe graphs) expose ``close``."""
    close = getattr(backend, "close", None)
    if callable(close):
        stack.callback(close)


@contextlib.contextmanager
def reference_detector(
    backend: str = "auto", *, device: str = "auto", model_size: str = "2b", models_dir: Path | None = None
) -> Iterator[Callable[[np.ndarray], PersonPose | None]]:
    """A function finding the highest-scoring person in one RGB image, or None; the model loads once for the block."""
    name, _ = resolve_backend(backend, device)
    with contextlib.ExitStack() as stack:
        detector = make_pose_backend(name, device=device, static=True, model_size=model_size, models_dir=models_dir)
        _closing(stack, detector)

        def detect(image: np.ndarray) -> PersonPose | None:
            people = detector.detect([np.ascontiguousarray(image)])[0]
            return max(people, key=lambda p: p.box_score) if people else None

        yield detect


def extract_reference_pose(
    image: np.ndarray, backend: str = "auto", *, device: str = "auto", model_size: str = "2b", models_dir: Path | None = None
) -> PersonPose | None:
    """The highest-scoring person in one RGB image (for aligning a reference photo), or None."""
    with reference_detector(backend, device=device, model_size=model_size, models_dir=models_dir) as detect:
        return detect(image)


def reference_framing(
    image: np.ndarray,
    backend: str = "auto",
    *,
    name: str = "the reference image",
    person_check: bool = True,
    fill: tuple[int, int, int] = (255, 255, 255),
    device: str = "auto",
    model_size: str = "2b",
    models_dir: Path | None = None,
) -> ReferenceFraming:
    """``reference.frame_reference`` with this backend's detector (loaded once): the 9:16 framing and its person."""
    with reference_detector(backend, device=device, model_size=model_size, models_dir=models_dir) as detect:
        return frame_reference(image, detect, name=name, person_check=person_check, fill=fill)


def _batches(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    while batch := list(itertools.islice(frames, size)):
        yield batch


@contextlib.contextmanager
def _prefetched(items: Iterator[Any], depth: int = 2) -> Iterator[Iterator[Any]]:
    """Produce ``items`` on a background thread, ``depth`` ahead, so decoding overlaps detection.

    Exceptions from the producer surface in the consumer; leaving the block early stops the producer.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((done, None))
        except Exception as exc:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            buffer.put((done, exc))

    def consume() -> Iterator[Any]:
        while True:
            item, exc = buffer.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item

    thread = threading.Thread(target=produce, name="posegen-decode", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                buffer.get_nowait()
        thread.join()


class _FrameSink:
    """Renders and encodes on one background thread, one batch behind detection, so the two overlap."""

    def __init__(self, writers: tuple[VideoWriter, VideoWriter, VideoWriter], settings: ExtractSettings, width: int, height: int) -> None:
        self.pose_writer, self.hand_writer, self.overlay_writer = writers
        self.settings = settings
        self.size = (width, height)
        self.black = np.zeros((height, width, 3), np.uint8)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="posegen-encode")
        self.pending: concurrent.futures.Future | None = None

    def _write(self, frames: list[np.ndarray], keypoints: np.ndarray, scores: np.ndarray, hands: list | None) -> None:
        for i, frame in enumerate(frames):
            pose = render_pose(
                keypoints[i], scores[i], *self.size,
                body_threshold=self.settings.body_threshold, hand_threshold=self.settings.hand_threshold,
            )  # fmt: skip
            self.pose_writer.write(pose)
            self.hand_writer.write(render_hand_normals(*hands[i]) if hands is not None else self.black)
            overlay = overlay_pose(frame, pose)
            if max(self.size) > OVERLAY_HALVE_ABOVE:
                overlay = cv2.resize(overlay, (self.size[0] // 2, self.size[1] // 2), interpolation=cv2.INTER_AREA)
            self.overlay_writer.write(overlay)

    def submit(self, frames: list[np.ndarray], keypoints: np.ndarray, scores: np.ndarray, hands: list | None) -> None:
        self.drain()
        self.pending = self.pool.submit(self._write, frames, keypoints.copy(), scores.copy(), hands)

    def drain(self) -> None:
        """Wait for the batch in flight; re-raises its error."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


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


def _render_outputs(
    info: VideoInfo,
    out: Path,
    *,
    settings: ExtractSettings,
    device: str,
    from_keypoints: Path | None,
    models_dir: Path | None,
    batch_size: int,
    reporter: Reporter,
) -> tuple[KeypointTrack, int]:
    """Stream the video once (on its constant-rate timeline), writing pose/hand/overlay videos into ``out``.

    Returns the keypoint track and the most people one frame showed.
    """
    video, fps, width, height, total = info.path, info.fps, info.width, info.height, info.frame_count
    choice = parse_person(settings.person)
    given = None
    if from_keypoints is not None:
        given = load_keypoints(from_keypoints, fps=fps, width=width, height=height, track=settings.track, choice=choice)
        if (given.width, given.height) != (width, height):
            raise InputError(
                f"{from_keypoints} holds keypoints for {given.width}x{given.height} frames but {video} is {width}x{height} "
                "(render onto a video of the same size, or rescale the keypoints first)"
            )
        if given.frame_count != total:
            raise InputError(
                f"{from_keypoints} has {given.frame_count} frames of keypoints but {video} has {total} (use the matching video)"
            )

    keypoints = np.zeros((total, NUM_KEYPOINTS, 2))
    scores = np.zeros((total, NUM_KEYPOINTS))
    follower = PersonFollower(settings.track, choice)
    count = 0
    with contextlib.ExitStack() as stack:
        writers = (
            stack.enter_context(VideoWriter(out / POSE_FILE, fps, lossless=settings.lossless, preset=CONDITIONING_PRESET)),
            stack.enter_context(VideoWriter(out / HAND_FILE, fps, lossless=settings.lossless, preset=CONDITIONING_PRESET)),
            stack.enter_context(VideoWriter(out / OVERLAY_FILE, fps, crf=OVERLAY_CRF, preset=OVERLAY_PRESET)),
        )
        detector = None
        if given is None:
            detector = make_pose_backend(
                settings.backend, device=device, model_size=settings.model_size, models_dir=models_dir, batch_size=batch_size,
                reporter=reporter,
            )  # fmt: skip
            _closing(stack, detector)
        normals = None
        if settings.hand_normals == "sapiens":
            normals = make_normal_backend(
                device=device, seg_size=settings.seg_size, normal_size=settings.normal_size, models_dir=models_dir,
                batch_size=batch_size, reporter=reporter,
            )  # fmt: skip
            _closing(stack, normals)
        progress = stack.enter_context(reporter.progress())
        task = progress.add_task("extracting pose", total=total, unit="frames")
        sink = _FrameSink(writers, settings, width, height)
        stack.callback(sink.close)
        batches = stack.enter_context(_prefetched(_batches(iter_frames(info), batch_size)))
        for batch in batches:
            if count + len(batch) > total:
                raise InputError(f"{video} decodes to more frames than the {total} it reported (rewrite it at a constant rate: {constant_rate_command(info)})")
            span = slice(count, count + len(batch))
            if detector is not None:
                for i, people in enumerate(detector.detect(batch)):
                    person = follower.pick(people)
                    if person is not None:
                        keypoints[count + i], scores[count + i] = person.keypoints, person.scores
            else:
                keypoints[span], scores[span] = given.keypoints[span], given.scores[span]
            hands = normals.normals_and_segmentation(batch) if normals is not None else None
            sink.submit(batch, keypoints[span], scores[span], hands)
            count += len(batch)
            progress.advance(task, len(batch))
        sink.drain()
        if count != total:
            raise InputError(f"{video} decoded to {count} frames but reported {total} (rewrite it at a constant rate: {constant_rate_command(info)})")
        backend_name = given.backend if given is not None else settings.backend
        track = KeypointTrack(keypoints, scores, fps, width, height, backend_name)
        if given is None and track.frames_without_person() == total:
            raise InputError(
                f"nobody was found in any of the {total} frames of {video} (the person must be visible; try --backend sapiens)"
            )
        save_npz(track, out / KEYPOINTS_FILE)
        if settings.openpose_json:
            write_openpose_json(track, out / OPENPOSE_DIR)
    if detector is not None:
        _report_people(follower, choice, reporter)
    return track, follower.people_seen


def _report_people(follower: PersonFollower, choice: PersonChoice, reporter: Reporter) -> None:
    """Say who is followed when the first frame with anyone in it shows several people."""
    people = sorted(follower.first_people, key=lambda p: float(p.box[0] + p.box[2]))
    if len(people) > 1 and follower.track:
        where = ", ".join(f"{i} at x={(p.box[0] + p.box[2]) / 2:.0f}" for i, p in enumerate(people, 1))
        reporter.info(
            f"{len(people)} people in frame {follower.first_frame} (left to right: {where}); following {choice.describe()} "
            "(choose another with --person N or --person X,Y)"
        )


def _write_aligned(
    source: Path,
    target: Path,
    *,
    reference: Path,
    framing: ReferenceFraming,
    mode: str,
    settings: ExtractSettings,
    lossless: bool,
    device: str,
    models_dir: Path | None,
    reporter: Reporter,
) -> dict[str, Any]:
    """Retarget the extracted skeleton onto the reference person and render both videos on the model canvas.

    With ``mode="none"`` the skeleton is drawn at the source size and then framed, as the release does, so
    line widths match its conditioning videos for any source resolution.

    ``framing`` says how the reference is framed and holds its person on that canvas (None: nobody found).

    The hand video follows the skeleton: each extracted hand frame is framed like the reference and moved
    by the fitted transform (``align.align_hand_frame``); black stays black.
    """
    from posegen_cli.pose.align import align_driving_poses, align_hand_frame, frames_outside_canvas

    track = load_npz(source / KEYPOINTS_FILE)
    framed_reference = framing.frame(load_image(reference, framing.fill))
    height, width = framed_reference.shape[:2]
    detector = settings.backend if settings.backend in BACKENDS else "auto"
    aligned = align_driving_poses(
        framed_reference, track.keypoints, track.scores, (track.width, track.height), mode=mode, reporter=reporter,
        reference_pose=framing.person, backend=detector, device=device, models_dir=models_dir, png_path=target / ALIGNMENT_PNG,
        reference_name=reference.name, reference_label="reference" if framing.rule == CENTRE else "reference, framed on the person",
    )  # fmt: skip
    before = map_points_to_model(track.keypoints, track.width, track.height, (height, width))
    save_npz(KeypointTrack(aligned.keypoints, aligned.scores, track.fps, width, height, track.backend), target / ALIGNED_KEYPOINTS_FILE)
    black = np.zeros((height, width, 3), np.uint8)
    hand_frames = iter_frames(source / HAND_FILE) if settings.hand_normals != "none" else itertools.repeat(None)
    with contextlib.ExitStack() as stack:
        pose_writer = stack.enter_context(VideoWriter(target / POSE_FILE, track.fps, lossless=lossless, preset=CONDITIONING_PRESET))
        hand_writer = stack.enter_context(VideoWriter(target / HAND_FILE, track.fps, lossless=lossless, preset=CONDITIONING_PRESET))
        progress = stack.enter_context(reporter.progress())
        task = progress.add_task("rendering aligned pose", total=track.frame_count, unit="frames")
        thresholds = {"body_threshold": settings.body_threshold, "hand_threshold": settings.hand_threshold}
        for i, hand in zip(range(track.frame_count), hand_frames):
            if mode == "none":
                # The release's path exactly: drawn at the source size (fixed pixel widths), then framed.
                pose = frame_to_model(render_pose(track.keypoints[i], track.scores[i], track.width, track.height, **thresholds))
            else:
                pose = render_pose(aligned.keypoints[i], aligned.scores[i], width, height, **thresholds)
            pose_writer.write(pose)
            if hand is None:
                hand_writer.write(black)
            else:
                hand_writer.write(align_hand_frame(frame_to_model(hand), aligned.alignment, before[i], aligned.keypoints[i]))
            progress.advance(task)
    outside = frames_outside_canvas(aligned.keypoints, aligned.scores, width, height, settings.body_threshold) if mode != "none" else []
    return {"width": width, "height": height, "alignment": aligned.alignment.summary(), "frames_outside_canvas": outside}


def extract_pose(
    video: Path,
    out_dir: Path | None = None,
    *,
    backend: str = "auto",
    hand_normals: str = "auto",
    track: bool = True,
    person: str | None = None,
    lossless: bool = False,
    output_format: str = "npz",
    from_keypoints: Path | None = None,
    align_to: Path | None = None,
    align: str = "auto",
    device: str = "auto",
    use_cache: bool = True,
    reporter: Reporter | None = None,
    body_threshold: float = BODY_THRESHOLD,
    hand_threshold: float = HAND_THRESHOLD,
    model_size: str = "2b",
    seg_size: str = "1b",
    normal_size: str = "2b",
    models_dir: Path | None = None,
    batch_size: int = 8,
    info: VideoInfo | None = None,
    reference_pose: PersonPose | None = None,
    reference: ReferenceFraming | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
    person_check: bool = True,
) -> ExtractResult:
    """Make ``pose.mp4``, ``hand.mp4``, ``keypoints.npz`` and ``overlay.mp4`` for ``video`` in ``out_dir``.

    ``out_dir`` defaults to ``<video stem>_pose`` beside the video. ``output_format="openpose-json"``
    also writes one OpenPose JSON per frame into ``openpose/``. ``from_keypoints`` (our npz, or
    OpenPose JSON files) renders those keypoints instead of detecting. ``align_to`` (a reference photo)
    retargets the skeleton onto that person (``align``: auto, limbs, none) and renders ``pose.mp4`` and
    ``hand.mp4`` on the model's 720x1280 canvas, with ``keypoints_aligned.npz`` and ``alignment.png``;
    ``keypoints.npz`` and ``overlay.mp4`` stay in the source frame.

    The reference is framed around its person (``reference.frame_reference``); a transparent one is composited
    onto ``background``; with no person in it the job stops (InputError) unless ``person_check`` is False.

    Callers that already hold them pass ``info`` (``probe_video(video)``, which decodes the whole video) and
    ``reference`` (``reference_framing(load_image(align_to, background))``), so neither is computed twice;
    ``reference_pose`` alone (the person on ``frame_to_model(align_to)``) stands for the release's centre crop.
    """
    reporter = reporter or Reporter()
    video = Path(video)
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"--format {output_format!r} is not known (use {', '.join(OUTPUT_FORMATS)})")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    parse_person(person)
    if person is not None and not track:
        raise InputError(f"--person {person} chooses whom to follow, but --no-track follows nobody (drop one of them)")
    if align_to is not None:
        from posegen_cli.pose.align import ALIGN_MODES

        align_to = require_file(align_to, "reference image (--align-to)")
        if align not in ALIGN_MODES:
            raise InputError(f"--align {align!r} is not known (use {', '.join(ALIGN_MODES)})")
    if info is None:
        info = probe_video(video)
        if (note := info.timing_note()) is not None:
            reporter.info(note)
    if from_keypoints is not None:
        from_keypoints = Path(from_keypoints)
        if not from_keypoints.exists():
            raise InputError(f"keypoints not found: {from_keypoints} (pass a keypoints.npz, an OpenPose JSON file or a folder of them)")
        name = "keypoints"
        reporter.info(f"rendering keypoints from {from_keypoints} (no detection)")
    else:
        name, why = resolve_backend(backend, device)
        reporter.info(f"pose backend: {name} ({why})")
    hands = resolve_hand_normals(hand_normals, name)
    if hands == "none":
        reporter.info("hand-normal video: black (no normal model; the release trained with the hand signal dropped 10% of the time)")
    if align_to is None:
        warn_if_cropped(reporter, info.width, info.height, f"driving video {video.name}")

    settings = ExtractSettings(
        backend=name, hand_normals=hands, track=track, person=person, lossless=lossless, openpose_json=output_format == "openpose-json",
        body_threshold=float(body_threshold), hand_threshold=float(hand_threshold),
        model_size=model_size, seg_size=seg_size, normal_size=normal_size,
    )  # fmt: skip
    out_dir = Path(out_dir) if out_dir is not None else video.with_name(f"{video.stem}_pose")

    def produce(target: Path) -> dict[str, Any]:
        result, people_seen = _render_outputs(
            info, target, settings=settings,
            device=device, from_keypoints=from_keypoints, models_dir=models_dir, batch_size=batch_size, reporter=reporter,
        )  # fmt: skip
        switches = identity_switches(result.keypoints, result.scores, settings.body_threshold)
        seen = max(people_seen, len(switches) + 1) if result.frames_without_person() < result.frame_count else 0
        return {
            "frame_count": result.frame_count, "backend": result.backend, "frames_without_person": result.frames_without_person(),
            "people_seen": seen, "identity_switches": switches,
        }  # fmt: skip

    framing, framing_notes = reference, dict[str, Any]()
    if align_to is not None:
        loaded = read_image(align_to, background)
        if loaded.transparent and reference is None:  # ``animate`` has said so already
            reporter.info(f"{align_to.name} is transparent: composited onto RGB {background} (set --background to change)")
            framing_notes["background"] = list(background)
        height, width = loaded.pixels.shape[:2]
        if framing is None and reference_pose is not None:
            framing = ReferenceFraming(crop_box_9x16(width, height), reference_pose, CENTRE, background)
        elif framing is None:
            framing = reference_framing(
                loaded.pixels, name if name in BACKENDS else "auto", name=str(align_to), person_check=person_check, fill=background,
                device=device, models_dir=models_dir,
            )  # fmt: skip
            if framing.rule == PERSON:
                reporter.info(framing.describe(width, height, align_to.name))
            elif framing.rule == UNCHECKED:
                reporter.warn(f"no person found in {align_to.name}; going on because of --no-person-check (centre crop, no alignment)")
        framing_notes.update(rule=framing.rule, box=list(framing.box))

    def produce_aligned(source: Path, target: Path) -> dict[str, Any]:
        return _write_aligned(
            source, target, reference=align_to, framing=framing, mode=align, settings=settings, lossless=lossless,
            device=device, models_dir=models_dir, reporter=reporter,
        )  # fmt: skip

    key = cache_key([video, *_keypoint_files(from_keypoints)], {"version": _CACHE_VERSION, **asdict(settings)})
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
        if align_to is not None:
            framing_key = {"box": list(framing.box), "fill": list(framing.fill), "rule": framing.rule}
            align_key = cache_key([align_to], {"version": _CACHE_VERSION, "extraction": key, "align": align, "framing": framing_key})
            aligned_dir = cache_dir("pose-aligned", align_key) if use_cache else source / "aligned"
            aligned, aligned_cached = _cached_or_made(
                aligned_dir, use_cache, lambda target: produce_aligned(source, target), reporter, "aligned pose"
            )
            cached = cached and aligned_cached
            files.update({name: aligned_dir / name for name in (POSE_FILE, HAND_FILE, ALIGNED_KEYPOINTS_FILE, ALIGNMENT_PNG)})
            size, alignment = (aligned["width"], aligned["height"]), aligned["alignment"]
            outside = aligned.get("frames_outside_canvas", [])
        for name, path in files.items():
            _link_or_copy(path, out_dir / name)

    result = ExtractResult(
        pose_video=out_dir / POSE_FILE, hand_video=out_dir / HAND_FILE, keypoints=out_dir / KEYPOINTS_FILE,
        overlay=out_dir / OVERLAY_FILE, frame_count=record["frame_count"], fps=info.fps, width=size[0],
        height=size[1], backend=record["backend"], frames_without_person=record["frames_without_person"],
        cached=cached, hand_normals=hands, openpose_dir=out_dir / OPENPOSE_DIR if settings.openpose_json else None,
        aligned_keypoints=out_dir / ALIGNED_KEYPOINTS_FILE if align_to is not None else None,
        alignment_png=out_dir / ALIGNMENT_PNG if align_to is not None else None, alignment=alignment,
        people_seen=record.get("people_seen", 1), identity_switches=tuple(record.get("identity_switches", ())),
        reference_framing=framing_notes or None,
        frames_outside_canvas=tuple(outside),
    )  # fmt: skip
    if result.frames_outside_canvas:
        reporter.warn(
            f"the aligned pose is mostly outside the {size[0]}x{size[1]} canvas in frame(s) {frame_ranges(outside)} "
            f"({len(outside)} of {result.frame_count}; those pose frames are nearly empty: check alignment.png, try --align none or --person)"
        )
    if result.identity_switches:
        hint = "; MediaPipe follows one person at a time, --backend sapiens tells people apart" if result.backend == "mediapipe" else ""
        reporter.warn(
            f"the followed person seems to change at frame(s) {frame_ranges(result.identity_switches)} of {video.name} "
            f"(the pose jumps to another place: someone else was picked up; choose with --person N or X,Y{hint})"
        )
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

"""Streaming a driving video through the pose stage: decode ahead, detect in batches, render and encode behind.

Frames pass once: a background thread decodes ``batch_size`` frames ahead, the detector (or the given keypoints)
fills the keypoint track, and a second thread renders the skeleton, the hand normals and the overlay and hands them
to their encoders, so memory stays flat whatever the length. :func:`render_aligned` renders an extracted track,
retargeted onto the reference person, on the model canvas.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from posegen_cli.errors import InputError, option
from posegen_cli.fsutil import atomic_path
from posegen_cli.pose.align import AlignedPoses, Alignment, align_driving_poses, align_hand_frame, alignment_panels
from posegen_cli.pose.backends import closing, make_normal_backend, make_pose_backend
from posegen_cli.pose.keypoints import KeypointTrack, PersonFollower, load_keypoints, load_npz, save_npz, write_openpose_json
from posegen_cli.pose.render import overlay_pose, render_hand_normals, render_pose
from posegen_cli.pose.settings import PoseSettings
from posegen_cli.pose.types import NUM_KEYPOINTS, PersonPose
from posegen_cli.report import Reporter
from posegen_cli.video import VideoInfo, VideoWriter, iter_frames
from posegen_cli.video.framing import frame_to_model, map_points_to_model

POSE_FILE, HAND_FILE, KEYPOINTS_FILE, OVERLAY_FILE, OPENPOSE_DIR = "pose.mp4", "hand.mp4", "keypoints.npz", "overlay.mp4", "openpose"
ALIGNED_KEYPOINTS_FILE, ALIGNMENT_PNG = "keypoints_aligned.npz", "alignment.png"
CONDITIONING_PRESET = "veryfast"
"""x264 preset of pose.mp4 and hand.mp4: flat colours on black compress well even this fast."""
OVERLAY_CRF, OVERLAY_PRESET = 23, "ultrafast"
"""The overlay is only for people to look at, so it is encoded as cheaply as possible."""
OVERLAY_HALVE_ABOVE = 960
"""Sources whose longer side exceeds this get a half-size overlay: a quarter of the encoding work."""


def batches(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    """Consecutive lists of ``size`` frames (the last one shorter)."""
    while batch := list(itertools.islice(frames, size)):
        yield batch


@contextlib.contextmanager
def prefetched(items: Iterator[Any], depth: int = 2) -> Iterator[Iterator[Any]]:
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


class FrameSink:
    """Renders and encodes on one background thread, one batch behind detection, so the two overlap."""

    def __init__(self, writers: tuple[VideoWriter, VideoWriter, VideoWriter], settings: PoseSettings, width: int, height: int) -> None:
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


def _given_keypoints(path: Path, video: VideoInfo, track: bool) -> KeypointTrack:
    """Keypoints read from ``path``, checked against the video they are rendered onto."""
    given = load_keypoints(path, fps=video.fps, width=video.width, height=video.height, track=track)
    if (given.width, given.height) != (video.width, video.height):
        raise InputError(
            f"{path} holds keypoints for {given.width}x{given.height} frames but {video.path} is {video.width}x{video.height} "
            "(render onto a video of the same size, or rescale the keypoints first)"
        )
    if given.frame_count != video.frame_count:
        raise InputError(
            f"{path} has {given.frame_count} frames of keypoints but {video.path} has {video.frame_count} (use the matching video)"
        )
    return given


def render_outputs(
    info: VideoInfo, out: Path, settings: PoseSettings, *, from_keypoints: Path | None, reporter: Reporter
) -> KeypointTrack:
    """Stream ``info.path`` once, writing pose/hand/overlay videos and keypoints into ``out``; returns the keypoint track.

    Raises InputError when the video decodes to another frame count than it reports, when the given keypoints do
    not match it, or when nobody is detected in any frame.
    """
    video, total, width, height = info.path, info.frame_count, info.width, info.height
    given = _given_keypoints(from_keypoints, info, settings.track) if from_keypoints is not None else None
    keypoints = np.zeros((total, NUM_KEYPOINTS, 2))
    scores = np.zeros((total, NUM_KEYPOINTS))
    follower = PersonFollower(settings.track)
    count = 0
    backend_args = {"device": settings.device, "models_dir": settings.models_dir, "batch_size": settings.batch_size, "reporter": reporter}
    with contextlib.ExitStack() as stack:
        writers = (
            stack.enter_context(VideoWriter(out / POSE_FILE, info.fps, lossless=settings.lossless, preset=CONDITIONING_PRESET)),
            stack.enter_context(VideoWriter(out / HAND_FILE, info.fps, lossless=settings.lossless, preset=CONDITIONING_PRESET)),
            stack.enter_context(VideoWriter(out / OVERLAY_FILE, info.fps, crf=OVERLAY_CRF, preset=OVERLAY_PRESET)),
        )
        detector = None
        if given is None:
            detector = make_pose_backend(settings.backend, model_size=settings.model_size, **backend_args)
            closing(stack, detector)
        normals = None
        if settings.hand_normals == "sapiens":
            normals = make_normal_backend(seg_size=settings.seg_size, normal_size=settings.normal_size, **backend_args)
            closing(stack, normals)
        progress = stack.enter_context(reporter.progress())
        task = progress.add_task("extracting pose", total=total, unit="frames")
        sink = FrameSink(writers, settings, width, height)
        stack.callback(sink.close)
        for batch in stack.enter_context(prefetched(batches(iter_frames(video), settings.batch_size))):
            if count + len(batch) > total:
                raise InputError(f"{video} decodes to more frames than the {total} it reported (re-encode it with ffmpeg to fix its index)")
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
            raise InputError(f"{video} decoded to {count} frames but reported {total} (re-encode it with ffmpeg to fix its index)")
        backend_name = given.backend if given is not None else settings.backend
        track = KeypointTrack(keypoints, scores, info.fps, width, height, backend_name)
        if given is None and track.frames_without_person() == total:
            raise InputError(
                f"nobody was found in any of the {total} frames of {video} (the person must be visible; try {option('backend')} sapiens)"
            )
        save_npz(track, out / KEYPOINTS_FILE)
        if settings.openpose_json:
            write_openpose_json(track, out / OPENPOSE_DIR)
    return track


def write_alignment_png(
    path: str | Path,
    reference_frame: np.ndarray,
    reference_pose: PersonPose | None,
    before: tuple[np.ndarray, np.ndarray],
    after: tuple[np.ndarray, np.ndarray],
    alignment: Alignment,
) -> Path:
    """Write :func:`~posegen_cli.pose.align.alignment_panels` to ``path`` as a PNG, atomically; returns ``path``."""
    image = alignment_panels(reference_frame, reference_pose, before, after, alignment)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode alignment.png")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
    return path


def write_alignment_preview(path: str | Path, reference_frame: np.ndarray, aligned: AlignedPoses) -> Path | None:
    """``alignment.png`` for one retargeting: the reference, then its first frame with a visible body, before and after.

    Returns None (and writes nothing) for an empty track.
    """
    preview = aligned.preview()
    if preview is None:
        return None
    before, after = preview
    return write_alignment_png(path, reference_frame, aligned.reference_pose, before, after, aligned.alignment)


def render_aligned(
    source: Path, target: Path, settings: PoseSettings, *, reference: tuple[str, np.ndarray, PersonPose | None], reporter: Reporter
) -> dict[str, Any]:
    """Retarget the skeleton extracted into ``source`` onto the reference person and render both videos on the model canvas.

    ``reference`` is the reference image's name, its frame on the model canvas (``frame_to_model``) and the person
    detected on that frame (None when nobody was found). Writes pose.mp4, hand.mp4, keypoints_aligned.npz and
    alignment.png into ``target``; returns the canvas size and the alignment summary.

    With ``settings.align == "none"`` the skeleton is drawn at the source size and then framed, as the release does,
    so line widths match its conditioning videos for any source resolution. The hand video follows the skeleton: each
    extracted hand frame is framed like the reference and moved by the fitted transform (``align.align_hand_frame``);
    black stays black.
    """
    name, framed_reference, reference_pose = reference
    mode = settings.align
    track = load_npz(source / KEYPOINTS_FILE)
    height, width = framed_reference.shape[:2]
    aligned = align_driving_poses(
        framed_reference, track.keypoints, track.scores, (track.width, track.height), mode=mode, reporter=reporter,
        reference_pose=reference_pose, reference_name=name,
    )  # fmt: skip
    write_alignment_preview(target / ALIGNMENT_PNG, framed_reference, aligned)
    before = map_points_to_model(track.keypoints, track.width, track.height, (height, width))
    save_npz(KeypointTrack(aligned.keypoints, aligned.scores, track.fps, width, height, track.backend), target / ALIGNED_KEYPOINTS_FILE)
    black = np.zeros((height, width, 3), np.uint8)
    hand_frames = iter_frames(source / HAND_FILE) if settings.hand_normals != "none" else itertools.repeat(None)
    lossless = settings.lossless
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
    return {"width": width, "height": height, "alignment": aligned.alignment.summary()}

"""Generating a plan's segments in order, with the anchor's K/V alive exactly while base segments need it.

Order and lifecycle: the anchor records K/V (and its subject mask) while it denoises; every other base replays
them; the cache is released before the first transition (transitions share nothing) and in any case when the
job ends, error or not. Finished segments come from the work folder instead of being generated again; when the
anchor is finished but some base is not, the anchor is re-run only as far as its last shared step to rebuild
the cache, its frames being on disk already.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from posegen_cli.longvideo.plan import ANCHOR, BASE, Segment, segment_frame_indices
from posegen_cli.longvideo.sources import FrameSource
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.report import Reporter
from posegen_cli.video import iter_frames, write_video

RELEASE_FPS = 30
RELEASE_CRF = 5
"""How the release saves every segment: imageio at 30 fps, quality 9 = libx264 CRF 5, yuv420p (port spec §4.6)."""

ProgressCallback = Callable[[int], None]
"""Called after each denoising step with the number of steps done in this segment."""


class SegmentRenderer(Protocol):
    """One loaded model set that turns a segment's conditioning frames into video frames."""

    num_steps: int

    def render_anchor(
        self, pose: np.ndarray, hand: np.ndarray, on_step: ProgressCallback, *, record: bool, frames_needed: bool = True
    ) -> np.ndarray | None:
        """Denoise the anchor, keeping its K/V if ``record``; with ``frames_needed=False`` stop after the last shared step."""
        ...

    def anchor_steps(self) -> int:
        """Denoising steps needed to rebuild the cache (the last shared step + 1)."""
        ...

    def render_base(self, pose: np.ndarray, hand: np.ndarray, on_step: ProgressCallback) -> np.ndarray: ...

    def render_transition(
        self, pose: np.ndarray, hand: np.ndarray, head: np.ndarray, tail: np.ndarray, on_step: ProgressCallback
    ) -> np.ndarray: ...

    def release_kv(self) -> None:
        """Free the anchor's K/V (safe to call when none is held)."""
        ...


def release_mp4_roundtrip(frames: np.ndarray, folder: Path) -> np.ndarray:
    """``frames`` as the release's later stages see them: saved as its segment mp4, then decoded again.

    The release conditions each transition on, and merges, the decoded mp4 files of its segments (port spec §6,
    §7.11); ``compat_mp4`` stores these lossy frames instead of the exact ones.
    """
    path = write_video(folder / "roundtrip.mp4", frames, RELEASE_FPS, crf=RELEASE_CRF)
    try:
        return np.stack(list(iter_frames(path)))
    finally:
        path.unlink(missing_ok=True)


@dataclass
class SegmentStats:
    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    rebuilt_anchor: bool = False
    seconds: dict[int, float] = field(default_factory=dict)


def render_segments(
    plan: list[Segment],
    renderer: SegmentRenderer,
    sources: tuple[FrameSource, FrameSource],
    work: WorkDir,
    *,
    total_frames: int,
    frame_shape: tuple[int, int],
    overlap: tuple[int, int],
    reporter: Reporter,
    compat_mp4: bool = False,
    after_segment: Callable[[Segment], None] | None = None,
) -> SegmentStats:
    """Make sure every segment of ``plan`` (in generation order) is in ``work``; returns what was done.

    ``sources`` give the pose and hand conditioning frames; ``overlap`` is (head, tail), the frames a transition
    takes from its neighbours; ``frame_shape`` is (height, width).

    ``compat_mp4`` stores each segment as the release's mp4 round trip would give it back. ``after_segment`` runs
    once each segment is safely stored (progress hooks, and crash injection in tests).
    """
    stats = SegmentStats()
    pose, hand = sources
    head, tail = overlap
    shape_of = {seg.index: (seg.frames, *frame_shape, 3) for seg in plan}
    done = {index for index, shape in work.finished().items() if shape_of.get(index) == shape}
    bases_left = any(seg.kind == BASE and seg.index not in done for seg in plan)

    def steps_to_run(seg: Segment) -> int:
        """Denoising steps ``seg`` still needs: all, the anchor's shared ones to rebuild the K/V, or none."""
        if seg.index not in done:
            return renderer.num_steps
        return renderer.anchor_steps() if seg.kind == ANCHOR and bases_left else 0

    try:
        with reporter.progress() as progress:
            # reused segments are not counted, so the overall rate and ETA of a resumed job are those of its real work
            overall = progress.add_task("all segments", total=sum(steps_to_run(seg) for seg in plan), unit="steps")
            for seg in plan:
                label = f"segment {seg.index} ({seg.kind}, frames {seg.start}-{seg.stop - 1})"
                todo = steps_to_run(seg)
                if todo == 0:
                    stats.reused.append(seg.index)
                    continue
                rebuild = seg.index in done
                if seg.kind not in (ANCHOR, BASE):
                    renderer.release_kv()
                task = progress.add_task(("rebuilding K/V of " if rebuild else "") + label, total=todo, unit="steps")

                def on_step(count: int, task: int = task) -> None:
                    progress.update(task, completed=count)
                    progress.advance(overall, 1)

                indices = segment_frame_indices(seg, total_frames)
                pose_frames, hand_frames = pose.read(indices), hand.read(indices)
                began = time.perf_counter()
                if seg.kind == ANCHOR:
                    frames = renderer.render_anchor(pose_frames, hand_frames, on_step, record=bases_left, frames_needed=not rebuild)
                elif seg.kind == BASE:
                    frames = renderer.render_base(pose_frames, hand_frames, on_step)
                else:
                    before = work.load_segment(seg.index - 1)[-head:]
                    after = work.load_segment(seg.index + 1)[:tail]
                    frames = renderer.render_transition(pose_frames, hand_frames, np.asarray(before), np.asarray(after), on_step)
                seconds = time.perf_counter() - began
                progress.remove_task(task)
                if rebuild:
                    stats.rebuilt_anchor = True
                    stats.reused.append(seg.index)
                    continue
                assert frames is not None
                if compat_mp4:
                    frames = release_mp4_roundtrip(frames, work.path)
                work.save_segment(seg.index, frames, seconds)
                stats.computed.append(seg.index)
                stats.seconds[seg.index] = seconds
                if after_segment is not None:
                    after_segment(seg)
    finally:
        renderer.release_kv()
    return stats

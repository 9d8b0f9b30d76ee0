"""Generating a plan's segments in order, with the anchor's K/V alive exactly while base segments need it.

Order and lifecycle: the anchor records K/V (and its subject mask) while it denoises; every other base replays
them; the cache is released before the first transition (transitions share nothing) and in any case when the
job ends, error or not. Finished segments come from the work folder instead of being generated again; when the
anchor is finished but some base is not, the anchor is re-run only as far as its last shared step to rebuild
the cache, its frames being on disk already.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from rich.progress import Progress, TaskID

from posegen_cli.longvideo.plan import ANCHOR, BASE, Segment, segment_frame_indices
from posegen_cli.longvideo.sources import FrameReader
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.report import Reporter, duration_text, set_eta
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
        self,
        pose: np.ndarray,
        hand: np.ndarray,
        on_step: ProgressCallback,
        *,
        record: bool,
        frames_needed: bool = True,
        negative_pose: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """Denoise the anchor, keeping its K/V if ``record``; with ``frames_needed=False`` stop after the last shared step.

        ``negative_pose`` (every method): the negative guidance branch's pose frames (camera pattern), its hand
        condition then black; None: both branches get ``pose`` and ``hand``.
        """
        ...

    def anchor_steps(self) -> int:
        """Denoising steps needed to rebuild the cache (the last shared step + 1; 0 when nothing is shared)."""
        ...

    def render_base(
        self, pose: np.ndarray, hand: np.ndarray, on_step: ProgressCallback, *, negative_pose: np.ndarray | None = None
    ) -> np.ndarray: ...

    def render_transition(
        self,
        pose: np.ndarray,
        hand: np.ndarray,
        head: np.ndarray,
        tail: np.ndarray,
        on_step: ProgressCallback,
        *,
        negative_pose: np.ndarray | None = None,
    ) -> np.ndarray: ...

    def release_kv(self) -> None:
        """Free the anchor's K/V (safe to call when none is held)."""
        ...


def release_mp4_roundtrip(frames: np.ndarray, folder: Path) -> np.ndarray:
    """``frames`` as the release's later stages see them: saved as its segment mp4, then decoded again.

    The release conditions each transition on, and merges, the decoded mp4 files of its segments (port spec §6,
    §7.11); ``compat_mp4`` stores these lossy frames instead of the exact ones.
    """
    path = write_video(folder / f"roundtrip-{os.getpid()}.mp4", frames, RELEASE_FPS, crf=RELEASE_CRF)  # one per process
    try:
        return np.stack(list(iter_frames(path)))
    finally:
        path.unlink(missing_ok=True)


def stored_frames(frames: np.ndarray, compat_mp4: bool, folder: Path) -> np.ndarray:
    """What the work folder keeps of a generated segment: the frames, or their release mp4 round trip."""
    return release_mp4_roundtrip(frames, folder) if compat_mp4 else frames


@dataclass
class SegmentStats:
    """What a run of the segment phase did: indices generated and reused, and seconds per generated segment."""

    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    rebuilt_anchor: bool = False
    seconds: dict[int, float] = field(default_factory=dict)


PHASES = ("encoding conditions", "denoising", "decoding", "storing")
"""What one segment goes through; each counts in the progress, denoising once per step."""


def segment_units(steps: int, rebuild: bool) -> int:
    """Progress units of a segment that runs ``steps`` denoising steps: one per step, one per other phase.

    A K/V rebuild encodes its conditions and denoises, but decodes and stores nothing.
    """
    return steps + (1 if rebuild else len(PHASES) - 1)


@dataclass
class SegmentClock:
    """Time left for a job's segments, from what whole segments (every phase, not only denoising) took.

    A segment's weight is the share of a full segment's denoising steps it runs: 1 for a segment generated
    whole, ``anchor_steps / num_steps`` for a K/V rebuild. Once any segment is timed (in this run, or stored by an
    earlier run of the same job), the estimate is measured seconds per unit of weight times the weight left.
    Before that only the denoising rate is known: the estimate is the denoising time left, a lower bound.
    """

    seconds: float = 0.0
    weight: float = 0.0

    def record(self, weight: float, seconds: float) -> None:
        self.seconds += seconds
        self.weight += weight

    @property
    def per_segment(self) -> float | None:
        """Measured seconds of one full segment, or None before any is timed."""
        return self.seconds / self.weight if self.weight > 0 else None

    def remaining(
        self, weight_after: float, current_weight: float, current_elapsed: float, step_seconds: float | None, steps_left: int, num_steps: int
    ) -> tuple[float | None, bool]:
        """(seconds left, whether it is only a lower bound); None when nothing has been timed yet.

        ``weight_after`` is the weight of the segments after the current one, ``steps_left`` the current
        segment's denoising steps still to run and ``step_seconds`` the measured time of one step.
        """
        per_segment = self.per_segment
        if per_segment is not None:
            return max(current_weight * per_segment - current_elapsed, 0.0) + weight_after * per_segment, False
        if step_seconds is None:
            return None, True
        return (steps_left + weight_after * num_steps) * step_seconds, True


@dataclass
class _SegmentProgress:
    """The bars of one segment while it runs: its own task and the overall one, with the phase in both descriptions."""

    progress: Progress
    overall: TaskID
    task: TaskID
    label: str
    clock: SegmentClock
    steps: int
    num_steps: int
    rebuild: bool
    weight: float
    weight_after: float
    position: str
    began: float = field(default_factory=time.perf_counter)
    step_times: list[float] = field(default_factory=list)

    def show(self, phase: str) -> None:
        self.progress.update(self.task, description=f"{self.label} › {phase}")
        self.progress.update(self.overall, description=f"all segments ({self.position}: {phase})")
        steps_done = len(self.step_times)
        step_seconds = (self.step_times[-1] - self.began) / steps_done if steps_done else None
        elapsed = time.perf_counter() - self.began
        eta = self.clock.remaining(self.weight_after, self.weight, elapsed, step_seconds, self.steps - steps_done, self.num_steps)
        set_eta(self.progress, self.overall, *eta)

    def advance(self) -> None:
        self.progress.advance(self.task)
        self.progress.advance(self.overall)

    def on_step(self, count: int) -> None:
        self.step_times.append(time.perf_counter())
        self.advance()
        self.show(f"denoising {count}/{self.steps}" if count < self.steps or self.rebuild else "decoding")


class PhaseReport(Protocol):
    """Where :func:`generate_segment` reports a segment's progress: the phase it enters, each unit done, each step."""

    def show(self, phase: str) -> None: ...

    def advance(self) -> None: ...

    def on_step(self, count: int) -> None: ...


def generate_segment(
    seg: Segment,
    renderer: SegmentRenderer,
    sources: tuple[FrameReader, FrameReader] | tuple[FrameReader, FrameReader, FrameReader],
    work: WorkDir,
    *,
    total_frames: int,
    overlap: tuple[int, int],
    record_kv: bool,
    rebuild: bool,
    compat_mp4: bool,
    phases: PhaseReport,
) -> np.ndarray | None:
    """Run one segment through every phase (:data:`PHASES`) and write its file; the stored uint8 frames [F, H, W, 3],
    or None for a K/V rebuild (the anchor re-run to its last shared step: nothing decoded or written).

    ``sources``: the pose and hand conditioning frames (by driving-frame index) and, optionally third, the negative
    guidance branch's pose frames (the camera pattern, by timeline position ``seg.start`` … ``seg.stop - 1``);
    ``overlap``: (head, tail). The anchor records its K/V when ``record_kv``; a transition reads its neighbours'
    frames from ``work``, so both must be stored. The file is written atomically but not recorded: the caller records
    it (``WorkDir.record_segment``), since only one process may write the record. Every executor (this process or a
    Ray worker) generates a segment through this one function; ``phases`` gets one unit per phase and per step.
    """
    pose, hand, *negative_source = sources
    camera = negative_source[0] if negative_source else None
    head, tail = overlap
    phases.show(PHASES[0])
    indices = segment_frame_indices(seg, total_frames)
    pose_frames, hand_frames = pose.read(indices), hand.read(indices)
    negative = None if camera is None else camera.read(np.arange(seg.start, seg.stop))
    phases.advance()  # the conditions are encoded inside the renderer's call, before its first step
    if seg.kind == ANCHOR:
        frames = renderer.render_anchor(
            pose_frames, hand_frames, phases.on_step, record=record_kv, frames_needed=not rebuild, negative_pose=negative
        )
    elif seg.kind == BASE:
        frames = renderer.render_base(pose_frames, hand_frames, phases.on_step, negative_pose=negative)
    else:
        before = work.load_segment(seg.index - 1)[-head:]
        after = work.load_segment(seg.index + 1)[:tail]
        frames = renderer.render_transition(
            pose_frames, hand_frames, np.asarray(before), np.asarray(after), phases.on_step, negative_pose=negative
        )
    if rebuild:
        return None
    phases.advance()  # decoded
    phases.show(PHASES[3])
    assert frames is not None
    frames = stored_frames(frames, compat_mp4, work.path)
    work.write_segment(seg.index, frames)
    phases.advance()
    return frames


def finished_segments(plan: list[Segment], work: WorkDir, frame_shape: tuple[int, int]) -> set[int]:
    """Indices of ``plan`` stored complete, unchanged and of the right shape in ``work`` (``frame_shape``: (H, W))."""
    shape_of = {seg.index: (seg.frames, *frame_shape, 3) for seg in plan}
    return {index for index, shape in work.finished().items() if shape_of.get(index) == shape}


def bases_pending(plan: list[Segment], done: set[int]) -> bool:
    """Whether some base segment (not the anchor) is not stored yet: the anchor's K/V is still needed."""
    return any(seg.kind == BASE and seg.index not in done for seg in plan)


def seeded_clock(work: WorkDir, done: set[int]) -> SegmentClock:
    """A :class:`SegmentClock` that already knows the times an earlier run of this job measured for ``done``."""
    clock = SegmentClock()
    measured = work.segment_seconds()
    for index in done:
        if index in measured:
            clock.record(1.0, measured[index])
    return clock


def report_resume(plan: list[Segment], done: set[int], work: WorkDir, anchor_steps: int, num_steps: int, reporter: Reporter) -> None:
    """Say what a resumed job reuses and what its K/V rebuild costs (:func:`resume_notice`); nothing for a fresh job."""
    if not done:
        return
    anchor = next((seg for seg in plan if seg.kind == ANCHOR), None)
    rebuild_steps = anchor_steps if anchor is not None and anchor.index in done and bases_pending(plan, done) else 0
    seconds = work.segment_seconds().get(anchor.index) if anchor is not None else None
    reporter.info(resume_notice(len(done), len(plan), rebuild_steps, num_steps, seconds))


def resume_notice(done: int, total: int, rebuild_steps: int, num_steps: int, anchor_seconds: float | None) -> str:
    """What a resumed job reuses, and what rebuilding the anchor's K/V (never stored: it is gigabytes) costs."""
    text = f"resuming: {done} of {total} segments are finished and reused"
    if rebuild_steps:
        cost = f", about {duration_text(anchor_seconds * rebuild_steps / num_steps)} by its last run" if anchor_seconds else ""
        text += (
            f"; the anchor's K/V is not stored, so the anchor is re-run for {rebuild_steps} of its {num_steps} denoising "
            f"steps to rebuild it before the remaining base segments (no decoding{cost})"
        )
    return text


def render_segments(
    plan: list[Segment],
    renderer: SegmentRenderer,
    sources: tuple[FrameReader, FrameReader] | tuple[FrameReader, FrameReader, FrameReader],
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

    ``sources`` give the pose and hand conditioning frames (by driving-frame index) and, optionally third, the
    negative guidance branch's pose frames (the camera pattern, by timeline position ``segment.start`` …
    ``segment.stop - 1``); ``overlap`` is (head, tail), the frames a transition takes from its neighbours;
    ``frame_shape`` is (height, width).

    ``compat_mp4`` stores each segment as the release's mp4 round trip would give it back. ``after_segment`` runs
    once each segment is safely stored (progress hooks, and crash injection in tests). Progress counts every
    phase of every segment still to run (:data:`PHASES`), shows the current one, and estimates the time left with
    a :class:`SegmentClock` seeded with the segment times an earlier run of the same job stored.
    """
    stats = SegmentStats()
    done = finished_segments(plan, work, frame_shape)
    anchor_needed = bases_pending(plan, done)
    num_steps = renderer.num_steps

    def steps_to_run(seg: Segment) -> int:
        """Denoising steps ``seg`` still needs: all, the anchor's shared ones to rebuild the K/V, or none."""
        if seg.index not in done:
            return num_steps
        return renderer.anchor_steps() if seg.kind == ANCHOR and anchor_needed else 0

    todo = [seg for seg in plan if steps_to_run(seg)]
    clock = seeded_clock(work, done)
    report_resume(plan, done, work, renderer.anchor_steps(), num_steps, reporter)

    try:
        with reporter.progress() as progress:
            # reused segments are not counted, so the overall progress and ETA of a resumed job are those of its real work
            units = sum(segment_units(steps_to_run(seg), seg.index in done) for seg in todo)
            overall = progress.add_task("all segments", total=units, unit="")
            weights = [steps_to_run(seg) / num_steps for seg in todo]
            for position, seg in enumerate(todo):
                rebuild = seg.index in done
                steps = steps_to_run(seg)
                label = f"segment {seg.index} ({seg.kind}, frames {seg.start}-{seg.stop - 1}" + (", K/V rebuild)" if rebuild else ")")
                if seg.kind not in (ANCHOR, BASE):
                    renderer.release_kv()
                task = progress.add_task(label, total=segment_units(steps, rebuild), unit="")
                tracker = _SegmentProgress(progress, overall, task, label, clock, steps, num_steps, rebuild,
                                           weights[position], sum(weights[position + 1 :]), f"{position + 1}/{len(todo)}")  # fmt: skip
                frames = generate_segment(
                    seg, renderer, sources, work, total_frames=total_frames, overlap=overlap, record_kv=anchor_needed,
                    rebuild=rebuild, compat_mp4=compat_mp4, phases=tracker,
                )  # fmt: skip
                seconds = time.perf_counter() - tracker.began
                clock.record(weights[position], seconds)
                progress.remove_task(task)
                if frames is None:
                    stats.rebuilt_anchor = True
                    continue
                work.record_segment(seg.index, frames.shape, seconds)
                reporter.info(f"{label}: done in {duration_text(seconds)}")
                stats.computed.append(seg.index)
                stats.seconds[seg.index] = seconds
                if after_segment is not None:
                    after_segment(seg)
            stats.reused = [seg.index for seg in plan if seg.index in done]
    finally:
        renderer.release_kv()
    return stats

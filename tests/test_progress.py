"""Honest progress: every phase of a segment counts, the sub-stage is shown, ETAs come from measured segment times."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from test_resume import NoiseRenderer, RecordingReporter

from posegen_cli.longvideo.plan import plan_segments
from posegen_cli.longvideo.segments import SegmentClock, render_segments, resume_notice, segment_units
from posegen_cli.longvideo.sources import FrameSource
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.report import Reporter, duration_text
from posegen_cli.video import write_video


class WatchingRenderer(NoiseRenderer):
    """Two denoising steps, then a "decode" that sleeps; records what the bars showed after the last step."""

    num_steps = 2

    def __init__(self, displays: list, decode_seconds: float = 0.0) -> None:
        super().__init__()
        self.displays = displays
        self.decode_seconds = decode_seconds
        self.after_last_step: list[tuple[str, float, float, str, float, float]] = []

    def _frames(self, pose: np.ndarray, on_step, steps: int | None = None) -> np.ndarray:
        for step in range(steps or self.num_steps):
            on_step(step + 1)
        if self.displays:
            overall, segment = self.displays[-1].tasks[0], self.displays[-1].tasks[-1]
            shown = (segment.description, segment.completed, segment.total, overall.description, overall.completed, overall.total)
            self.after_last_step.append(shown)
        time.sleep(self.decode_seconds)
        return np.zeros((len(pose), *pose.shape[1:]), np.uint8)


def recording_reporter(**kwargs: object) -> RecordingReporter:
    """test_resume's RecordingReporter (quiet), or one that prints to the console given in ``kwargs``."""
    reporter = RecordingReporter()
    for name, value in kwargs.items():
        setattr(reporter, name, value)
    reporter.quiet = "console" not in kwargs
    return reporter


@pytest.fixture()
def job(tmp_path: Path):
    size = (16, 16)
    pose_video = write_video(tmp_path / "pose.mp4", [np.full((*size, 3), 9 * i, np.uint8) for i in range(40)], 30, lossless=True)
    plan = plan_segments(40, 13, 5, 4)
    work = WorkDir.for_job([pose_video], {}, tmp_path / "work")

    def run(reporter: Reporter, renderer: WatchingRenderer) -> None:
        sources = FrameSource(pose_video, size), FrameSource(pose_video, size)
        render_segments(plan, renderer, sources, work, total_frames=40, frame_shape=size, overlap=(5, 4), reporter=reporter)

    return plan, work, run


def test_the_bars_count_decoding_and_storing_and_name_the_phase(job) -> None:
    _, _, run = job
    reporter = recording_reporter()
    renderer = WatchingRenderer(reporter.displays)
    run(reporter, renderer)
    first = renderer.after_last_step[0]
    # after the last denoising step the segment is decoding, and its bar is not full: decode and store are left
    assert first[0] == "segment 0 (anchor, frames 0-12) › decoding"
    assert (first[1], first[2]) == (3, 5) == (1 + 2, segment_units(2, rebuild=False))
    assert first[3] == "all segments (1/5: decoding)" and (first[4], first[5]) == (3, 25)


def test_overall_eta_comes_from_measured_segment_times(job) -> None:
    _, work, run = job
    reporter = recording_reporter()
    renderer = WatchingRenderer(reporter.displays, decode_seconds=0.2)
    run(reporter, renderer)
    overall = reporter.displays[-1].tasks[0]
    # during the last segment, the estimate was measured whole-segment time (decode included), not a lower bound
    assert overall.fields["eta_lower_bound"] is False
    measured = sum(work.segment_seconds().values()) / 5
    assert measured >= 0.2


def test_segment_clock() -> None:
    clock = SegmentClock()
    # nothing timed: the denoising time left (2 steps of this segment + 3 segments of 10), flagged as a lower bound
    assert clock.remaining(3.0, 1.0, 5.0, 1.5, 2, 10) == (pytest.approx(48.0), True)
    assert clock.remaining(3.0, 1.0, 5.0, None, 2, 10) == (None, True)
    clock.record(1.0, 100.0)  # a whole segment: encode + 10 steps + decode + store
    clock.record(0.2, 20.0)  # a K/V rebuild: 2 of 10 steps
    assert clock.per_segment == pytest.approx(100.0)
    assert clock.remaining(3.0, 1.0, 40.0, 1.5, 2, 10) == (pytest.approx(60.0 + 300.0), False)


def test_resume_says_what_it_reuses_and_what_the_kv_rebuild_costs(job) -> None:
    _, work, run = job
    run(Reporter(quiet=True), WatchingRenderer([]))
    work.segment_path(4).unlink()  # a base segment lost: the anchor's K/V must be rebuilt for it
    buffer = io.StringIO()
    reporter = recording_reporter(console=Console(file=buffer, width=60, force_terminal=False), log_interval=60)
    run(reporter, WatchingRenderer(reporter.displays))
    anchor_seconds = work.segment_seconds()[0]
    assert buffer.getvalue().splitlines()[0] == (
        "resuming: 4 of 5 segments are finished and reused; the anchor's K/V is not stored, so the anchor is re-run for 1 of "
        f"its 2 denoising steps to rebuild it before the remaining base segments (no decoding, about {duration_text(anchor_seconds / 2)} "
        "by its last run)"
    )
    assert resume_notice(3, 5, 0, 25, None) == "resuming: 3 of 5 segments are finished and reused"


def test_logs_get_full_lines_at_a_steady_cadence() -> None:
    buffer = io.StringIO()
    reporter = Reporter(console=Console(file=buffer, width=40, force_terminal=False), log_interval=0.1)
    description = "segment 12 (transition, frames 1200-1280) › denoising"
    with reporter.progress() as progress:
        task = progress.add_task(description, total=25, unit="steps")
        for _ in range(4):
            progress.advance(task)
            time.sleep(0.15)
        time.sleep(0.4)  # nothing changes: nothing more is printed
    lines = [line for line in buffer.getvalue().splitlines() if line]
    assert 2 <= len(lines) <= 4, lines  # one a cadence while it moves (a loaded machine may skip one), never a wrapped fragment
    assert all(line.startswith(f"{description}: ") and line.endswith(")") for line in lines), lines
    assert lines[-1].startswith(f"{description}: 4/25 (16%, ")
    assert len(set(lines)) == len(lines)  # each line once


def test_duration_text() -> None:
    assert [duration_text(s) for s in (0.4, 59, 60, 605, 3600, 7380)] == ["0 s", "59 s", "1 min", "10 min 5 s", "1 h", "2 h 3 min"]

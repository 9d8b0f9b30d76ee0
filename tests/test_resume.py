"""Resume: finished segments survive a crash, are never generated again, and the result equals an uninterrupted run.

Also the K/V cache's lifecycle: recorded by the anchor, replayed by the bases, released before the transitions and
when the job ends, even when it ends by an exception.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from animate_inputs import TEST_OPTIONS

import posegen_cli
from posegen_cli.errors import ResourceError
from posegen_cli.longvideo import AnimateOptions, animate
from posegen_cli.longvideo import renderer as renderer_module
from posegen_cli.longvideo.plan import Segment, plan_segments
from posegen_cli.longvideo.segments import release_mp4_roundtrip, render_segments
from posegen_cli.longvideo.sources import FrameSource
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.models import KVShareCache
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline
from posegen_cli.report import Reporter
from posegen_cli.video import iter_frames, write_video

torch.set_num_threads(1)


GENERATION_ORDER = [0, 2, 4, 1, 3]


def test_work_folder_round_trip_and_keys(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"reference")
    b.write_bytes(b"driving")
    work = WorkDir.for_job([a, b], {"steps": 25}, tmp_path / "work")
    assert work.finished() == {}
    frames = np.random.default_rng(0).integers(0, 256, (13, 16, 8, 3), dtype=np.uint8)
    work.save_segment(3, frames, 1.5)
    again = WorkDir.for_job([a, b], {"steps": 25}, tmp_path / "work")
    assert again.path == work.path
    assert again.finished() == {3: (13, 16, 8, 3)}
    np.testing.assert_array_equal(again.load_segment(3), frames)
    # another setting or another input file content gives another folder
    assert WorkDir.for_job([a, b], {"steps": 24}, tmp_path / "work").path != work.path
    b.write_bytes(b"driving, edited")
    assert WorkDir.for_job([a, b], {"steps": 25}, tmp_path / "work").path != work.path
    # a segment file without its manifest entry (crash between the two writes) is not finished
    np.save(work.segment_path(5), frames)
    assert set(work.finished()) == {3}
    # a recorded segment whose file vanished is not finished either
    work.segment_path(3).unlink()
    assert work.finished() == {}


def test_disk_full_is_a_resource_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = tmp_path / "a.bin"
    a.write_bytes(b"x")
    work = WorkDir.for_job([a], {}, tmp_path / "work")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(ResourceError, match="disk full while writing .*segment-0000.npy"):
        work.save_segment(0, np.zeros((1, 2, 2, 3), np.uint8), 0.0)
    assert sorted(p.name for p in work.path.iterdir()) == ["manifest.json"]


class Crash(Exception):
    """Stands in for a killed process after some segments."""


def test_resume_after_a_crash(
    tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caches: list[KVShareCache] = []
    calls: list[str] = []
    real_call = PoseGenPipeline.__call__

    class SpyCache(KVShareCache):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            caches.append(self)

    def counting_call(self: PoseGenPipeline, **kwargs: object) -> np.ndarray:
        calls.append("transition" if kwargs.get("head_frames") is not None else "base")
        return real_call(self, **kwargs)

    monkeypatch.setattr(renderer_module, "KVShareCache", SpyCache)
    monkeypatch.setattr(PoseGenPipeline, "__call__", counting_call)

    seen: list[tuple[int, str, int]] = []

    def crash_after_two(seg: Segment) -> None:
        cache = caches[-1]
        seen.append((seg.index, cache.mode, cache.nbytes))
        if len(seen) == 2:
            raise Crash

    output = tmp_path / "out.mp4"
    options = AnimateOptions(**TEST_OPTIONS, models_dir=tiny_models, shot="half-body", keep_intermediates=True)
    with pytest.raises(Crash):
        animate(reference_image_path, driving_clip, output, options=options, reporter=Reporter(quiet=True), after_segment=crash_after_two)
    # the anchor recorded K/V and the second base replayed them; the crash released the cache
    assert [(i, mode) for i, mode, _ in seen] == [(0, "replay"), (2, "replay")]
    assert seen[0][2] > 0
    assert [c.mode for c in caches] == ["released"] and caches[0].nbytes == 0
    assert not output.exists() and not list(tmp_path.glob(".out*"))
    assert calls == ["base", "base"]

    # the same command again: segments 0 and 2 are reused; the anchor is re-run only up to its shared step
    calls.clear()
    seen.clear()
    order: list[int] = []
    modes: dict[int, str] = {}

    def record(seg: Segment) -> None:
        order.append(seg.index)
        modes[seg.index] = caches[-1].mode

    result = animate(reference_image_path, driving_clip, output, options=options, reporter=Reporter(quiet=True), after_segment=record)
    assert order == [4, 1, 3]
    assert sorted(result.reused) == [0, 2] and result.computed == [4, 1, 3]
    assert calls == ["base", "base", "transition", "transition"]
    assert modes == {4: "replay", 1: "released", 3: "released"}
    assert all(c.mode == "released" and c.nbytes == 0 for c in caches)
    assert len(caches) == 2

    # an uninterrupted run in a fresh work folder generates all five and gives the same segments and video
    calls.clear()
    fresh_out = tmp_path / "fresh.mp4"
    fresh_options = AnimateOptions(
        **TEST_OPTIONS, models_dir=tiny_models, shot="half-body", keep_intermediates=True, work_dir=tmp_path / "fresh-work"
    )
    fresh = animate(reference_image_path, driving_clip, fresh_out, options=fresh_options, reporter=Reporter(quiet=True))
    assert fresh.computed == GENERATION_ORDER and fresh.reused == []
    assert calls == ["base"] * 3 + ["transition"] * 2
    assert result.work_dir is not None and fresh.work_dir is not None
    for index in range(5):
        resumed_seg = np.load(result.work_dir / f"segment-{index:04d}.npy")
        fresh_seg = np.load(fresh.work_dir / f"segment-{index:04d}.npy")
        np.testing.assert_array_equal(resumed_seg, fresh_seg)
    np.testing.assert_array_equal(np.stack(list(iter_frames(output))), np.stack(list(iter_frames(fresh_out))))

    # a third run of a finished job generates nothing
    calls.clear()
    again = animate(reference_image_path, driving_clip, output, options=options, reporter=Reporter(quiet=True))
    assert again.computed == [] and sorted(again.reused) == [0, 1, 2, 3, 4] and calls == []


KILLED_WHILE_ENCODING = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from posegen_cli.longvideo import AnimateOptions, animate, engine
from posegen_cli.report import Reporter

real_merge = engine.iter_merged

def merge_then_get_killed(*args):
    for count, frame in enumerate(real_merge(*args)):
        if count == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        yield frame

engine.iter_merged = merge_then_get_killed
reference, driving, output, options = sys.argv[2:]
try:
    animate(Path(reference), Path(driving), Path(output), options=AnimateOptions(**json.loads(options)), reporter=Reporter(quiet=True))
except KeyboardInterrupt:
    print("interrupted", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    sys.exit(130)
"""


def test_kill_cleans_up_like_ctrl_c(tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path) -> None:
    """``kill`` (SIGTERM) mid-encode: no partial output is left, the segments are kept, and the next run resumes."""
    output = tmp_path / "out" / "video.mp4"
    output.parent.mkdir()
    work_root = tmp_path / "work"
    settings = {**TEST_OPTIONS, "models_dir": str(tiny_models), "shot": "half-body", "work_dir": str(work_root)}
    source_root = str(Path(posegen_cli.__file__).resolve().parents[1])
    args = [source_root, str(reference_image_path), str(driving_clip), str(output), json.dumps(settings)]
    run = subprocess.run([sys.executable, "-c", KILLED_WHILE_ENCODING, *args], check=False, capture_output=True, text=True)
    assert run.returncode == 130, run.stderr[-2000:]
    # the default SIGTERM action is back once animate returns
    assert run.stdout.split() == ["interrupted", "True"]
    assert list(output.parent.iterdir()) == []
    (work,) = work_root.iterdir()
    assert sorted(p.name for p in work.glob("segment-*.npy")) == [f"segment-{i:04d}.npy" for i in range(5)]
    assert not list(work.glob(".*partial*"))
    options = AnimateOptions(**{**settings, "models_dir": tiny_models, "work_dir": work_root})
    result = animate(reference_image_path, driving_clip, output, options=options, reporter=Reporter(quiet=True))
    assert result.computed == [] and len(result.reused) == 5 and output.exists()


class NoiseRenderer:
    """Stands in for the models: each segment is seeded noise; transitions record the head and tail they are given."""

    num_steps = 1

    def __init__(self) -> None:
        self.calls = 0
        self.outputs: list[np.ndarray] = []
        self.heads: list[np.ndarray] = []
        self.tails: list[np.ndarray] = []

    def _frames(self, pose: np.ndarray, on_step, steps: int | None = None) -> np.ndarray:
        self.calls += 1
        for step in range(steps or self.num_steps):
            on_step(step + 1)
        rng = np.random.default_rng(self.calls)
        # smooth colour fields, so H.264 changes them a little, not beyond recognition
        frames = np.clip(pose.astype(np.int16) // 2 + rng.integers(0, 64, (len(pose), 1, 1, 3)), 0, 255).astype(np.uint8)
        self.outputs.append(frames)
        return frames

    def render_anchor(self, pose, hand, on_step, *, record, frames_needed=True):
        return self._frames(pose, on_step, None if frames_needed else self.anchor_steps())

    def anchor_steps(self) -> int:
        return 1

    def render_base(self, pose, hand, on_step):
        return self._frames(pose, on_step)

    def render_transition(self, pose, hand, head, tail, on_step):
        self.heads.append(head)
        self.tails.append(tail)
        return self._frames(pose, on_step)

    def release_kv(self) -> None:
        pass


@pytest.mark.parametrize("compat_mp4", [False, True])
def test_compat_mp4_conditions_and_merges_decoded_segments(tmp_path: Path, compat_mp4: bool) -> None:
    """``--compat-mp4``: as in the release, transitions see, and the merge reads, the segments' decoded CRF-5 mp4s."""
    size = (32, 48)
    gradient = np.linspace(0, 255, size[0] * size[1] * 3).reshape(*size, 3).astype(np.uint8)
    pose_video = write_video(tmp_path / "pose.mp4", [np.roll(gradient, i, axis=1) for i in range(40)], 30, lossless=True)
    plan = plan_segments(40, 13, 5, 4)
    work = WorkDir.for_job([pose_video], {"compat_mp4": compat_mp4}, tmp_path / "work")
    renderer = NoiseRenderer()
    sources = FrameSource(pose_video, size), FrameSource(pose_video, size)
    render_segments(
        plan, renderer, sources, work, total_frames=40, frame_shape=size, overlap=(5, 4), reporter=Reporter(quiet=True),
        compat_mp4=compat_mp4,
    )  # fmt: skip
    stored = {index: np.asarray(work.load_segment(index)) for index in range(5)}
    exact = {seg.index: frames for seg, frames in zip(plan, renderer.outputs)}
    for index, frames in stored.items():
        assert frames.shape == (13, *size, 3)
        if compat_mp4:
            # what is stored (and so merged) is the mp4 round trip: close to what was rendered, but not equal
            np.testing.assert_array_equal(frames, release_mp4_roundtrip(exact[index], tmp_path))
            assert not np.array_equal(frames, exact[index])
            assert np.abs(frames.astype(int) - exact[index]).mean() < 4
        else:
            np.testing.assert_array_equal(frames, exact[index])
    for heads, tails, (before, after) in zip(renderer.heads, renderer.tails, [(0, 2), (2, 4)]):
        np.testing.assert_array_equal(heads, stored[before][-5:])
        np.testing.assert_array_equal(tails, stored[after][:4])


class RecordingReporter(Reporter):
    """A quiet reporter that keeps each progress display, to read its tasks afterwards."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.displays: list = []

    @contextlib.contextmanager
    def progress(self):
        with super().progress() as display:
            self.displays.append(display)
            yield display


def test_overall_progress_counts_only_the_work_left(tmp_path: Path) -> None:
    """A resumed job's overall bar (and so its rate and ETA) covers only the steps it still has to run."""
    size = (16, 16)
    pose_video = write_video(tmp_path / "pose.mp4", [np.full((*size, 3), 9 * i, np.uint8) for i in range(40)], 30, lossless=True)
    plan = plan_segments(40, 13, 5, 4)
    work = WorkDir.for_job([pose_video], {}, tmp_path / "work")

    def run(renderer: NoiseRenderer) -> tuple[float | None, float]:
        reporter = RecordingReporter()
        sources = FrameSource(pose_video, size), FrameSource(pose_video, size)
        render_segments(plan, renderer, sources, work, total_frames=40, frame_shape=size, overlap=(5, 4), reporter=reporter)
        overall = reporter.displays[-1].tasks[0]
        return overall.total, overall.completed

    first = NoiseRenderer()
    first.num_steps = 3
    assert run(first) == (15, 15)
    # transition 3 lost: 3 steps left
    work.segment_path(3).unlink()
    again = NoiseRenderer()
    again.num_steps = 3
    assert run(again) == (3, 3)
    # base 4 lost too: it and the anchor's K/V rebuild (anchor_steps = 1), then the transition
    work.segment_path(4).unlink()
    work.segment_path(3).unlink()
    third = NoiseRenderer()
    third.num_steps = 3
    assert run(third) == (7, 7)

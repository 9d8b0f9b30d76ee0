"""Resume: finished segments survive a crash, are never generated again, and the result equals an uninterrupted run.

Also the K/V cache's lifecycle: recorded by the anchor, replayed by the bases, released before the transitions and
when the job ends, even when it ends by an exception.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from animate_inputs import DRIVING_FRAMES, TEST_OPTIONS, make_driving_clip

from posegen_cli.errors import ResourceError
from posegen_cli.longvideo import AnimateOptions, animate
from posegen_cli.longvideo import renderer as renderer_module
from posegen_cli.longvideo.plan import Segment
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.models import KVShareCache
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline
from posegen_cli.report import Reporter
from posegen_cli.testing import make_tiny_models
from posegen_cli.video import iter_frames

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def driving_clip(tmp_path_factory: pytest.TempPathFactory, reference_image_path: Path) -> Path:
    return make_driving_clip(reference_image_path, tmp_path_factory.mktemp("driving") / "driving.mp4", DRIVING_FRAMES)


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

"""The cache belongs to posegen, the outputs to the user: copies not links, digests checked, umask honoured."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from posegen_cli.cache import CacheEntry, Record, cache_root
from posegen_cli.fsutil import atomic_dir, atomic_path, copy_file, copy_tree
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.pose.extract import extract_pose
from posegen_cli.pose.keypoints import KeypointTrack, load_npz, save_npz
from posegen_cli.pose.types import NUM_KEYPOINTS
from posegen_cli.report import Reporter
from posegen_cli.video import write_video


@pytest.fixture()
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture()
def clip_and_keypoints(tmp_path: Path) -> tuple[Path, Path]:
    """A 6-frame 64x112 video and keypoints for it: extract-pose renders them without any detector."""
    video = write_video(tmp_path / "clip.mp4", [np.full((112, 64, 3), 20 * i, np.uint8) for i in range(6)], 12)
    rng = np.random.default_rng(0)
    track = KeypointTrack(rng.uniform(5, 60, (6, NUM_KEYPOINTS, 2)), np.ones((6, NUM_KEYPOINTS)), Fraction(12), 64, 112, "test")
    return video, save_npz(track, tmp_path / "given.npz")


def test_outputs_are_copies_that_do_not_change_the_cache(tmp_path: Path, clip_and_keypoints: tuple[Path, Path], umask_022: None) -> None:
    video, given = clip_and_keypoints
    quiet = Reporter(quiet=True)
    first = extract_pose(video, tmp_path / "out1", from_keypoints=given, reporter=quiet)
    assert not first.cached
    original = load_npz(first.keypoints).keypoints
    cached_file = next((cache_root() / "pose").glob(f"*/{first.keypoints.name}"))
    assert os.stat(first.keypoints).st_ino != os.stat(cached_file).st_ino
    assert os.stat(first.keypoints).st_nlink == 1  # not a hard link into the cache

    # the user edits their keypoints in place: 50 px to the right
    edited = load_npz(first.keypoints)
    save_npz(KeypointTrack(edited.keypoints + 50, edited.scores, edited.fps, edited.width, edited.height, edited.backend), first.keypoints)
    second = extract_pose(video, tmp_path / "out2", from_keypoints=given, reporter=quiet)
    assert second.cached
    np.testing.assert_array_equal(load_npz(second.keypoints).keypoints, original)

    # outputs get the umask's permissions like any tool's files (not tempfile's 0600 / 0700)
    for path in (second.keypoints, second.pose_video, second.hand_video, second.overlay):
        assert _mode(path) == 0o644, path
    assert _mode(tmp_path / "out2") == 0o755


def test_a_changed_cache_entry_is_detected_and_rebuilt(tmp_path: Path, clip_and_keypoints: tuple[Path, Path]) -> None:
    video, given = clip_and_keypoints
    reporter = Reporter(quiet=True)
    first = extract_pose(video, tmp_path / "out1", from_keypoints=given, reporter=reporter)
    cached_file = next((cache_root() / "pose").glob(f"*/{first.pose_video.name}"))
    cached_file.write_bytes(cached_file.read_bytes()[:-100])  # truncated behind posegen's back
    reporter.console.begin_capture()
    again = extract_pose(video, tmp_path / "out2", from_keypoints=given, reporter=reporter)
    text = reporter.console.end_capture()
    assert not again.cached
    assert "warning: pose outputs in the cache had changed since they were stored (pose.mp4); made them again" in text
    assert again.pose_video.read_bytes() == first.pose_video.read_bytes() == cached_file.read_bytes()


def test_cache_entry_reuses_only_an_intact_record(tmp_path: Path) -> None:
    entry = CacheEntry(tmp_path / "entry")
    calls = []

    def make(folder: Path) -> dict:
        calls.append(folder)
        (folder / "a.txt").write_text("alpha")
        (folder / "sub").mkdir()
        (folder / "sub" / "b.txt").write_text("beta")
        return {"n": len(calls)}

    assert entry.get_or_make(make).data == {"n": 1}
    found = entry.get_or_make(make)
    assert (found.data, found.cached, found.damaged) == ({"n": 1}, True, [])
    assert sorted(Record.read(entry.path).digests) == ["a.txt", "sub/b.txt"]
    (entry.path / "sub" / "b.txt").write_text("BETA")
    found = entry.get_or_make(make)
    assert (found.data, found.cached, found.damaged) == ({"n": 2}, False, ["sub/b.txt"])
    (entry.path / "a.txt").unlink()
    assert entry.get_or_make(make).damaged == ["a.txt"]
    assert entry.get_or_make(make, use_cache=False).data == {"n": 4}


def test_work_folder_segments_carry_digests(tmp_path: Path) -> None:
    a = tmp_path / "a.bin"
    a.write_bytes(b"x")
    work = WorkDir.for_job([a], {}, tmp_path / "work")
    frames = np.zeros((3, 4, 4, 3), np.uint8)
    work.save_segment(0, frames, 2.5)
    work.save_segment(1, frames + 1, 3.5)
    assert work.finished() == {0: (3, 4, 4, 3), 1: (3, 4, 4, 3)} and work.segment_seconds() == {0: 2.5, 1: 3.5}
    data = bytearray(work.segment_path(1).read_bytes())
    data[-1] ^= 0xFF  # one pixel changed on disk
    work.segment_path(1).write_bytes(bytes(data))
    assert set(work.finished()) == {0}


def test_copies_are_independent_and_atomic_writes_honour_the_umask(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "f.bin").write_bytes(b"cache bytes")
    copy_tree(source, tmp_path / "dst")
    (tmp_path / "dst" / "f.bin").write_bytes(b"edited")
    assert (source / "f.bin").read_bytes() == b"cache bytes"
    previous = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "y").write_text("y")
        copied = copy_file(source / "f.bin", tmp_path / "copy.bin")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "out.txt") == 0o640 and _mode(tmp_path / "folder") == 0o750 and _mode(copied) == 0o640

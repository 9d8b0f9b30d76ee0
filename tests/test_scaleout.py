"""Segment-parallel generation on Ray: same output as one process, DAG order, worker and driver deaths, Ctrl-C.

Every Ray test runs on the one session cluster (``ray_cluster``: 2 CPUs, 2 declared GPUs that do not exist); the
workers run the tiny models on the CPU with one thread each.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from animate_inputs import TEST_OPTIONS

import posegen_cli
from posegen_cli.cache import RECORD
from posegen_cli.errors import InputError, OptionError
from posegen_cli.longvideo import AnimateOptions, animate
from posegen_cli.longvideo.engine import make_executor
from posegen_cli.longvideo.executors.ray import BOARD_PREFIX
from posegen_cli.longvideo.executors.schedule import bases_pending, ready_segments
from posegen_cli.longvideo.options import resolve_settings
from posegen_cli.longvideo.plan import ANCHOR, BASE, TRANSITION, plan_segments
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.report import Reporter
from posegen_cli.video import iter_frames

torch.set_num_threads(1)

SETTINGS = {**TEST_OPTIONS, "steps": 3, "kv_steps": "0-2", "shot": "half-body", "keep_intermediates": True}
"""Three steps, two shared: the anchor still has a step to go when the bases may start."""
SEGMENTS = 5


def indices(segments: list) -> list[int]:
    return [seg.index for seg in segments]


def test_ready_segments_follow_the_dag() -> None:
    plan = plan_segments(36, 13, 5, 4)  # anchor 0, bases 2 4, transitions 1 3
    assert indices(ready_segments(plan, set(), set(), False)) == [0]
    assert indices(ready_segments(plan, set(), {0}, False)) == []
    # the anchor's shared steps are saved: every base may start while the anchor finishes
    assert indices(ready_segments(plan, set(), {0}, True)) == [2, 4]
    # transition 1 needs 0 and 2 stored; 3 needs 2 and 4
    assert indices(ready_segments(plan, {0, 2}, {4}, True)) == [1]
    assert indices(ready_segments(plan, {0, 2, 4}, {1}, True)) == [3]
    assert bases_pending(plan, {0, 2}) and not bases_pending(plan, {0, 2, 4})
    # another anchor: the bases on both sides wait for it alike
    other = plan_segments(36, 13, 5, 4, anchor=2)
    assert [seg.kind for seg in other if seg.index == 2] == [ANCHOR]
    assert indices(ready_segments(other, set(), set(), True)) == [2, 0, 4]


def test_without_ray_the_flags_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(InputError, match=r'needs Ray, which is not installed \(pip install "posegen\[ray\]"\)'):
        make_executor(AnimateOptions(gpus=2), resolve_settings(AnimateOptions(device="cpu")))
    with pytest.raises(InputError, match=r"posegen\[ray\]"):
        make_executor(AnimateOptions(ray_address="auto"), resolve_settings(AnimateOptions(device="cpu")))


def test_setting_errors_survive_the_trip_from_a_worker() -> None:
    """A worker's OptionError (an offload needing CUDA, say) reaches the driver pickled, with its setting intact."""
    error = OptionError("offload", "group", problem="group needs a CUDA device (got cpu)")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is OptionError and (back.option, back.value, back.problem) == ("offload", "group", error.problem)
    assert str(back) == str(error) == "--offload group needs a CUDA device (got cpu)" and back.exit_code == 2
    choice = pickle.loads(pickle.dumps(OptionError("shot", "wide", ("auto", "close-up"))))
    assert str(choice) == "--shot 'wide' is not known (use auto, close-up)"


def test_cli_without_ray_is_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, reference_image_path: Path, driving_clip: Path
) -> None:
    from typer.testing import CliRunner

    from posegen_cli.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)
    args = ["animate", str(reference_image_path), str(driving_clip), "-o", str(tmp_path / "out.mp4"), "--gpus", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert 'pip install "posegen[ray]"' in lines[0]
    assert list(tmp_path.iterdir()) == []


def segments_of(work: Path) -> dict[int, np.ndarray]:
    return {index: np.load(work / f"segment-{index:04d}.npy") for index in range(SEGMENTS)}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory, reference_image_path: Path, driving_clip: Path, tiny_models: Path) -> dict[str, Any]:
    """The reference: the same job in this process, its segments and its decoded video."""
    root = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("POSEGEN_CACHE_DIR", str(root / "cache"))
        options = AnimateOptions(**SETTINGS, models_dir=tiny_models, work_dir=root / "work")
        result = animate(reference_image_path, driving_clip, root / "out.mp4", options=options, reporter=Reporter(quiet=True))
    assert result.work_dir is not None and result.workers is None
    return {"segments": segments_of(result.work_dir), "video": np.stack(list(iter_frames(result.output)))}


def assert_same_as_single_process(result: Any, reference: dict[str, Any]) -> None:
    for index, frames in segments_of(result.work_dir).items():
        np.testing.assert_array_equal(frames, reference["segments"][index], err_msg=f"segment {index}")
    np.testing.assert_array_equal(np.stack(list(iter_frames(result.output))), reference["video"])


def kill_a_worker_mid_base(ray: Any, killed: list[tuple[int, str]], stop: threading.Event) -> None:
    """Watch the job's progress board; SIGKILL the first worker seen one step into a base segment."""
    while not stop.is_set():
        names = [name for name in ray.util.list_named_actors() if name.startswith(BOARD_PREFIX)]
        if names:
            try:
                board = ray.get_actor(names[0])
                _, current = ray.get(board.snapshot.remote())
                pids = ray.get(board.worker_pids.remote())
            except Exception:  # noqa: BLE001 - the board ends with the job
                return
            for worker, (label, done, _) in current.items():
                if "(base)" in label and done >= 1:
                    os.kill(pids[worker], signal.SIGKILL)
                    killed.append((worker, label))
                    return
        time.sleep(0.05)


def test_two_workers_match_one_process_even_when_a_worker_is_killed(
    ray_cluster: Any, single_process: dict[str, Any], tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path
) -> None:
    killed: list[tuple[int, str]] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_a_worker_mid_base, args=(ray_cluster, killed, stop), daemon=True)
    killer.start()
    options = AnimateOptions(**SETTINGS, models_dir=tiny_models, work_dir=tmp_path / "work", gpus=2)
    try:
        result = animate(reference_image_path, driving_clip, tmp_path / "out.mp4", options=options, reporter=Reporter(quiet=True))
    finally:
        stop.set()
        killer.join()
    # a worker died in the middle of a base; Ray restarted it, the segment was retried and the job completed
    assert len(killed) == 1, "no worker was seen inside a base segment"
    assert sorted(result.computed) == list(range(SEGMENTS)) and result.reused == []
    assert_same_as_single_process(result, single_process)

    # --json: both workers, every segment made once
    workers = result.summary()["workers"]
    assert set(workers) == {"worker 0", "worker 1"}
    assert sorted(s for w in workers.values() for s in w["segments"]) == list(range(SEGMENTS))
    assert sum(w["segment_count"] for w in workers.values()) == SEGMENTS
    assert all(w["seconds"] > 0 for w in workers.values() if w["segments"])

    # order: bases only once the anchor's shared-step latents were saved (while the anchor still ran its last step);
    # a transition only once both neighbours were stored
    spans = {seg: (start, end) for w in workers.values() for seg, start, end in w["timeline"]}
    shared_saved = (result.work_dir / "anchor-inputs.safetensors").stat().st_mtime
    kinds = {seg.index: seg.kind for seg in plan_segments(36, 13, 5, 4)}
    for index, (start, _) in spans.items():
        if kinds[index] == BASE:
            assert start >= shared_saved - 0.01, f"base {index} started before the anchor's shared steps"
        if kinds[index] == TRANSITION:
            assert start >= max(spans[index - 1][1], spans[index + 1][1]) - 0.01, f"transition {index} started too early"
    assert min(spans[i][0] for i in (2, 4)) < spans[0][1], "no base overlapped the anchor's last step"


DRIVER = """
import json, sys
from pathlib import Path
from posegen_cli.longvideo import AnimateOptions, animate
from posegen_cli.report import Reporter
reference, driving, output, options = sys.argv[1:]
animate(Path(reference), Path(driving), Path(output), options=AnimateOptions(**json.loads(options)), reporter=Reporter(quiet=True))
"""


def recorded(work_root: Path) -> set[int]:
    """Segments the work folder's record lists (``cache.Record``: what the driver recorded, digests checked)."""
    folders = [manifest.parent for manifest in work_root.glob(f"*/{RECORD}")]
    return set(WorkDir(folders[0], {}).finished()) if folders else set()


def test_driver_killed_then_ctrl_c_then_rerun_computes_only_what_is_missing(
    ray_cluster: Any, single_process: dict[str, Any], tmp_path: Path, reference_image_path: Path, driving_clip: Path, tiny_models: Path
) -> None:
    work_root, output = tmp_path / "work", tmp_path / "out.mp4"
    # 1. a driver process on the cluster, SIGKILLed once two segments are stored
    settings = {**SETTINGS, "models_dir": str(tiny_models), "work_dir": str(work_root), "ray_address": ray_cluster.get_runtime_context().gcs_address}
    env = {**os.environ, "PYTHONPATH": str(Path(posegen_cli.__file__).resolve().parents[1])}
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(reference_image_path), str(driving_clip), str(output), json.dumps(settings)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while len(recorded(work_root)) < 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    driver.kill()
    driver.wait()
    first = recorded(work_root)
    assert 2 <= len(first) < SEGMENTS, (tmp_path / "driver.log").read_text()[-3000:]
    assert not output.exists()

    # 2. the rerun is stopped by Ctrl-C after its first new segment: no output, no half-written file, workers gone
    made: list[int] = []

    def ctrl_c(seg: Any) -> None:
        made.append(seg.index)
        raise KeyboardInterrupt

    options = AnimateOptions(**SETTINGS, models_dir=tiny_models, work_dir=work_root, gpus=2)
    with pytest.raises(KeyboardInterrupt):
        animate(reference_image_path, driving_clip, output, options=options, reporter=Reporter(quiet=True), after_segment=ctrl_c)
    assert len(made) == 1 and made[0] not in first
    (work,) = work_root.iterdir()
    assert not list(work.glob(".*partial*")) and not output.exists() and not list(tmp_path.glob(".out*"))
    deadline = time.monotonic() + 30
    while ray_cluster.available_resources().get("GPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_cluster.available_resources().get("GPU", 0) == 2, "a worker outlived Ctrl-C"
    second = recorded(work_root)

    # 3. the last run makes exactly the segments still missing, and the video is the single-process one
    result = animate(reference_image_path, driving_clip, output, options=options, reporter=Reporter(quiet=True))
    assert sorted(result.reused) == sorted(second) and sorted(result.computed) == sorted(set(range(SEGMENTS)) - second)
    assert_same_as_single_process(result, single_process)


def test_own_condition_videos_and_a_camera_on_two_workers_match_one_process(
    ray_cluster: Any, tmp_path: Path, reference_image_path: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from posegen_cli.video import write_video

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("POSEGEN_CACHE_DIR", str(tmp_path / "cache"))
    frames = np.zeros((30, 96, 64, 3), np.uint8)
    for i, frame in enumerate(frames):
        frame[20:26, 5 + i : 40 + i] = (255, 0, 0)
        frame[50:56, 5 + i : 30 + i] = (0, 255, 0)
    pose_video = write_video(tmp_path / "pose.mp4", frames, 24, lossless=True)
    hand_video = write_video(tmp_path / "hand.mp4", frames[:, ::-1], 24, lossless=True)
    own = {**TEST_OPTIONS, "pose_video": pose_video, "hand_video": hand_video, "camera": "pan-left", "camera_speed": 6.0}
    results = {}
    for name, extra in (("local", {}), ("ray", {"gpus": 2})):
        options = AnimateOptions(**own, models_dir=tiny_models, work_dir=tmp_path / name, keep_intermediates=True, **extra)
        results[name] = animate(reference_image_path, None, tmp_path / f"{name}.mp4", options=options, reporter=Reporter(quiet=True))
    local, ray = results["local"], results["ray"]
    assert ray.workers is not None and ray.kv is None and local.kv is None
    # nothing is shared with a camera: no anchor latents are saved, and every segment matches the in-process run
    assert not (ray.work_dir / "anchor-inputs.safetensors").exists()
    assert sorted(ray.computed) == sorted(local.computed) == list(range(len(plan_segments(30, 13, 5, 4))))
    for index in ray.computed:
        np.testing.assert_array_equal(
            np.load(ray.work_dir / f"segment-{index:04d}.npy"), np.load(local.work_dir / f"segment-{index:04d}.npy"), err_msg=f"segment {index}"
        )
    np.testing.assert_array_equal(np.stack(list(iter_frames(ray.output))), np.stack(list(iter_frames(local.output))))

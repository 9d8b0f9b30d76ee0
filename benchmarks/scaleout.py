"""Segment-parallel speed-up on Ray: the DAG schedule with fake segments, and a real tiny-model job on 2 CPU workers.

Part 1 (``--part dag``): jobs of 3, 15, 31 and 61 segments on 1, 2, 4, 8 and 16 Ray actors. The driver is
posegen's own scheduling loop (:func:`posegen_cli.longvideo.executors.schedule.drive_dag`, the one
``RayExecutor`` runs); each actor sleeps for a segment's time instead of denoising. Segment time T is a measured
one, scaled down: the paper's 1,775 s per 25-step segment on A100 (performance spec §0) at ``--scale`` seconds.
The anchor marks its shared steps done after 2/25 of T (the half-body preset shares steps 0-1), and a worker's
first base costs that much again (its K/V rebuild). The ideal makespan is set by the critical path (anchor's
shared steps, then a base, then a transition: (2 + 2/25)·T) and by the work spread over the workers
(n·T plus the rebuilds, divided by W); the speed-up is the 1-worker makespan over the W-worker one.
Target: at least 0.85·W for 31 segments on 8 workers.

Part 2 (``--part real``): the tiny random models, 11 segments (98 driving frames), on 1 and then 2 CPU workers with
one thread each (``--gpus 1`` / ``--gpus 2 --device cpu``), in one run; the figure is the ratio of the two
segment-phase times. Target: at least 1.5x. Needs 2 free cores: on a loaded machine the ratio drops.

Nothing here needs a GPU; on a GPU machine part 2 still runs the tiny models on the CPU (it measures scheduling).

    python benchmarks/scaleout.py [--part dag|real|both] [--scale 0.2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from posegen_cli.longvideo.executors.schedule import drive_dag
from posegen_cli.longvideo.plan import ANCHOR, BASE, plan_segments

MEASURED_SEGMENT_SECONDS = 1775.0
"""PoseGen paper: 71 s/step x 25 steps on A100 (performance spec §0, D.5)."""
SHARED_FRACTION = 2 / 25
JOB_SIZES = (3, 15, 31, 61)
WORKER_COUNTS = (1, 2, 4, 8, 16)
REFERENCE = ROOT / "tests" / "data" / "reference_person.png"


class FakeWorker:
    """Sleeps a segment's time; the anchor drops a marker file once its shared steps would be done.

    Receives plain values only, so its process imports nothing from posegen (no torch): 16 of them start fast.
    """

    def __init__(self, marker: str, segment_seconds: float) -> None:
        self.marker = marker
        self.segment_seconds = segment_seconds
        self.has_kv = False

    def run(self, kind: str, record_kv: bool, keep_kv: bool) -> float:
        shared = SHARED_FRACTION * self.segment_seconds
        if kind == ANCHOR:
            time.sleep(shared)
            Path(self.marker).touch()
            time.sleep(self.segment_seconds - shared)
            self.has_kv = True
            return self.segment_seconds
        rebuild = kind == BASE and not self.has_kv
        if rebuild:
            time.sleep(shared)
            self.has_kv = True
        if not keep_kv and kind != BASE:
            self.has_kv = False
        time.sleep(self.segment_seconds)
        return self.segment_seconds + (shared if rebuild else 0.0)


def segments_for(count: int) -> list:
    """A plan of ``count`` segments in the release geometry (81/21/20)."""
    frames = 81 + (count - 1) // 2 * (2 * 81 - 41)
    plan = plan_segments(frames, 81, 21, 20)
    assert len(plan) == count
    return plan


def ideal_makespan(count: int, workers: int, seconds: float) -> float:
    """Lower bound: the critical path, or all the work (rebuilds included) spread evenly over the workers."""
    if count == 1:
        return seconds
    rebuilds = min(workers, (count + 1) // 2) - 1
    work = count * seconds + rebuilds * SHARED_FRACTION * seconds
    return max((2 + SHARED_FRACTION) * seconds, work / workers)


def run_dag(ray: Any, count: int, workers: int, seconds: float, actors: list[Any], folder: Path) -> float:
    marker = folder / "shared-steps"
    marker.unlink(missing_ok=True)
    plan = segments_for(count)
    began = time.perf_counter()
    pending: dict[Any, Any] = {}
    drive_dag(
        plan, set(), workers, pending,
        submit=lambda seg, worker, record_kv, keep_kv: actors[worker].run.remote(seg.kind, record_kv, keep_kv),
        wait=lambda refs: ray.wait(refs, num_returns=1, timeout=0.01)[0],
        shared_steps_ready=marker.exists,
        on_done=lambda ref, seg, worker: ray.get(ref),
    )  # fmt: skip
    return time.perf_counter() - began


def part_dag(scale: float) -> list[dict[str, Any]]:
    import ray

    rows = []
    with tempfile.TemporaryDirectory(prefix="pgbench-") as temp:
        folder = Path(temp)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=max(WORKER_COUNTS), num_gpus=max(WORKER_COUNTS), include_dashboard=False, object_store_memory=100 * 1024**2,
            _temp_dir=str(folder / "ray"), log_to_driver=False, logging_level=logging.ERROR,
        )  # fmt: skip
        try:
            for count in JOB_SIZES:
                baseline = None
                for workers in WORKER_COUNTS:
                    # fresh actors per job: none starts with the anchor's K/V
                    actor_class = ray.remote(FakeWorker).options(num_gpus=1, num_cpus=1)
                    actors = [actor_class.remote(str(folder / "shared-steps"), scale) for _ in range(workers)]
                    ray.get([a.__ray_ready__.remote() for a in actors])
                    makespan = run_dag(ray, count, workers, scale, actors, folder)
                    for actor in actors:
                        ray.kill(actor)
                    baseline = makespan if workers == 1 else baseline
                    ideal = ideal_makespan(count, workers, scale)
                    speedup = baseline / makespan
                    ideal_speedup = ideal_makespan(count, 1, scale) / ideal
                    rows.append({
                        "segments": count, "workers": workers, "makespan_T": round(makespan / scale, 3),
                        "ideal_T": round(ideal / scale, 3), "speedup": round(speedup, 2), "ideal_speedup": round(ideal_speedup, 2),
                        "speedup_per_worker": round(speedup / workers, 3), "of_ideal": round(speedup / ideal_speedup, 3),
                        "hours_at_measured_T": round(makespan / scale * MEASURED_SEGMENT_SECONDS / 3600, 2),
                    })  # fmt: skip
                    print(
                        f"{count:3d} segments x {workers:2d} workers: makespan {makespan / scale:6.2f} T (ideal {ideal / scale:6.2f} T), "
                        f"speed-up {speedup:5.2f} = {speedup / workers:.2f}x workers, {speedup / ideal_speedup:.2f} of ideal, "
                        f"{rows[-1]['hours_at_measured_T']:.2f} h at T = {MEASURED_SEGMENT_SECONDS:.0f} s",
                        flush=True,
                    )
        finally:
            ray.shutdown()
    target = next(r for r in rows if r["segments"] == 31 and r["workers"] == 8)
    print(f"target 31 segments on 8 workers: {target['speedup_per_worker']:.2f}x worker count (need >= 0.85)")
    return rows


def part_real() -> dict[str, Any]:
    import ray
    import torch
    from animate_inputs import TEST_OPTIONS, make_driving_clip

    from posegen_cli.longvideo import AnimateOptions, animate
    from posegen_cli.report import Reporter
    from posegen_cli.testing import make_tiny_models

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="pgbench-") as temp:
        folder = Path(temp)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ["POSEGEN_CACHE_DIR"] = str(folder / "cache")
        models = make_tiny_models(folder / "models")
        clip = make_driving_clip(REFERENCE, folder / "driving.mp4", 98, audio=False)
        ray.init(
            num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, _temp_dir=str(folder / "ray"),
            log_to_driver=False, logging_level=logging.ERROR,
        )  # fmt: skip
        seconds = {}
        try:
            for workers in (1, 2):
                options = AnimateOptions(
                    **{**TEST_OPTIONS, "steps": 4}, shot="half-body", models_dir=models, work_dir=folder / f"work-{workers}", gpus=workers
                )
                result = animate(REFERENCE, clip, folder / f"out-{workers}.mp4", options=options, reporter=Reporter(quiet=True))
                seconds[workers] = result.phases["segments"]
                print(f"tiny job, {result.segments} segments, {workers} CPU worker(s): segment phase {seconds[workers]:.1f} s", flush=True)
        finally:
            ray.shutdown()
            shutil.rmtree(folder / "ray", ignore_errors=True)
    ratio = seconds[1] / seconds[2]
    print(f"2 workers vs 1: {ratio:.2f}x (target >= 1.5x; {os.cpu_count()} cores on this machine)")
    return {"segments_seconds": seconds, "speedup": round(ratio, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("dag", "real", "both"), default="both")
    parser.add_argument("--scale", type=float, default=0.2, help="seconds of wall time standing for one segment T")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report: dict[str, Any] = {"segment_seconds_measured": MEASURED_SEGMENT_SECONDS, "scale_seconds": args.scale}
    if args.part in ("dag", "both"):
        report["dag"] = part_dag(args.scale)
    if args.part in ("real", "both"):
        report["real"] = part_real()
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

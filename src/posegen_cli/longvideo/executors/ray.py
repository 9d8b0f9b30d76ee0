"""Segment-parallel generation on Ray: one long-lived worker per GPU, the driver walks the anchor → bases → transitions DAG.

Design (performance spec §C.3):
- each worker is a Ray actor holding one GPU (``num_gpus=1``); it loads the models once, with the single-GPU run's
  options but without the text and image encoders: the driver computes the job's embeddings once and ships them;
- the anchor runs first and saves its latents at the shared K/V steps into the work folder; as soon as that file
  exists every free worker starts a base, rebuilding the anchor's K/V once from those latents (a worker's first base
  costs ``anchor_steps()`` extra guided steps, no decode); the cache itself never travels;
- a transition starts as soon as both of its neighbours are stored;
- workers write segment files atomically into the shared work folder; only the driver updates its manifest;
- a worker process that dies is restarted by Ray and its segment retried (``max_restarts``/``max_task_retries``);
  every segment is denoised from the job's seed alone, so a retry, or another worker, gives the same frames.

The rule for workers: each worker reserves one Ray ``GPU`` and one ``CPU``. A ``cpu`` device runs the workers' models
on the CPU (one thread per reserved CPU); a local runtime then declares the requested number of GPUs to Ray without
needing them, as the tests do, and a CPU-only cluster must do the same (``ray start`` with its num-gpus option).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posegen_cli.errors import InputError, OptionError, PosegenError, ResourceError, option
from posegen_cli.longvideo.executors import ModelSpec, SegmentJob
from posegen_cli.longvideo.executors.schedule import drive_dag
from posegen_cli.longvideo.loading import load_encoder_pipeline
from posegen_cli.longvideo.plan import ANCHOR, BASE, TRANSITION, Segment
from posegen_cli.longvideo.renderer import JobEmbeddings, PipelineRenderer, RenderSpec
from posegen_cli.longvideo.segments import (
    PHASES,
    SegmentClock,
    SegmentStats,
    finished_segments,
    generate_segment,
    report_resume,
    seeded_clock,
    segment_units,
)
from posegen_cli.longvideo.workdir import WorkDir
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline
from posegen_cli.report import Reporter, duration_text, set_eta

RAY_EXTRA = 'pip install "posegen[ray]"'
MAX_RETRIES = 3
"""Restarts of a dead worker, and retries of the segment it was on, before the job stops (a rerun continues it)."""
OBJECT_STORE_BYTES = 256 * 1024**2
"""Object store of a local runtime: only embeddings (about 5 MB) and small results pass through it."""
POLL_SECONDS = 0.2
RAY_LOG = "ray.log"
"""Ray's own messages to the driver (worker deaths, retries), kept in the work folder."""
BOARD_PREFIX = "posegen-progress-"
"""Name prefix of a job's progress actor (``ray list actors`` shows it; tests read it to find a busy worker)."""


def import_ray() -> Any:
    """The ``ray`` module, or an InputError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise InputError(f"running segments on several GPUs needs Ray, which is not installed ({RAY_EXTRA})") from None
    return ray


class ProgressBoard:
    """A tiny actor the workers report each denoising step to; the driver reads it to draw one display."""

    def __init__(self) -> None:
        self.steps = 0
        self.current: dict[int, tuple[str, int, int]] = {}
        self.pids: dict[int, int] = {}

    def update(self, worker: int, label: str, done: int, total: int, counts: bool, pid: int) -> None:
        """Worker ``worker`` (process ``pid``) has done ``done`` of the ``total`` progress units (phases and steps,
        ``segments.segment_units``) of ``label``; ``counts``: one more unit of a segment (not of a K/V rebuild)."""
        self.steps += int(counts)
        self.current[worker] = (label, done, total)
        self.pids[worker] = pid

    def snapshot(self) -> tuple[int, dict[int, tuple[str, int, int]]]:
        """Segment units done so far (retried ones included) and each worker's (label, units done, units total)."""
        return self.steps, dict(self.current)

    def worker_pids(self) -> dict[int, int]:
        return dict(self.pids)


class BoardPhases:
    """:class:`~posegen_cli.longvideo.segments.PhaseReport` for a worker: every phase and unit goes to the progress board."""

    def __init__(self, board: Any, worker: int, label: str, steps: int, total: int, *, counts: bool) -> None:
        self.board, self.worker, self.label, self.steps, self.total, self.counts = board, worker, label, steps, total, counts
        self.done = 0
        self.phase = PHASES[0]

    def _send(self, counted: bool) -> None:
        self.board.update.remote(self.worker, f"{self.label} › {self.phase}", self.done, self.total, counted and self.counts, os.getpid())

    def show(self, phase: str) -> None:
        self.phase = phase
        self._send(False)

    def advance(self) -> None:
        self.done += 1
        self._send(True)

    def on_step(self, count: int) -> None:
        self.phase = f"denoising {count}/{self.steps}" if count < self.steps or not self.counts else "decoding"
        self.advance()


class SegmentWorker:
    """One GPU's models and K/V cache; generates the segments the driver hands it, one at a time.

    A load failure the user can fix (a missing model, out of memory) is kept and raised by :meth:`describe`, so
    the driver reports it on one line instead of Ray's actor-died traceback.
    """

    def __init__(self, index: int, models: ModelSpec, spec_fields: dict[str, Any], job: SegmentJob, board: str) -> None:
        """``spec_fields``: the job's :class:`RenderSpec` but its embeddings, which are read from the work folder;
        ``board``: the name of the job's :class:`ProgressBoard` actor.

        Only plain values are passed (no object-store references, no actor handles), so Ray can always restart a
        worker that died, whatever became of the driver's objects.
        """
        import ray
        import torch

        self.index = index
        self.job = job
        self.board = ray.get_actor(board)
        self.error: PosegenError | None = None
        if models.device == "cpu":
            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.work = WorkDir(job.work_path, job.work_settings)
        self.sources = job.open_sources()
        self.renderer: PipelineRenderer | None = None
        self.attention: Any = None
        self.layers = 0
        try:
            pipe = models.load(encoders=False)
            self.attention = pipe.attention
            self.layers = pipe.transformer.config.num_layers
            if self.work.embeddings_path.exists():  # else the work folder is not shared: the driver's check says so
                spec = RenderSpec(JobEmbeddings.load(self.work.embeddings_path), **spec_fields)
                # the K/V placement planned for the job; disk entries in a folder of this worker's own
                self.renderer = spec.renderer(pipe, self.work.anchor_inputs_path, self.work.stage_dir(f"kv-worker-{index}"))
        except PosegenError as exc:
            self.error = exc

    def describe(self) -> dict[str, Any]:
        """Where this worker runs and the depth of its DiT (raises the load error, if any)."""
        import ray

        if self.error is not None:
            raise self.error
        return {
            "node": ray.util.get_node_ip_address(), "pid": os.getpid(), "layers": self.layers, "attention": self.attention,
        }

    def can_read(self, path: str, token: str) -> bool:
        """Whether this worker sees the driver's work folder: the token file there holds ``token``."""
        try:
            return Path(path).read_text() == token
        except OSError:
            return False

    def _generate(self, seg: Segment, *, record_kv: bool, rebuild: bool) -> Any:
        if self.renderer is None:
            raise RuntimeError("this worker never read the job's embeddings (the shared-storage check stops a job first)")
        label = f"segment {seg.index} ({seg.kind}" + (", K/V rebuild)" if rebuild else ")")
        steps = self.renderer.anchor_steps() if rebuild else self.renderer.num_steps
        phases = BoardPhases(self.board, self.index, label, steps, segment_units(steps, rebuild), counts=not rebuild)
        job = self.job
        return generate_segment(
            seg, self.renderer, self.sources, self.work, total_frames=job.total_frames, overlap=(job.head, job.tail),
            record_kv=record_kv, rebuild=rebuild, compat_mp4=job.compat_mp4, phases=phases,
        )  # fmt: skip

    def run(self, seg: Segment, record_kv: bool, keep_kv: bool) -> dict[str, Any]:
        """Generate ``seg`` and write its file (the driver records it); returns its shape, seconds, this worker's K/V rebuild time, and the
        wall-clock times (``time.time()``) the call started and ended.

        A base needs the anchor's K/V: a worker without it rebuilds it first from the anchor's saved latents.
        ``keep_kv=False`` frees the cache before a transition (no base is left that this worker could get).
        """
        started = time.time()
        rebuild_seconds = 0.0
        assert self.renderer is not None, "run() after a failed start"
        if seg.kind == BASE and self.renderer.kv is not None and self.renderer.cache is None:
            began = time.perf_counter()
            anchor = next(s for s in self.job.plan if s.kind == ANCHOR)
            self._generate(anchor, record_kv=True, rebuild=True)
            rebuild_seconds = time.perf_counter() - began
        if seg.kind == TRANSITION and not keep_kv:
            self.renderer.release_kv()
        began = time.perf_counter()
        frames = self._generate(seg, record_kv=record_kv, rebuild=False)
        seconds = time.perf_counter() - began
        self.board.update.remote(self.index, "idle", 0, 0, False, os.getpid())
        return {
            "shape": tuple(frames.shape), "seconds": seconds, "rebuild_seconds": rebuild_seconds, "started": started, "ended": time.time(),
        }  # fmt: skip


def parallel_eta(
    clock: SegmentClock, units_left: int, units_per_segment: int, workers: int, units_done: int, elapsed: float
) -> tuple[float | None, bool]:
    """(seconds left, whether only a lower bound) of a job whose segments run on ``workers`` at once.

    Once a segment is timed (this run or an earlier one): the segments' worth of units left times the measured
    seconds of one segment, over the workers that still have work (at most one per segment left). Before that, the
    rate of the units done so far (a K/V rebuild and model loading not counted: a lower bound); None before any.
    """
    segments_left = units_left / units_per_segment
    if clock.per_segment is not None:
        busy = max(1, min(workers, math.ceil(segments_left)))
        return segments_left * clock.per_segment / busy, False
    if units_done == 0:
        return None, True
    return units_left * elapsed / units_done, True


class RayExecutor:
    """Runs a job's segments on Ray workers: a local runtime with ``gpus`` workers, or a cluster at ``address``.

    ``address``: "auto", "HOST:PORT" or "ray://HOST:PORT"; ``gpus`` then caps the workers (default: every GPU of the
    cluster). A Ray already initialised in this process (a test's cluster) is used as it is and left running.
    """

    def __init__(self, models: ModelSpec, *, gpus: int | None, address: str | None, max_retries: int = MAX_RETRIES) -> None:
        if gpus is None and address is None:
            raise ValueError("give the number of GPUs, a cluster address, or both")
        if gpus is not None and gpus < 1:
            raise OptionError("gpus", gpus, problem=f"{gpus}: need at least one worker")
        self.ray = import_ray()
        self.models = models
        self.gpus = gpus
        self.address = address
        self.max_retries = max_retries
        self.started_ray = False
        self.workers: list[Any] = []
        self.board: Any = None
        self.nodes: list[str] = []
        self.job: SegmentJob | None = None
        self.num_steps = 0
        self.anchor_steps = 0
        self.shared = False
        self.pending: dict[Any, tuple[Segment, int]] = {}
        self.done_by: dict[int, list[dict[str, Any]]] = {}
        self.log = contextlib.ExitStack()
        self.attention: Any = None

    def encoder_pipeline(self, reporter: Reporter) -> PoseGenPipeline:
        m = self.models
        return load_encoder_pipeline(m.models_dir, device=m.device, dtype=m.dtype, offload=m.offload, reporter=reporter)

    def release_encoders(self) -> None:
        """Nothing to do: the driver's encoders-only pipeline is dropped by the caller once it has encoded."""

    def _connect(self) -> int:
        """Join or start Ray; returns how many workers to run."""
        ray = self.ray
        if not ray.is_initialized():
            quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
            if self.address is not None:
                try:
                    ray.init(address=self.address, **quiet)
                except (ConnectionError, ValueError, RuntimeError) as exc:
                    raise InputError(f"cannot reach the Ray cluster at {self.address}: {exc} (check `ray status` on its head node)") from None
            else:
                assert self.gpus is not None
                if self.models.device == "cuda":
                    import torch

                    found = torch.cuda.device_count()
                    if found < self.gpus:
                        raise OptionError(
                            "gpus", self.gpus, problem=f"{self.gpus} but this machine has {found} GPU(s) (use {option('gpus')} {max(found, 1)})"
                        )
                ray.init(
                    num_gpus=self.gpus, num_cpus=max(self.gpus, os.cpu_count() or 1), include_dashboard=False,
                    object_store_memory=OBJECT_STORE_BYTES, **quiet,
                )  # fmt: skip
            self.started_ray = True
        available = int(ray.cluster_resources().get("GPU", 0))
        if available == 0:
            raise InputError(
                "the Ray cluster has no GPUs (start its nodes on GPU machines; CPU-only nodes must declare them with ray start's num-gpus option)"
            )
        return available if self.gpus is None else min(self.gpus, available)

    def start(self, spec: RenderSpec, job: SegmentJob, reporter: Reporter) -> None:
        ray = self.ray
        self.job = job
        self.num_steps = spec.job.steps
        self.shared = spec.kv is not None
        self.anchor_steps = 0 if spec.kv is None else spec.kv.steps[1]
        # Ray prints worker deaths and retries on stdout, which carries the JSON summary: keep them in the work folder instead
        log = self.log.enter_context(open(job.work_path / RAY_LOG, "a"))  # noqa: SIM115 - closed by the ExitStack in close()
        self.log.enter_context(contextlib.redirect_stdout(log))
        count = self._connect()
        reporter.info(f"starting {count} Ray worker(s), each loading the models once")
        worker_class = ray.remote(SegmentWorker).options(
            num_gpus=1, num_cpus=1, max_restarts=self.max_retries, max_task_retries=self.max_retries
        )
        board = f"{BOARD_PREFIX}{secrets.token_hex(8)}"
        self.board = ray.remote(ProgressBoard).options(num_cpus=0, name=board).remote()
        work = WorkDir(job.work_path, job.work_settings)
        spec.embeddings.save(work.embeddings_path)
        fields = {name: getattr(spec, name) for name in spec.__dataclass_fields__ if name != "embeddings"}
        self.workers = [worker_class.remote(index, self.models, fields, job, board) for index in range(count)]
        infos = [self._get(worker.describe.remote()) for worker in self.workers]
        self.nodes = [info["node"] for info in infos]
        self.attention = infos[0]["attention"]
        self._check_shared_storage(job.work_path)
        if len({info["layers"] for info in infos}) != 1:
            raise InputError("the Ray workers loaded models of different depths (install the same models on every node)")

    def _check_shared_storage(self, path: Path) -> None:
        """Every worker must read a token the driver just wrote into the work folder (the same path on every node)."""
        token = secrets.token_hex(16)
        probe = path / f".node-check-{token}"
        probe.write_text(token)
        try:
            seen = [self._get(worker.can_read.remote(str(probe), token)) for worker in self.workers]
        finally:
            probe.unlink(missing_ok=True)
        for node, ok in zip(self.nodes, seen):
            if not ok:
                raise InputError(
                    f"a Ray worker on node {node} cannot read the work folder {path} (give {option('work_dir')} a folder on storage "
                    "that every node mounts at the same path, e.g. NFS)"
                )

    def _get(self, ref: Any, segment: Segment | None = None) -> Any:
        """``ray.get`` with posegen's errors raised as themselves and a dead worker as one line."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, PosegenError):
                raise exc.cause from None
            raise
        except ray.exceptions.RayActorError as exc:
            what = f"segment {segment.index}" if segment is not None else "loading the models"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log = self.job.work_path / RAY_LOG if self.job is not None else RAY_LOG
            raise ResourceError(
                f"a Ray worker died {self.max_retries + 1} times during {what} ({reason}; Ray's messages are in {log}); "
                "finished segments are kept, run the same command again to continue"
            ) from None

    def run(self, reporter: Reporter, after_segment: Callable[[Segment], None] | None) -> SegmentStats:
        if self.job is None:
            raise RuntimeError("call start() before run()")
        job = self.job
        work = WorkDir(job.work_path, job.work_settings)
        stored = finished_segments(job.plan, work, job.frame_shape)
        stats = SegmentStats(reused=[seg.index for seg in job.plan if seg.index in stored])
        report_resume(job.plan, stored, work, self.anchor_steps, self.num_steps, reporter)
        # the same units as one process (every phase of every segment still to run), K/V rebuilds left out: each
        # worker makes its own; the clock knows the segment times an earlier run of this job measured
        per_segment = segment_units(self.num_steps, False)
        total_units = per_segment * sum(1 for seg in job.plan if seg.index not in stored)
        clock = seeded_clock(work, stored)
        began = time.perf_counter()

        def submit(seg: Segment, worker: int, record_kv: bool, keep_kv: bool) -> Any:
            return self.workers[worker].run.remote(seg, record_kv, keep_kv)

        def wait(refs: list[Any]) -> list[Any]:
            return self.ray.wait(refs, num_returns=1, timeout=POLL_SECONDS)[0]

        def shared_steps_ready() -> bool:
            if not self.shared:  # nothing shared: bases need no anchor
                return True
            return work.anchor_inputs_path.exists() or any(seg.kind == ANCHOR and seg.index in stored for seg in job.plan)

        def on_done(ref: Any, seg: Segment, worker: int) -> None:
            result = self._get(ref, seg)
            work.record_segment(seg.index, result["shape"], result["seconds"])
            clock.record(1.0, result["seconds"])
            stats.computed.append(seg.index)
            stats.seconds[seg.index] = result["seconds"]
            stats.rebuilt_anchor |= result["rebuild_seconds"] > 0
            self.done_by.setdefault(worker, []).append({"segment": seg.index, **result})
            label = f"segment {seg.index} ({seg.kind}, frames {seg.start}-{seg.stop - 1})"
            reporter.info(f"{label}: done in {duration_text(result['seconds'])} on worker {worker}")
            if after_segment is not None:
                after_segment(seg)

        with reporter.progress() as progress:
            overall = progress.add_task("all segments", total=total_units, unit="")
            lanes = [progress.add_task(f"worker {i} ({node}): starting", total=None, unit="") for i, node in enumerate(self.nodes)]

            def draw() -> None:
                units, current = self.ray.get(self.board.snapshot.remote())
                units = min(units, total_units)
                progress.update(overall, completed=units)
                set_eta(progress, overall, *parallel_eta(clock, total_units - units, per_segment, len(self.workers), units, time.perf_counter() - began))
                for index, lane in enumerate(lanes):
                    label, done, total = current.get(index, ("idle", 0, 0))
                    progress.update(lane, description=f"worker {index} ({self.nodes[index]}): {label}", completed=done, total=total or None)

            drive_dag(
                job.plan, stored, len(self.workers), self.pending, submit=submit, wait=wait, shared_steps_ready=shared_steps_ready,
                on_done=on_done, on_tick=draw,
            )  # fmt: skip
        return stats

    def worker_summary(self) -> dict[str, dict[str, Any]] | None:
        """Per worker: node, segments in the order made, their seconds, K/V rebuild seconds, and a timeline of
        [segment, start, end] in Unix seconds as the worker's clock read them (a restarted worker keeps its number)."""
        summary = {}
        for index, node in enumerate(self.nodes):
            done = self.done_by.get(index, [])
            summary[f"worker {index}"] = {
                "node": node,
                "segments": [item["segment"] for item in done],
                "segment_count": len(done),
                "seconds": round(sum(item["seconds"] for item in done), 2),
                "kv_rebuild_seconds": round(sum(item["rebuild_seconds"] for item in done), 2),
                "timeline": [
                    [item["segment"], round(item["started"], 3), round(item["ended"], 3)] for item in done
                ],
            }
        return summary

    def close(self) -> None:
        """Stop every worker (no restart), wait until their calls are over, then remove files they left half-written."""
        ray = self.ray
        for actor in [*self.workers, self.board]:
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001, S110 - the cluster may already be gone (Ctrl-C reaches its processes too)
                    pass
        for ref in list(self.pending):
            try:
                ray.get(ref, timeout=30)
            except Exception:  # noqa: BLE001, S110 - a killed worker's call ends in an error by design
                pass
        self.pending.clear()
        self.workers, self.board = [], None
        if self.job is not None:
            for partial in self.job.work_path.glob(".*.partial*"):
                partial.unlink(missing_ok=True)
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
        self.log.close()

"""Which segments may start now, given what is stored: PoseGen's anchor → bases → transitions DAG as a pure rule."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from posegen_cli.longvideo.plan import ANCHOR, BASE, TRANSITION, Segment
from posegen_cli.longvideo.segments import bases_pending


def ready_segments(plan: list[Segment], stored: Collection[int], started: Collection[int], shared_steps_ready: bool) -> list[Segment]:
    """Segments of ``plan`` that may start now, in generation order (anchor, bases, transitions, each left to right).

    ``stored``: indices whose files are finished; ``started``: indices running now; ``shared_steps_ready``: the
    anchor's latents at its shared steps are saved (or the anchor itself is stored), so a worker can rebuild its
    K/V. The anchor may always start; a base once ``shared_steps_ready``; a transition once both neighbours are stored.
    """
    ready = []
    for seg in plan:
        if seg.index in stored or seg.index in started:
            continue
        neighbours_stored = seg.index - 1 in stored and seg.index + 1 in stored
        if {ANCHOR: True, BASE: shared_steps_ready, TRANSITION: neighbours_stored}[seg.kind]:
            ready.append(seg)
    return ready


def drive_dag(
    plan: list[Segment],
    stored: set[int],
    workers: int,
    pending: dict[Any, tuple[Segment, int]],
    *,
    submit: Callable[[Segment, int, bool, bool], Any],
    wait: Callable[[list[Any]], list[Any]],
    shared_steps_ready: Callable[[], bool],
    on_done: Callable[[Any, Segment, int], None],
    on_tick: Callable[[], None] | None = None,
) -> None:
    """Hand every ready segment to an idle worker until all of ``plan`` is in ``stored`` (updated in place).

    ``submit(seg, worker, record_kv, keep_kv)`` starts ``seg`` on worker number ``worker`` and returns a handle
    (a Ray ObjectRef); ``record_kv``: the anchor must keep its K/V (a base is still missing); ``keep_kv``: a
    base is still unassigned, so the worker should keep its cache through a transition. ``wait(handles)``
    returns the finished ones (possibly none, after a short timeout); ``on_done`` collects a result and raises
    if the segment failed. ``pending`` holds the handles in flight, so a caller can stop them on an error.
    """
    idle = list(range(workers))
    while len(stored) < len(plan):
        started = {seg.index for seg, _ in pending.values()}
        for seg in ready_segments(plan, stored, started, shared_steps_ready()):
            if not idle:
                break
            worker = idle.pop(0)
            started.add(seg.index)
            record_kv = seg.kind == ANCHOR and bases_pending(plan, stored)
            keep_kv = any(s.kind == BASE and s.index not in stored and s.index not in started for s in plan)
            pending[submit(seg, worker, record_kv, keep_kv)] = (seg, worker)
        if not pending:
            raise RuntimeError(f"no segment can start (stored {sorted(stored)}); the schedule is inconsistent")
        for handle in wait(list(pending)):
            seg, worker = pending.pop(handle)
            on_done(handle, seg, worker)
            stored.add(seg.index)
            idle.append(worker)
        if on_tick is not None:
            on_tick()

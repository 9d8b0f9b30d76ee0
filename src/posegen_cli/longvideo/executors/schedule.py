"""Which segments may start now, given what is stored: PoseGen's anchor → bases → transitions DAG as a pure rule."""

from __future__ import annotations

from collections.abc import Collection

from posegen_cli.longvideo.plan import ANCHOR, BASE, TRANSITION, Segment


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
        if seg.kind == ANCHOR:
            ready.append(seg)
        elif seg.kind == BASE and shared_steps_ready:
            ready.append(seg)
        elif seg.kind == TRANSITION and seg.index - 1 in stored and seg.index + 1 in stored:
            ready.append(seg)
    return ready


def bases_pending(plan: list[Segment], stored: Collection[int]) -> bool:
    """Whether some base segment (not the anchor) is not stored yet: the anchor's K/V is still needed."""
    return any(seg.kind == BASE and seg.index not in stored for seg in plan)


"""Long videos from 81-frame segments: plan, background K/V sharing order, cross-fade merge, resume, ``animate``."""

from posegen_cli.longvideo.engine import AnimateResult, animate, plan_animate
from posegen_cli.longvideo.merge import crossfade, iter_merged, merge_segments
from posegen_cli.longvideo.options import AnimateOptions
from posegen_cli.longvideo.plan import Segment, plan_segments, segment_frame_indices, timeline_order
from posegen_cli.longvideo.presets import SHOT_PRESETS, KVShareRanges, classify_shot, kv_share_ranges

__all__ = [
    "SHOT_PRESETS",
    "AnimateOptions",
    "AnimateResult",
    "KVShareRanges",
    "Segment",
    "animate",
    "classify_shot",
    "crossfade",
    "iter_merged",
    "kv_share_ranges",
    "merge_segments",
    "plan_animate",
    "plan_segments",
    "segment_frame_indices",
    "timeline_order",
]

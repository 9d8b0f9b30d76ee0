"""How much background K/V the base segments borrow from the anchor, by shot type (the release's README table).

Sharing more steps and blocks keeps the background steadier but spreads artefacts when the subject mask is
wrong, and the mask is worse the smaller the subject, so wider shots share more. Ranges are half-open, as the
release's ``-s``/``-b`` flags. Steps are denoising-step indices, as in the release, whatever the step count
(``steps=10`` still shares steps 0-1 for a half-body shot; fewer steps than the preset cut it short). Blocks
are given for the 40-block model; shallower models (tiny test models) get the same fraction of their depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from posegen_cli.errors import OptionError

REFERENCE_BLOCKS = 40
MAX_MAP_BLOCK = 10
"""Last block whose cross-attention maps build the subject mask (the release's ``max_block_idx``)."""

SHOT_PRESETS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "close-up": ((0, 1), (34, 40)),
    "half-body": ((0, 2), (34, 40)),
    "full-body": ((0, 4), (32, 40)),
    "distant": ((0, 4), (30, 40)),
}
DEFAULT_SHOT = "half-body"
"""The release's default ``-s 0 2 -b 34 40``."""

KEYPOINT_THRESHOLD = 0.3
DISTANT_HEIGHT = 0.5
"""A whole body shorter than this fraction of the image height counts as a distant view."""

_HIPS = (11, 12)
_ANKLES = (15, 16)


@dataclass(frozen=True)
class KVShareRanges:
    """Half-open step and block ranges where base segments use the anchor's K/V, and the subject-map depth."""

    steps: tuple[int, int]
    blocks: tuple[int, int]
    max_map_block: int

    @property
    def step_list(self) -> list[int]:
        return list(range(*self.steps))

    @property
    def block_list(self) -> list[int]:
        return list(range(*self.blocks))


def classify_shot(keypoints: np.ndarray, scores: np.ndarray, box: np.ndarray, image_height: int) -> str:
    """Shot type of the reference person from the COCO body keypoints it shows and its height in the image."""
    visible = scores >= KEYPOINT_THRESHOLD
    if any(visible[i] for i in _ANKLES):
        height = float(box[3] - box[1])
        return "distant" if height < DISTANT_HEIGHT * image_height else "full-body"
    if any(visible[i] for i in _HIPS):
        return "half-body"
    return "close-up"


def _scale(value: int, reference: int, actual: int) -> int:
    return math.floor(value * actual / reference + 0.5)


def kv_share_ranges(
    shot: str,
    num_steps: int,
    num_blocks: int,
    steps: tuple[int, int] | None = None,
    blocks: tuple[int, int] | None = None,
) -> KVShareRanges:
    """The preset of ``shot`` fitted to this schedule and model depth; explicit ``steps``/``blocks`` win as given."""
    if shot not in SHOT_PRESETS:
        raise OptionError("shot", shot, ("auto", *SHOT_PRESETS))
    preset_steps, preset_blocks = SHOT_PRESETS[shot]
    max_map_block = MAX_MAP_BLOCK * num_blocks // REFERENCE_BLOCKS
    if steps is None:
        steps = (preset_steps[0], min(preset_steps[1], num_steps))
    if blocks is None:
        first = max(max_map_block + 1, _scale(preset_blocks[0], REFERENCE_BLOCKS, num_blocks))
        blocks = (min(first, num_blocks - 1), _scale(preset_blocks[1], REFERENCE_BLOCKS, num_blocks))
    if not 0 <= steps[0] < steps[1] <= num_steps:
        raise OptionError(
            "kv_steps", steps, problem=f"{steps[0]} {steps[1]}: need 0 <= start < stop <= {num_steps} (the number of steps)"
        )
    if not max_map_block < blocks[0] < blocks[1] <= num_blocks:
        raise OptionError(
            "kv_blocks",
            blocks,
            problem=f"{blocks[0]} {blocks[1]}: need {max_map_block} < start < stop <= {num_blocks} "
            f"(sharing blocks must come after the subject-map blocks 0-{max_map_block})",
        )
    return KVShareRanges(tuple(steps), tuple(blocks), max_map_block)


KV_STEP_RULE = (
    "a step of another schedule shares K/V when its noise level (shifted sigma) lies within the noise levels of the "
    "preset's shared steps on the release's 25-step schedule; at least the step nearest the first of them"
)
"""How a shot preset's K/V steps (given for the release's 25 steps) move onto a distilled schedule."""


def map_kv_steps(steps: tuple[int, int], release_levels: Sequence[float], levels: Sequence[float]) -> tuple[int, int]:
    """The half-open range of ``levels`` steps that :data:`KV_STEP_RULE` picks for the release range ``steps``.

    ``release_levels``/``levels``: decreasing shifted sigmas per step of the release's schedule and of the new one.
    E.g. half-body (0, 2) on 25 steps covers sigma 1.0-0.9917; LightX2V's 4 steps are at 1.0, 0.9375, 0.833, 0.625,
    so only step 0 shares: (0, 1).
    """
    start, stop = steps
    high, low = release_levels[start], release_levels[min(stop, len(release_levels)) - 1]
    tolerance = 1e-6
    inside = [j for j, level in enumerate(levels) if low - tolerance <= level <= high + tolerance]
    if not inside:
        inside = [min(range(len(levels)), key=lambda j: abs(levels[j] - high))]
    return inside[0], inside[-1] + 1

"""Framing the reference photo around its person (issue 16).

The release centre-crops every reference to 9:16, which keeps a centred person but can cut away an
off-centre one, or everyone, from a landscape photo. The rule here: the release's centre crop whenever
the person found in it is not cut by it (so ordinary references give the release's pixels); otherwise the
person is found in the whole photo and the crop is moved (and if needed grown, padding beyond the photo
with the background colour) to frame them (``framing.person_crop_box``). No person anywhere is an error
unless the caller forces the job on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from posegen_cli.errors import InputError, option
from posegen_cli.pose.types import PersonPose
from posegen_cli.video.framing import MODEL_SIZE, crop_box_9x16, crosses_cut_edge, frame_with_box, map_points_with_box, person_crop_box

CENTRE, PERSON, UNCHECKED = "centre", "person", "unchecked"

Detect = Callable[[np.ndarray], PersonPose | None]
"""Finds the highest-scoring person in one RGB frame (source pixels), or None."""


@dataclass(frozen=True)
class ReferenceFraming:
    """Where the model's 9:16 view of the reference comes from.

    ``box`` is (x0, y0, w, h) in photo pixels (it may reach beyond the photo, which is then ``fill``);
    ``person`` is the reference person on the 720x1280 framed canvas (None when none was found); ``rule``
    is ``centre`` (the release's crop), ``person`` (moved to the person) or ``unchecked`` (no person, forced).
    """

    box: tuple[int, int, int, int]
    person: PersonPose | None
    rule: str
    fill: tuple[int, int, int] = (255, 255, 255)
    person_box: tuple[float, float, float, float] | None = None
    """The person's x1, y1, x2, y2 in photo pixels, which ``rule="person"`` frames."""

    def box_for(self, width: int, height: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The crop for an output of another shape (the job's ``resolution``), by the same rule."""
        if size[0] * MODEL_SIZE[1] == size[1] * MODEL_SIZE[0]:
            return self.box
        if self.rule == PERSON and self.person_box is not None:
            return person_crop_box(width, height, np.asarray(self.person_box), size)
        return crop_box_9x16(width, height, size)

    def frame(self, image: np.ndarray, size: tuple[int, int] = MODEL_SIZE) -> np.ndarray:
        """``image`` (the photo this framing was made for) framed at ``size`` (height, width)."""
        return frame_with_box(image, self.box_for(image.shape[1], image.shape[0], size), size, self.fill)

    def padded(self, width: int, height: int) -> bool:
        x0, y0, w, h = self.box
        return x0 < 0 or y0 < 0 or x0 + w > width or y0 + h > height

    def describe(self, width: int, height: int, name: str) -> str:
        """One line for people about how the reference was framed."""
        x0, y0, w, h = self.box
        if self.rule == PERSON:
            pad = " (padded where the photo ends)" if self.padded(width, height) else ""
            return f"{name} framed around its person: the {w}x{h} crop at ({x0}, {y0}) of the {width}x{height} photo{pad}"
        return f"{name} framed by the release's 9:16 centre crop ({w}x{h} at ({x0}, {y0}))"


def _on_canvas(person: PersonPose, box: tuple[int, int, int, int], size: tuple[int, int]) -> PersonPose:
    keypoints = map_points_with_box(person.keypoints, box, size)
    corners = map_points_with_box(np.asarray(person.box[:4], np.float64).reshape(2, 2), box, size).ravel()
    return PersonPose(keypoints=keypoints, scores=person.scores, box=corners.astype(np.float32), box_score=person.box_score)


def _from_canvas(box_on_canvas: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    x0, y0, w, h = box
    out_h, out_w = size
    x1, y1, x2, y2 = (float(v) for v in box_on_canvas[:4])
    return np.array([x0 + x1 * w / out_w, y0 + y1 * h / out_h, x0 + x2 * w / out_w, y0 + y2 * h / out_h])


def frame_reference(
    image: np.ndarray,
    detect: Detect,
    *,
    name: str = "the reference image",
    person_check: bool = True,
    fill: tuple[int, int, int] = (255, 255, 255),
) -> ReferenceFraming:
    """Find the reference person and the 9:16 crop that frames them (module docstring for the rule).

    ``detect`` runs on the centre crop at 720x1280 first (the frame alignment and the ``auto`` shot use), and on
    the whole photo only when that crop finds nobody or cuts the person. Raises InputError when nobody is
    found at all, unless ``person_check`` is False (then the centre crop, ``rule="unchecked"``).
    """
    height, width = image.shape[:2]
    centre = crop_box_9x16(width, height, MODEL_SIZE)
    person = detect(frame_with_box(image, centre, MODEL_SIZE, fill))
    cuts_pixels = centre[2] < width or centre[3] < height
    if person is not None and not (cuts_pixels and crosses_cut_edge(_from_canvas(person.box, centre, MODEL_SIZE), width, height)):
        return ReferenceFraming(centre, person, CENTRE, fill)
    whole = detect(np.ascontiguousarray(image)) if cuts_pixels else None
    if whole is not None:
        box = person_crop_box(width, height, whole.box)
        found = detect(frame_with_box(image, box, MODEL_SIZE, fill))
        person_box = tuple(float(v) for v in whole.box[:4])
        return ReferenceFraming(box, found or _on_canvas(whole, box, MODEL_SIZE), PERSON, fill, person_box)  # type: ignore[arg-type]
    if person is not None:  # cut by the centre crop, but the whole photo shows no more of them
        return ReferenceFraming(centre, person, CENTRE, fill)
    if person_check:
        raise InputError(f"no person found in {name} (it needs one clearly visible person; pass {option('no_person_check')} to run anyway)")
    return ReferenceFraming(centre, None, UNCHECKED, fill)

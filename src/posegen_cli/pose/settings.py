"""The pose stage's settings: what is asked for (:class:`PoseOptions`) and what runs (:class:`PoseSettings`).

:meth:`PoseOptions.resolve` checks every choice and resolves the device once; the streaming code and the backends
then read only the concrete :class:`PoseSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posegen_cli.choices import ALIGN_MODES, OUTPUT_FORMATS
from posegen_cli.device import resolve_device
from posegen_cli.errors import OptionError
from posegen_cli.pose.backends import resolve_backend, resolve_hand_normals
from posegen_cli.pose.render import BODY_THRESHOLD, HAND_THRESHOLD

_KEY_FIELDS = (
    "backend", "hand_normals", "track", "lossless", "openpose_json", "body_threshold", "hand_threshold", "model_size", "seg_size",
    "normal_size",
)  # fmt: skip
KEYPOINTS_BACKEND = "keypoints"
"""The backend name recorded when keypoints are given instead of detected."""


@dataclass(frozen=True)
class PoseOptions:
    """What ``extract_pose`` is asked for, as a user gives it (``auto`` choices, a device name).

    ``output_format="openpose-json"`` also writes one OpenPose JSON per frame into ``openpose/``; ``align`` is used
    only with a reference (``align_to``); ``use_cache=False`` extracts again whatever the cache holds.
    """

    backend: str = "auto"
    hand_normals: str = "auto"
    track: bool = False
    lossless: bool = False
    output_format: str = "npz"
    align: str = "auto"
    body_threshold: float = BODY_THRESHOLD
    hand_threshold: float = HAND_THRESHOLD
    model_size: str = "2b"
    seg_size: str = "1b"
    normal_size: str = "2b"
    batch_size: int = 8
    device: str | torch.device = "auto"
    models_dir: Path | None = None
    use_cache: bool = True

    def resolve(self, keypoints_given: bool = False) -> tuple[PoseSettings, str]:
        """The checked, concrete settings and why that backend runs; OptionError for a value that cannot be used."""
        if self.output_format not in OUTPUT_FORMATS:
            raise OptionError("format", self.output_format, OUTPUT_FORMATS)
        if self.batch_size < 1:
            raise OptionError("batch_size", self.batch_size, problem=f"must be at least 1, got {self.batch_size}")
        if self.align not in ALIGN_MODES:
            raise OptionError("align", self.align, ALIGN_MODES)
        device = resolve_device(self.device)
        if keypoints_given:
            name, why = KEYPOINTS_BACKEND, "keypoints given, no detection"
        else:
            name, why = resolve_backend(self.backend, device)
        settings = PoseSettings(
            backend=name, hand_normals=resolve_hand_normals(self.hand_normals, name), track=self.track, lossless=self.lossless,
            openpose_json=self.output_format == "openpose-json", body_threshold=float(self.body_threshold),
            hand_threshold=float(self.hand_threshold), model_size=self.model_size, seg_size=self.seg_size,
            normal_size=self.normal_size, align=self.align, device=device, batch_size=self.batch_size, models_dir=self.models_dir,
        )  # fmt: skip
        return settings, why


@dataclass(frozen=True)
class PoseSettings:
    """:class:`PoseOptions` made concrete: the backend that runs, the hand-normal source, a real device."""

    backend: str
    hand_normals: str
    track: bool
    lossless: bool
    openpose_json: bool
    body_threshold: float
    hand_threshold: float
    model_size: str
    seg_size: str
    normal_size: str
    align: str
    device: torch.device
    batch_size: int
    models_dir: Path | None

    def key_fields(self) -> dict[str, Any]:
        """The settings that change the extracted outputs (the cache key; not the device, batching or alignment)."""
        return {name: getattr(self, name) for name in _KEY_FIELDS}

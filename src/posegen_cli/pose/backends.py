"""Which pose and normal backends a job runs, how they are built, and the one detection on the reference photo.

The heavy imports (MediaPipe, the Sapiens TorchScript models) happen only for the backend asked for.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from posegen_cli.choices import BACKENDS, HAND_NORMAL_SOURCES
from posegen_cli.device import resolve_device
from posegen_cli.errors import OptionError
from posegen_cli.pose.types import NormalBackend, PersonPose, PoseBackend
from posegen_cli.report import Reporter


def resolve_backend(backend: str, device: str | torch.device = "auto") -> tuple[str, str]:
    """The backend to run and why: ``auto`` is Sapiens with a CUDA GPU, else MediaPipe. Raises OptionError for an unknown name."""
    if backend not in BACKENDS:
        raise OptionError("backend", backend, BACKENDS)
    if backend != "auto":
        return backend, "requested"
    if resolve_device(device).type == "cuda":
        return "sapiens", "a CUDA GPU is available"
    return "mediapipe", "no CUDA GPU, so the CPU backend"


def resolve_hand_normals(hand_normals: str, backend: str) -> str:
    """``auto`` follows the pose backend: Sapiens normals with Sapiens, a black hand video with MediaPipe."""
    if hand_normals not in HAND_NORMAL_SOURCES:
        raise OptionError("hand_normals", hand_normals, HAND_NORMAL_SOURCES)
    if hand_normals != "auto":
        return hand_normals
    return "sapiens" if backend == "sapiens" else "none"


def make_pose_backend(
    name: str,
    *,
    device: str | torch.device = "cpu",
    static: bool = False,
    model_size: str = "2b",
    models_dir: Path | None = None,
    batch_size: int = 8,
    reporter: Reporter | None = None,
) -> PoseBackend:
    """A constructed backend (``name`` already resolved: sapiens or mediapipe; MediaPipe takes one frame at a time)."""
    if name == "mediapipe":
        from posegen_cli.pose.mediapipe_backend import MediaPipePoseBackend

        return MediaPipePoseBackend(static_image_mode=static)
    if name == "sapiens":
        from posegen_cli.pose.sapiens import SapiensPoseBackend

        return SapiensPoseBackend(model_size=model_size, device=device, models_dir=models_dir, batch_size=batch_size, reporter=reporter)
    raise OptionError("backend", name, BACKENDS)


def make_normal_backend(
    *,
    device: str | torch.device = "cpu",
    seg_size: str = "1b",
    normal_size: str = "2b",
    models_dir: Path | None = None,
    batch_size: int = 8,
    reporter: Reporter | None = None,
) -> NormalBackend:
    """Sapiens seg + normal models (the only normal source; MediaPipe bundles none)."""
    from posegen_cli.pose.sapiens import SapiensNormalBackend

    return SapiensNormalBackend(
        seg_size=seg_size, normal_size=normal_size, device=device, models_dir=models_dir, batch_size=batch_size, reporter=reporter
    )


def closing(stack: contextlib.ExitStack, backend: object) -> None:
    """Close ``backend`` with ``stack``: backends that hold native resources (MediaPipe graphs) expose ``close``."""
    close = getattr(backend, "close", None)
    if callable(close):
        stack.callback(close)


def extract_reference_pose(
    image: np.ndarray,
    backend: str = "auto",
    *,
    device: str | torch.device = "auto",
    model_size: str = "2b",
    models_dir: Path | None = None,
) -> PersonPose | None:
    """The highest-scoring person in one RGB uint8 image (H, W, 3), or None; points are in ``image``'s pixels.

    Alignment and the ``auto`` shot call this on the reference framed to the model canvas (``frame_to_model``);
    ``backend`` may be ``auto`` (resolved as :func:`resolve_backend` does).
    """
    dev = resolve_device(device)
    name, _ = resolve_backend(backend, dev)
    with contextlib.ExitStack() as stack:
        detector = make_pose_backend(name, device=dev, static=True, model_size=model_size, models_dir=models_dir)
        closing(stack, detector)
        people = detector.detect([np.ascontiguousarray(image)])[0]
    return max(people, key=lambda p: p.box_score) if people else None


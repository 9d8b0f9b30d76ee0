"""Every closed set of choices the library accepts, in one light module (no heavy imports).

The stages validate against these tuples and ``cli.py`` builds its option enums from them, so a choice is added in
one place.
"""

from __future__ import annotations

BACKENDS = ("auto", "sapiens", "mediapipe")
"""Pose backends: ``auto`` is Sapiens with a CUDA GPU, else MediaPipe."""
HAND_NORMAL_SOURCES = ("auto", "sapiens", "none")
"""Where the hand-normal video comes from; ``none`` is a black video."""
OUTPUT_FORMATS = ("npz", "openpose-json")
"""Keypoints are always written as keypoints.npz; ``openpose-json`` adds one OpenPose JSON per frame."""
ALIGN_MODES = ("auto", "limbs", "none")
"""Retargeting of the driving skeleton: similarity transform, also per-limb lengths, or none."""
OFFLOAD_MODES = ("none", "model", "group")
"""diffusers offloading: none, whole components in turn, or the DiT's blocks streamed."""
SHOT_TYPES = ("close-up", "half-body", "full-body", "distant")
"""The K/V-sharing presets by shot type (port.md §5); ``auto`` picks one from the reference."""
DTYPES = ("auto", "bfloat16", "float32")
"""Model dtypes by name; ``auto`` is bfloat16 on a GPU and float32 on the CPU (``bf16``/``fp32`` are accepted too)."""
CAMERA_MOTIONS = ("pan-left", "pan-right", "pan-up", "pan-down", "zoom-in", "zoom-out")
"""Experimental camera moves steered through the negative guidance branch (``pose.camera``)."""
ATTENTION_CHOICES = ("auto", "native", "cudnn", "flash", "flash3", "sage")
"""Attention kernels, mapped onto diffusers' backend names by ``models.acceleration.resolve_attention``; ``sage`` is
approximate, the others exact."""
QUANTIZE_CHOICES = ("none", "fp8", "int8")
"""torchao weights for the DiT's block linears."""

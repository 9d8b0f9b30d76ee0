"""Device and dtype choice: resolved once, where a job's options enter the library, and passed on as torch objects."""

from __future__ import annotations

import torch

from posegen_cli.choices import DTYPES
from posegen_cli.errors import OptionError, option

_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` picks the first CUDA GPU, else the CPU; ``cuda:N`` must exist. A ``torch.device`` is already resolved.

    Raises OptionError (for the ``device`` setting) for a name it does not know or a GPU that is not visible.
    """
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise OptionError(
                "device", spec, problem=f"{spec}: no CUDA GPU is visible (use {option('device')} cpu, or check the driver with `posegen doctor`)"
            )
        dev = torch.device(spec)
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise OptionError("device", spec, problem=f"{spec}: only {count} GPU(s) visible (use cuda:0..{count - 1})")
        return dev
    raise OptionError("device", spec, problem=f"{spec!r} is not understood (use auto, cpu, cuda or cuda:N)")


def resolve_dtype(spec: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPU (the release's dtype) and float32 on CPU, where bf16 is slow; a ``torch.dtype`` is kept."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in _DTYPE_NAMES:
        raise OptionError("dtype", spec, problem=f"{spec!r} is not understood (use {', '.join(DTYPES[:-1])} or {DTYPES[-1]})")
    return _DTYPE_NAMES[spec]

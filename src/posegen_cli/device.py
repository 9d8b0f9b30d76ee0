"""Device and dtype choice shared by every stage."""

from __future__ import annotations

import torch

from posegen_cli.errors import InputError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA GPU, else the CPU; ``cuda:N`` must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: no CUDA GPU is visible (use --device cpu, or check the driver with `posegen doctor`)")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible (use cuda:0..{torch.cuda.device_count() - 1})")
        return dev
    raise InputError(f"--device {spec!r} is not understood (use auto, cpu, cuda or cuda:N)")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPU (the release's dtype) and float32 on CPU, where bf16 is slow."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if spec not in table:
        raise InputError(f"--dtype {spec!r} is not understood (use auto, bfloat16 or float32)")
    return table[spec]


def available_host_bytes() -> int:
    """Host memory a new allocation can get without swapping: ``MemAvailable`` of /proc/meminfo (Linux).

    Falls back to free physical pages where /proc/meminfo is absent (this under-counts reclaimable page cache).
    """
    import os

    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device_bytes(device: torch.device) -> int:
    """Free memory of ``device``: CUDA's ``mem_get_info``, or available host memory for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_host_bytes()

"""Component placement under diffusers' model CPU offload."""

from __future__ import annotations

import torch


def onload(module: torch.nn.Module) -> torch.device:
    """Let a CPU-offload hook move ``module`` to its execution device, as ``@apply_forward_hook`` does; return that device.

    The encoders and the VAE are driven below their ``forward``/``decode`` (to prepare inputs on the right device,
    or to skip the VAE's per-tile clamp), so the hook has to be triggered explicitly before reading the device.
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)
    return next(module.parameters()).device

"""Component placement under diffusers' model CPU offload and group offloading."""

from __future__ import annotations

import torch


def onload(module: torch.nn.Module) -> torch.device:
    """Let a CPU-offload hook move ``module`` to its execution device, as ``@apply_forward_hook`` does; return that device.

    The encoders and the VAE are driven below their ``forward``/``decode`` (to prepare inputs on the right device,
    or to skip the VAE's per-tile clamp), so the hook has to be triggered explicitly before reading the device.
    Under group offloading the parameters rest on the CPU and each group's hook onloads it: the device is the
    hooks' onload device.
    """
    from diffusers.hooks.group_offloading import _get_group_onload_device, _is_group_offload_enabled

    if _is_group_offload_enabled(module):
        return _get_group_onload_device(module)
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)
    return next(module.parameters()).device

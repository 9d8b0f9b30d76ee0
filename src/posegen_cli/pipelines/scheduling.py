"""The release's flow-match Euler schedule (DiffSynth ``FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True)``).

diffusers' ``FlowMatchEulerDiscreteScheduler`` reproduces the sigmas bit for bit when it is handed the *unshifted*
``linspace(1, 0, N + 1)[:-1]``; ``set_timesteps(N)`` would not (its second sigma is 0.99142...). Its ``step`` upcasts to
float32, while the release updates the latents in their own dtype (bf16), so :func:`euler_step` applies the update.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

SHIFT = 5.0


def make_scheduler(shift: float = SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """A scheduler configured like the release: fixed shift, no dynamic (resolution-dependent) shifting."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)


def unshifted_sigmas(num_steps: int) -> torch.Tensor:
    """``linspace(1, 0, N + 1)`` without its final 0, in float32 as the release computes it."""
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)[:-1]


def set_release_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, sigmas: torch.Tensor | None = None
) -> None:
    """Give ``scheduler`` the release's N sigmas plus a terminal 0 (``scheduler.sigmas`` has N + 1 entries).

    ``sigmas``: other unshifted float32 sigmas [N] to use instead (a distilled model's schedule); the scheduler
    shifts them the same way.
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_steps}")
    if sigmas is not None and len(sigmas) != num_steps:
        raise ValueError(f"{len(sigmas)} sigmas given for {num_steps} steps")
    scheduler.set_timesteps(sigmas=(unshifted_sigmas(num_steps) if sigmas is None else sigmas).numpy())


def shifted_sigmas(unshifted: torch.Tensor, shift: float = SHIFT) -> torch.Tensor:
    """The noise level of each step, ``shift * s / (1 + (shift - 1) * s)``: what the scheduler runs for ``unshifted``."""
    return shift * unshifted / (1 + (shift - 1) * unshifted)


def model_timestep(timestep: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The timestep the DiT sees: ``1000 * sigma`` rounded to the model dtype (bf16 turns 991.7 into 992), shape [1]."""
    return timestep.reshape(1).to(dtype=dtype, device=device)


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """``x + v * (sigma_next - sigma)`` in the latents' dtype; the 0-dim float32 difference does not promote bf16."""
    delta = (sigma_next.float() - sigma.float()).reshape(())
    return latents + velocity.to(latents.dtype) * delta.to(latents.device)


def guided_velocity(positive: torch.Tensor, negative: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance exactly as the release writes it: ``v_neg + g * (v_pos - v_neg)`` in the model dtype."""
    return negative + guidance_scale * (positive - negative)

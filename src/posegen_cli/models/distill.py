"""Step- and guidance-distillation LoRAs that run beside PoseGen's own weights (the ``distill`` setting).

A distillation LoRA is trained on the plain Wan2.1-I2V-14B base; PoseGen is a LoRA on the same base, so the two
stack: the distillation adapter is loaded as a second peft adapter (name :data:`DISTILL_ADAPTER`) on whichever
PoseGen variant is active. Its keys are in Wan's original layout (``diffusion_model.blocks.N.self_attn.q.lora_down``
...), which diffusers' own Wan LoRA reader converts (``WanLoraLoaderMixin.lora_state_dict``); nothing here renames
keys by hand.

The sampling settings each distilled model was trained for are taken from its authors' configuration files, cited
per entry in :data:`DISTILL_PRESETS`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from posegen_cli.errors import InputError

DISTILL_ADAPTER = "distill"
"""peft adapter name of the distillation LoRA, beside the "base"/"transition" PoseGen adapters."""


@dataclass(frozen=True)
class DistillPreset:
    """What the ``distill`` setting NAME loads and how the distilled model must be sampled.

    ``denoising_step_list``: the training timesteps (0..1000) the student denoises at, in order; the sampler uses
    the unshifted sigmas ``linspace(1, 0, 1001)[1000 - t]`` for them and then applies ``shift``, exactly as the
    authors' scheduler does. ``guidance_scale`` 1 means one model pass per step (guidance distilled in).
    """

    name: str
    model: str
    """Registry name in :mod:`posegen_cli.hub`."""
    weight_name: str
    denoising_step_list: tuple[int, ...]
    shift: float
    guidance_scale: float
    source: str


LIGHTX2V = DistillPreset(
    name="lightx2v",
    model="lightx2v-wan21-i2v-distill",
    weight_name="wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors",
    denoising_step_list=(1000, 750, 500, 250),
    shift=5.0,
    guidance_scale=1.0,
    source=(
        "ModelTC/LightX2V configs/distill/wan21/wan_i2v_distill_lora_4step_cfg.json (denoising_step_list "
        "[1000, 750, 500, 250], sample_shift 5, enable_cfg false) and lightx2v/models/schedulers/wan/step_distill/"
        "scheduler.py (sigmas = shift(linspace(1, 0, 1001)[:-1])[1000 - t]), commit f8aee98b5462"
    ),
)

DISTILL_PRESETS: dict[str, DistillPreset] = {LIGHTX2V.name: LIGHTX2V}


@dataclass(frozen=True)
class DistillChoice:
    """Which distillation LoRA a job loads (a name of :data:`DISTILL_PRESETS`) and at what strength (1: the authors')."""

    name: str
    weight: float = 1.0


def get_distill_preset(name: str) -> DistillPreset:
    try:
        return DISTILL_PRESETS[name]
    except KeyError:
        raise InputError(f"unknown distillation {name!r} (known: {', '.join(DISTILL_PRESETS)})") from None


def distill_unshifted_sigmas(denoising_step_list: tuple[int, ...], num_train_timesteps: int = 1000) -> torch.Tensor:
    """float32 unshifted sigmas [N] of a distilled schedule: ``linspace(1, 0, T + 1)[:-1][T - t]`` for each t.

    Raises ValueError for timesteps outside 1..T or not strictly decreasing (the student was trained on a
    decreasing list; source: LightX2V's ``WanStepDistillScheduler.set_denoising_timesteps``).
    """
    steps = list(denoising_step_list)
    if not steps or any(not 0 < t <= num_train_timesteps for t in steps) or any(a <= b for a, b in itertools.pairwise(steps)):
        raise ValueError(f"denoising_step_list {steps} must be strictly decreasing timesteps in 1..{num_train_timesteps}")
    grid = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
    return grid[[num_train_timesteps - t for t in steps]]


def _unconverted(key: str) -> bool:
    """Keys diffusers 0.42's Wan converter drops: norm deltas and per-block modulation deltas (``diff_m``)."""
    if key.endswith(".diff_m"):
        return True
    return "norm" in key and key.endswith((".diff", ".diff_b"))


@dataclass
class DistillLora:
    """A distillation LoRA in diffusers' names, ready for ``load_lora_adapter(prefix="transformer")``.

    ``ignored``: keys of the file that diffusers' converter does not apply (norm and modulation deltas), kept
    for the run summary.
    """

    state_dict: dict[str, torch.Tensor]
    ignored: tuple[str, ...]
    source: str


def read_distill_lora(path_or_state_dict: str | Path | dict[str, torch.Tensor]) -> DistillLora:
    """Read a Wan LoRA file (``.safetensors``) or state dict in Wan's original, kohya or diffusers key layout.

    Conversion is diffusers' (``WanLoraLoaderMixin.lora_state_dict``): ``lora_down``/``lora_up`` become ``lora_A``/
    ``lora_B``, ``alpha`` is folded into the pair, ``diff_b`` bias deltas become peft ``lora_B.bias``. Keys it does not
    convert (``.diff`` of norms, ``diff_m`` modulation deltas) are listed in ``ignored``. Raises InputError naming the
    file when it holds no LoRA diffusers can read.
    """
    from diffusers.loaders import WanLoraLoaderMixin

    if isinstance(path_or_state_dict, dict):
        raw, source = dict(path_or_state_dict), "the given state dict"
    else:
        from safetensors.torch import load_file

        source = str(path_or_state_dict)
        try:
            raw = load_file(str(path_or_state_dict))
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is one clear line
            raise InputError(f"{source}: not a readable safetensors LoRA ({exc}); run `posegen download` again") from None
    try:
        converted = WanLoraLoaderMixin.lora_state_dict(dict(raw))
    except (ValueError, KeyError) as exc:
        raise InputError(f"{source}: not a Wan LoRA diffusers can convert ({exc or type(exc).__name__})") from None
    if not any(".lora_A." in key for key in converted):
        raise InputError(f"{source}: holds no LoRA pairs (lora_down/lora_up or lora_A/lora_B)")
    if any(key.endswith(".lora_B.bias") for key in converted):
        # peft then gives every adapted layer a bias; layers without a delta in the file get an explicit zero one.
        for key in [k for k in converted if k.endswith(".lora_B.weight")]:
            bias = key.removesuffix(".weight") + ".bias"
            if bias not in converted:
                converted[bias] = converted[key].new_zeros(converted[key].shape[0])
    ignored = tuple(sorted(k for k in raw if _unconverted(k)))
    return DistillLora(converted, ignored, source)

"""Speed-ups of the PoseGen DiT that PyTorch and diffusers provide: attention kernels, regional compilation, torchao.

- Attention: every attention call of the model goes through diffusers' dispatcher (``dispatch_attention_fn``), so
  :func:`resolve_attention` only has to pick one of diffusers' backend names and ``set_attention_backend`` it. No
  call uses a mask, so no kernel is excluded. All choices but ``sage`` are exact attention (results differ from
  ``native`` only by floating-point rounding); SageAttention quantises Q/K to int8 and P/V to fp8 and is approximate.
- Compilation: :func:`compile_blocks` is diffusers' ``compile_repeated_blocks`` (one graph per block variant, reused
  by all 40 blocks), see its docstring for what a base/transition swap costs.
- Quantisation: :func:`quantize_linears` applies torchao to the DiT's linear layers (see its docstring for the rule
  that keeps both variants exact).

Backend facts: shared/specs/performance.md §A.1 (diffusers 0.42.1 ``attention_dispatch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from posegen_cli.choices import ATTENTION_CHOICES, QUANTIZE_CHOICES
from posegen_cli.errors import InputError, OptionError

APPROXIMATE_ATTENTION = frozenset({"sage"})
_HALF = (torch.bfloat16, torch.float16)
FLASH3_HUB_REPO = "kernels-community/flash-attn3"
SAGE_HUB_REPO = "SageAttention/sage-attention"


@dataclass(frozen=True)
class AttentionChoice:
    """The kernel a run uses: the attention choice asked for, what it resolved to, diffusers' backend name."""

    requested: str
    choice: str
    backend: str
    exact: bool
    why: str

    def describe(self) -> str:
        kind = "exact" if self.exact else "approximate"
        return f"{self.choice} (diffusers backend {self.backend}, {kind}; {self.why})"


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _hub_kernel_cached(repo_id: str) -> bool:
    """Whether a Hub kernel repository is in the local Hugging Face cache (so it loads without a network)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))).is_dir()


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def resolve_attention(requested: str, device: torch.device, dtype: torch.dtype) -> AttentionChoice:
    """Map an attention choice to diffusers' backend name for this device and dtype, or raise InputError.

    ``auto`` takes the fastest exact kernel present: on Hopper (sm90) FlashAttention-3 (the ``flash_attn_interface``
    package, or the Hub kernel ``kernels-community/flash-attn3`` when already cached), else cuDNN attention; on
    Ampere/Ada (sm80-89) FlashAttention-2 (``flash-attn``), else PyTorch's built-in flash kernel; elsewhere (CPU,
    fp32, older GPUs) PyTorch's SDPA (``native``). An explicit choice that cannot run raises an InputError that
    names what to install or change.
    """
    if requested not in ATTENTION_CHOICES:
        raise OptionError("attention", requested, ATTENTION_CHOICES)
    cap = _capability(device)
    half = dtype in _HALF
    if requested == "auto":
        if cap is None or not half or cap < (8, 0):
            why = "CPU" if cap is None else ("fp32 weights" if not half else f"compute capability {cap[0]}.{cap[1]}")
            return AttentionChoice("auto", "native", "native", True, f"auto: PyTorch SDPA ({why})")
        if cap[0] == 9:
            if _importable("flash_attn_interface"):
                return AttentionChoice("auto", "flash3", "_flash_3", True, "auto: FlashAttention-3 package on Hopper")
            if _importable("kernels") and _hub_kernel_cached(FLASH3_HUB_REPO):
                return AttentionChoice("auto", "flash3", "_flash_3_hub", True, "auto: cached FlashAttention-3 Hub kernel on Hopper")
            return AttentionChoice("auto", "cudnn", "_native_cudnn", True, "auto: cuDNN attention on Hopper (no FlashAttention-3 found)")
        if _importable("flash_attn"):
            return AttentionChoice("auto", "flash", "flash", True, "auto: FlashAttention-2 package")
        return AttentionChoice("auto", "flash", "_native_flash", True, "auto: PyTorch's built-in FlashAttention-2")
    if requested == "native":
        return AttentionChoice(requested, "native", "native", True, "PyTorch SDPA")
    if cap is None:
        raise InputError(f"attention kernel {requested!r} needs a CUDA GPU (this run is on {device}); use native or auto")
    if not half:
        raise InputError(f"attention kernel {requested!r} needs bfloat16 or float16 weights, not {dtype}; use bfloat16 or native attention")
    if cap < (8, 0):
        raise InputError(
            f"attention kernel {requested!r} needs compute capability 8.0 or newer, this GPU has {cap[0]}.{cap[1]}; use native"
        )
    if requested == "cudnn":
        return AttentionChoice(requested, "cudnn", "_native_cudnn", True, "cuDNN attention through PyTorch SDPA")
    if requested == "flash":
        if _importable("flash_attn"):
            return AttentionChoice(requested, "flash", "flash", True, "FlashAttention-2 package")
        return AttentionChoice(requested, "flash", "_native_flash", True, "PyTorch's built-in FlashAttention-2 (flash-attn not installed)")
    if requested == "flash3":
        if cap[0] != 9:
            raise InputError(
                f"attention kernel 'flash3' (FlashAttention-3) runs on Hopper GPUs (compute capability 9.x), this one has {cap[0]}.{cap[1]}; use flash or cudnn"
            )
        if _importable("flash_attn_interface"):
            return AttentionChoice(requested, "flash3", "_flash_3", True, "FlashAttention-3 package")
        if _importable("kernels"):
            return AttentionChoice(requested, "flash3", "_flash_3_hub", True, f"FlashAttention-3 Hub kernel {FLASH3_HUB_REPO}")
        raise InputError(
            "attention kernel 'flash3' needs FlashAttention-3: pip install kernels (it fetches the Hub kernel "
            f"{FLASH3_HUB_REPO} once), or build flash-attn's hopper/ package from source"
        )
    if _importable("sageattention"):
        return AttentionChoice(requested, "sage", "sage", False, "SageAttention package (int8 Q/K, approximate)")
    if _importable("kernels"):
        return AttentionChoice(requested, "sage", "sage_hub", False, f"SageAttention Hub kernel {SAGE_HUB_REPO} (approximate)")
    raise InputError("attention kernel 'sage' needs SageAttention: pip install sageattention, or pip install kernels for the Hub kernel")


def set_attention(transformer: torch.nn.Module, choice: AttentionChoice) -> None:
    """Point every attention processor of ``transformer`` at ``choice.backend`` (diffusers' ``set_attention_backend``).

    Hub kernels are fetched here on first use; a failure (no network, untrusted publisher) becomes an InputError.
    """
    try:
        transformer.set_attention_backend(choice.backend)
    except (RuntimeError, ValueError, OSError, ImportError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"attention kernel {choice.choice!r} ({choice.backend}) cannot be loaded: {first}") from None


COMPILE_RECOMPILE_LIMIT = 64
"""Graphs dynamo may keep per block code object. A block compiles into one graph per K/V role it plays (plain,
subject-map first/other, record, replay first/other sharing block, replay of the unconditional branch), all shared
by the 40 blocks: about 8, which is dynamo's default limit; the head-room keeps a second resolution compiled too."""


def compile_blocks(transformer: torch.nn.Module, *, backend: str | object = "inductor", fullgraph: bool = True) -> None:
    """Regional compilation: diffusers' ``compile_repeated_blocks`` on every ``PoseGenTransformerBlock``.

    ``fullgraph=True`` makes a graph break an error (the block, K/V record and replay included, has none), and
    ``dynamic=False`` because every segment of a job has the same shapes. What a base/transition swap costs: nothing
    in compilation. A swap writes the variant's weights into the same parameters (or re-quantises them into tensors of
    the same kind) and changes the RoPE table and hand embedding, which live outside the blocks; dynamo guards on
    tensor shapes, dtypes and the K/V roles, not on weight values, so no block recompiles after the first segment
    of each kind (checked by a test with a counting backend).
    """
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), COMPILE_RECOMPILE_LIMIT))
    transformer.compile_repeated_blocks(fullgraph=fullgraph, dynamic=False, backend=backend)


FP8_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (8.9) and Hopper (9.0) and newer."""


def quantization_config(kind: str, device: torch.device) -> object | None:
    """torchao config for ``kind`` ("none" gives None), checked against the device; InputError when it cannot run.

    fp8: ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` (row-wise fp8 weights and activations,
    fp8 GEMMs), needs compute capability >= 8.9. int8: ``Int8WeightOnlyConfig()`` (per-channel int8 weights,
    bf16 GEMMs after dequantisation), runs anywhere, the CPU included; it saves memory, not time.
    """
    if kind not in QUANTIZE_CHOICES:
        raise OptionError("quantize", kind, QUANTIZE_CHOICES)
    if kind == "none":
        return None
    if kind == "fp8":
        cap = _capability(device)
        if cap is None or cap < FP8_CAPABILITY:
            have = "a CPU" if cap is None else f"compute capability {cap[0]}.{cap[1]}"
            raise InputError(
                f"fp8 weights need an FP8 GPU (compute capability 8.9 or newer: L40S, RTX 4090, H100, H200), not {have}; use int8 or none"
            )
    torchao = _import_torchao()
    if kind == "fp8":
        return torchao.Float8DynamicActivationFloat8WeightConfig(granularity=torchao.PerRow())
    return torchao.Int8WeightOnlyConfig()


def _import_torchao():
    """torchao.quantization, with its import-time chatter (optional C++ kernels it could not load) kept quiet."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        from torchao import quantization
    except ImportError:
        raise InputError("quantized weights need torchao: pip install torchao (or pip install 'posegen[speed]')") from None
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    return quantization


def is_block_linear(module: torch.nn.Module, name: str) -> bool:
    """The linear layers torchao quantises: those of the transformer blocks (99.9 % of the DiT's weights).

    Embeddings, time projections and the output head stay in the model dtype, as in LightX2V's fp8 Wan; so do the
    low-rank ``lora_A``/``lora_B`` layers of a peft adapter (a distillation LoRA), whose base layer is quantised.
    """
    return isinstance(module, torch.nn.Linear) and name.startswith("blocks.") and ".lora_" not in name


def quantize_linears(transformer: torch.nn.Module, config: object) -> None:
    """Quantise the block linears of ``transformer`` in place with the torchao ``config``."""
    torchao = _import_torchao()
    torchao.quantize_(transformer, config, filter_fn=is_block_linear)


def requantize_linear(linear: torch.nn.Linear, weight: torch.Tensor, config: object) -> None:
    """Give an already quantised linear layer a new full-precision ``weight`` and quantise it again with ``config``."""
    torchao = _import_torchao()
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    torchao.quantize_(linear, config)


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether a parameter is a torchao quantised tensor (a tensor subclass) rather than a plain tensor."""
    return type(tensor.data) is not torch.Tensor

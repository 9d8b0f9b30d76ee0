"""Base-segment and transition-segment PoseGen on one in-memory model, switched in place.

The two release folders each hold a full 14B DiT, but they share the Wan base weights and differ only in
their LoRA pairs and a few fully trained tensors (patch embeddings, hand embedding). One model holds the
shared weights; ``activate`` swaps the variant's LoRA and own tensors in place, so a run never holds or
reloads a second model. Two forms:

- ``mode="exact"`` (default): on each switch, W + 1.0·(B·A) is recomputed from the pristine W exactly as the
  release merges (spec §3.4) and copied into the model: bit-identical to ``convert_checkpoint``. The pristine
  LoRA-target weights stay in host memory (file-backed through mmap when the shards allow it).
- ``mode="adapter"``: both LoRAs stay loaded as peft adapters and a switch is ``set_adapters`` plus a copy of
  the own tensors: nothing extra in host memory and near-instant switches, but W·x + B·(A·x) rounds differently
  from (W + B·A)·x in bf16 (the tests state the bound).
- ``mode="converted"`` (:meth:`PoseGenVariants.from_converted`): both folders converted once into merged
  safetensors (``checkpoint_cache``); the tensors whose digests differ are copied from the other variant's
  memory-mapped files on each switch. No CPU merge, no host copy, bit-identical to "exact".

A step-distillation LoRA (:mod:`posegen_cli.models.distill`) joins any form as one more peft adapter,
``"distill"``, with its own weight; ``activate`` keeps it on across variant switches (the exact and converted modes
write the PoseGen weights into the wrapped layers' ``base_layer``, under the adapter, so the converted cache stays
the PoseGen checkpoints alone and needs no key for the distillation).

Under diffusers' group offloading (``offload="group"``) a switch stays correct: the hooks offload every group when
they are applied, so the parameters ``activate`` writes into are the host copies each group is onloaded from (the
pinned copies with ``use_stream=True``). When the variants' hand embeddings differ in structure, the model holds
both from construction (``hand_patch_embedding`` and ``standby_hand_embedding``, in the top-level offload group)
and a switch exchanges them: no hook is rebuilt.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from posegen_cli.errors import InputError
from posegen_cli.models.acceleration import is_quantized, quantize_linears, requantize_linear
from posegen_cli.models.convert import (
    ReleaseCheckpoint,
    build_model,
    lora_delta,
    read_release_checkpoint,
    release_key_to_diffusers,
    release_module_to_diffusers,
    to_diffusers_names,
)
from posegen_cli.models.distill import DISTILL_ADAPTER, DistillLora
from posegen_cli.models.transformer import PoseGenTransformer3DModel, hand_embedding
from posegen_cli.report import Reporter

VariantName = Literal["base", "transition"]
Mode = Literal["exact", "adapter", "converted"]
_SWITCHABLE_CONFIG = ("shift_ref_pos", "use_hand_proj")


@dataclass
class _Variant:
    config: dict[str, bool]
    own: dict[str, torch.Tensor]
    hand: nn.Module | None
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    raw_targets: dict[str, torch.Tensor]
    merge_dtype: torch.dtype
    files: dict[str, Path] = field(default_factory=dict)
    """Converted mode: the safetensors file holding each switched tensor of this variant."""


@dataclass
class VariantMemory:
    """What holding both variants costs, against the two merged models the release would load."""

    model_bytes: int
    merged_model_bytes: int
    host_bytes: int
    variant_bytes: dict[str, int]
    load_seconds: float
    switch_seconds: list[float] = field(default_factory=list)

    @property
    def held_bytes(self) -> int:
        """The model, each variant's own tensors kept aside, and (exact mode) the pristine weights and LoRA pairs."""
        return self.model_bytes + sum(self.variant_bytes.values()) + self.host_bytes

    @property
    def two_models_bytes(self) -> int:
        return 2 * self.merged_model_bytes


def _hand_module(config: dict, sd: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The transition's hand embedding when the two variants disagree on its structure (``use_hand_proj``)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    module = hand_embedding(config["out_channels"], inner, tuple(config["patch_size"]), config["use_hand_proj"])
    prefix = "hand_patch_embedding."
    weights = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    module.load_state_dict(weights, strict=True)
    return module.to(device=device, dtype=dtype)


def _peft_state_dict(ckpt: ReleaseCheckpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The folder's LoRA pairs under diffusers module names, in the form ``load_lora_adapter`` reads.

    No alpha entries are written, so peft uses alpha = r: scale 1.0, the release's merge scale.
    """
    out = {}
    for target, (up, down) in ckpt.lora_pairs().items():
        module = release_module_to_diffusers(target.rpartition(".")[0])
        if module is None or up.ndim != 2:
            raise InputError(f"{ckpt.sources[target]}: LoRA on {target} cannot be loaded as a peft adapter")
        out[f"{module}.lora_A.weight"] = down.to(dtype)
        out[f"{module}.lora_B.weight"] = up.to(dtype)
    return out


def _check_pair(configs: dict[str, dict], base_keys: set[str], cond_keys: set[str], base_dir: Path, cond_dir: Path, config_name: str) -> bool:
    """Raise an InputError unless the folders are two variants of one model; returns whether their hand modules match.

    Variants may differ only in the switchable flags (RoPE shift, hand projection) and, with different hand
    modules, in the hand embedding's tensors.
    """
    fixed = {name: {k: v for k, v in c.items() if k not in _SWITCHABLE_CONFIG} for name, c in configs.items()}
    if fixed["base"] != fixed["transition"]:
        differ = sorted(k for k in fixed["base"] if fixed["base"][k] != fixed["transition"].get(k))
        raise InputError(f"{cond_dir}: {config_name} differs from {base_dir} in {', '.join(differ)}; not two variants of one model")
    same_hand = configs["base"]["use_hand_proj"] == configs["transition"]["use_hand_proj"]
    extra = {k for k in base_keys ^ cond_keys if same_hand or not k.startswith("hand_patch_embedding.")}
    if extra:
        raise InputError(f"{cond_dir}: tensors {', '.join(sorted(extra)[:3])} are not in both folders; not two variants of one model")
    return same_hand


def _safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file of a ``save_pretrained`` folder (one file, or shards with an index)."""
    import json

    from safetensors import safe_open

    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out


def _read_tensors(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for key, path in files.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out[key] = f.get_tensor(key)
    return out


def _weights_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's own parameters under their diffusers names, also where peft wrapped a layer (``.base_layer.``)."""
    return {name.replace(".base_layer.", "."): p for name, p in model.named_parameters() if ".lora_" not in name}


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _lora_by_param(ckpt: ReleaseCheckpoint) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Diffusers parameter name -> (B, A) for the folder's LoRA pairs."""
    out = {}
    for target, pair in ckpt.lora_pairs().items():
        key = release_key_to_diffusers(target)
        if key is None:
            raise InputError(f"{ckpt.sources[target]}: LoRA targets {target}, which is not part of the PoseGen DiT")
        out[key] = pair
    return out


class PoseGenVariants:
    """One PoseGen model switched between the "base" and "transition" checkpoints in place."""

    def __init__(
        self,
        model: PoseGenTransformer3DModel,
        variants: dict[str, _Variant],
        pristine: dict[str, torch.Tensor],
        mode: Mode,
        memory: VariantMemory,
    ) -> None:
        self.model = model
        self.variants = variants
        self.pristine = pristine
        self.mode = mode
        self.memory = memory
        self.active: str | None = None
        self.distill_weight: float | None = None
        self.quantization: object | None = None
        standby = variants["transition"].hand
        if standby is not None:
            model.hold_standby_hand_embedding(standby)

    @classmethod
    def from_release(
        cls,
        base_dir: str | Path,
        cond_dir: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        mode: Mode = "exact",
        reporter: Reporter | None = None,
    ) -> PoseGenVariants:
        """Read both release folders once; keep tensors equal in both a single time."""
        if mode not in ("exact", "adapter"):
            raise ValueError(f"mode must be 'exact' or 'adapter', not {mode!r}")
        start = time.perf_counter()
        device = torch.device(device)
        ckpts = {"base": read_release_checkpoint(base_dir, reporter), "transition": read_release_checkpoint(cond_dir, reporter)}
        sds = {name: to_diffusers_names(ck.base, ck) for name, ck in ckpts.items()}
        base_sd, cond_sd = sds["base"], sds["transition"]
        same_hand = _check_pair(
            {name: ck.config for name, ck in ckpts.items()}, set(base_sd), set(cond_sd), Path(base_dir), Path(cond_dir), "model_config.json"
        )

        def differs(key: str) -> bool:
            if key.startswith("hand_patch_embedding.") and not same_hand:
                return False
            other = cond_sd[key]
            return other.shape != base_sd[key].shape or not torch.equal(other, base_sd[key])

        own_keys = {k for k in base_sd if differs(k)}
        loras = {name: _lora_by_param(ck) for name, ck in ckpts.items()}
        targets = set(loras["base"]) | set(loras["transition"]) if mode == "exact" else set()
        pristine = {k: base_sd[k] for k in targets - own_keys}

        model = build_model(ckpts["base"].config, base_sd, ckpts["base"], dtype, copy=True).to(device)
        variants: dict[str, _Variant] = {}
        for name, ck in ckpts.items():
            own = {k: sds[name][k].to(device=device, dtype=dtype, copy=True) for k in own_keys - targets}
            raw = {k: sds[name][k] for k in own_keys & targets}
            hand = None if same_hand else model.hand_patch_embedding if name == "base" else _hand_module(ck.config, sds[name], dtype, device)
            flags = {k: bool(ck.config[k]) for k in _SWITCHABLE_CONFIG}
            variants[name] = _Variant(flags, own, hand, loras[name], raw, ck.merge_dtype)
            if mode == "adapter":
                with warnings.catch_warnings():
                    # peft warns that a second adapter joins the first: holding both is the point here.
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    model.load_lora_adapter(_peft_state_dict(ck, dtype), prefix=None, adapter_name=name)
        params = list(model.named_parameters())
        host = 0
        if mode == "exact":
            host = _nbytes(pristine) + sum(
                _nbytes(v.raw_targets) + sum(b.nbytes + a.nbytes for b, a in v.lora.values()) for v in variants.values()
            )
        memory = VariantMemory(
            model_bytes=sum(p.nbytes for _, p in params),
            merged_model_bytes=sum(p.nbytes for n, p in params if "lora_" not in n),
            host_bytes=host,
            variant_bytes={
                n: _nbytes(v.own) + (sum(p.nbytes for p in v.hand.parameters()) if n == "transition" and v.hand is not None else 0)
                for n, v in variants.items()
            },
            load_seconds=time.perf_counter() - start,
        )
        out = cls(model, variants, pristine, mode, memory)
        out.activate("base")
        return out

    @classmethod
    def from_converted(
        cls,
        base_dir: str | Path,
        cond_dir: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        reporter: Reporter | None = None,
    ) -> PoseGenVariants:
        """Both variants from their converted folders (``checkpoint_cache.converted_checkpoint``), base active.

        The base folder is loaded with ``from_pretrained`` straight onto ``device`` (safetensors memory map); which
        tensors differ between the variants is read from the folders' digests, not by comparing tensors.
        """
        from posegen_cli.models.checkpoint_cache import read_digests

        start = time.perf_counter()
        device = torch.device(device)
        dirs = {"base": Path(base_dir), "transition": Path(cond_dir)}
        configs = {name: PoseGenTransformer3DModel.load_config(str(d)) for name, d in dirs.items()}
        configs = {name: {k: v for k, v in c.items() if not k.startswith("_")} for name, c in configs.items()}
        digests = {name: read_digests(d) for name, d in dirs.items()}
        same_hand = _check_pair(configs, set(digests["base"]), set(digests["transition"]), dirs["base"], dirs["transition"], "config.json")
        structural = "" if same_hand else "hand_patch_embedding."
        switched = {k for k, d in digests["base"].items() if not (structural and k.startswith(structural)) and digests["transition"][k] != d}
        model = PoseGenTransformer3DModel.from_pretrained(
            str(dirs["base"]), torch_dtype=dtype, low_cpu_mem_usage=True, device_map={"": device}
        ).eval()
        if device.type == "cpu":
            # Memory-mapped tensors sit at unaligned file offsets, where CPU GEMM kernels may block (and so round)
            # differently from freshly allocated weights; aligned copies compute as the release's loaded weights do.
            with torch.no_grad():
                for param in model.parameters():
                    param.data = param.data.clone()
        variants: dict[str, _Variant] = {}
        for name, folder in dirs.items():
            files = _safetensors_files(folder)
            hand = None if same_hand else model.hand_patch_embedding
            if not same_hand and name == "transition":
                hand_sd = _read_tensors({k: f for k, f in files.items() if k.startswith("hand_patch_embedding.")})
                hand = _hand_module(configs[name], hand_sd, dtype, device)
            flags = {k: bool(configs[name][k]) for k in _SWITCHABLE_CONFIG}
            variants[name] = _Variant(flags, {}, hand, {}, {}, dtype, {k: files[k] for k in switched})
        params = list(model.named_parameters())
        memory = VariantMemory(
            model_bytes=sum(p.nbytes for _, p in params),
            merged_model_bytes=sum(p.nbytes for _, p in params),
            host_bytes=0,
            variant_bytes=dict.fromkeys(variants, 0),
            load_seconds=time.perf_counter() - start,
        )
        out = cls(model, variants, {}, "converted", memory)
        out.active = "base"
        model.register_to_config(**variants["base"].config)
        if reporter is not None:
            reporter.info(f"loaded the DiT in {memory.load_seconds:.1f} s; {len(switched)} tensors differ between base and transition")
        return out

    def load_distill(self, lora: DistillLora, weight: float = 1.0) -> None:
        """Add a distillation LoRA as the peft adapter ``"distill"`` at ``weight`` beside the PoseGen variants.

        Call before group offloading is enabled (its hooks bind the modules present then). Raises InputError when
        the LoRA targets layers this model does not have.
        """
        if self.distill_weight is not None:
            raise RuntimeError("a distillation LoRA is already loaded")
        model = self.model
        names = {name for name, _ in model.named_modules()}
        missing = sorted({k.removeprefix("transformer.").split(".lora_")[0] for k in lora.state_dict} - names)
        if missing:
            raise InputError(f"{lora.source}: LoRA targets {', '.join(missing[:3])}, which the PoseGen DiT does not have (is it a Wan2.1-14B LoRA?)")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            model.load_lora_adapter(lora.state_dict, prefix="transformer", adapter_name=DISTILL_ADAPTER)
        self.distill_weight = float(weight)
        self._set_adapters()

    def _set_adapters(self) -> None:
        """The active peft adapters: the variant's (adapter mode) and the distillation LoRA, if any."""
        names, weights = [], []
        if self.mode == "adapter" and self.active is not None:
            names.append(self.active)
            weights.append(1.0)
        if self.distill_weight is not None:
            names.append(DISTILL_ADAPTER)
            weights.append(self.distill_weight)
        if names:
            self.model.set_adapters(names, weights)

    def quantize(self, config: object) -> None:
        """Quantise the block linears with the torchao ``config``, now and after every switch.

        The rule that keeps both variants exact: a switch computes each swapped weight in full precision exactly as
        without quantisation, then quantises it, so the active variant is always ``quantize(its merged weights)``,
        the same as quantising that checkpoint alone. Memory: one quantised model on the device (about half the
        bf16 bytes for int8/fp8) plus the same host copies as without quantisation; a switch re-quantises the
        swapped layers (about a second per GB of weights, estimate).
        """
        if self.mode == "adapter":
            raise ValueError("quantised weights need mode='exact' or 'converted': peft adapters cannot wrap torchao's quantised layers")
        quantize_linears(self.model, config)
        self.quantization = config

    def _write(self, params: dict[str, nn.Parameter], key: str, value: torch.Tensor) -> None:
        param = params[key]
        if is_quantized(param):
            layer = self.model.get_submodule(key.rpartition(".")[0])
            # a layer peft wrapped for the distillation LoRA holds the quantised weights in its base_layer
            requantize_linear(getattr(layer, "base_layer", layer), value.to(param.dtype), self.quantization)
        else:
            param.copy_(value.to(param.dtype))

    @torch.no_grad()
    def activate(self, name: VariantName) -> PoseGenTransformer3DModel:
        """Make ``model`` compute as the ``name`` checkpoint: its LoRA, its own tensors, its RoPE and hand flags."""
        if name not in self.variants:
            raise ValueError(f"unknown variant {name!r}; use 'base' or 'transition'")
        if name == self.active:
            return self.model
        start = time.perf_counter()
        variant = self.variants[name]
        model = self.model
        params = _weights_by_name(model)
        if self.mode == "converted":
            from safetensors import safe_open

            by_file: dict[Path, list[str]] = {}
            for key, path in variant.files.items():
                by_file.setdefault(path, []).append(key)
            for path, keys in by_file.items():
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for key in keys:
                        self._write(params, key, f.get_tensor(key))
        elif self.mode == "exact":
            for key in {*self.pristine, *variant.raw_targets}:
                weight = variant.raw_targets.get(key, self.pristine.get(key))
                if key in variant.lora:
                    up, down = variant.lora[key]
                    weight = weight + lora_delta(up, down, weight, variant.merge_dtype)
                self._write(params, key, weight)
        for key, tensor in variant.own.items():
            self._write(params, key, tensor)
        if variant.hand is not None and model.hand_patch_embedding is not variant.hand:
            model.swap_hand_embedding()
        model.register_to_config(**variant.config)
        self.active = name
        self._set_adapters()
        self.memory.switch_seconds.append(time.perf_counter() - start)
        return model

"""PoseGen release checkpoints (DiffSynth ``pipe.dit.*`` peft shards) to diffusers folders.

A release folder holds ``model_config.json`` and ``*.bin`` shards with the complete DiT: base weights under
peft's ``base_layer`` names, LoRA pairs (``lora_A``/``lora_B``) and the fully trained patch embeddings. The
release merges W ← W + 1.0·(B·A) on CPU in the dtype of the first non-LoRA tensor, then casts to bf16; this
module does the same, byte for byte, and renames to diffusers' Wan names (spec §3).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posegen_cli.errors import InputError
from posegen_cli.fsutil import atomic_dir
from posegen_cli.report import Reporter

RELEASE_PREFIX = "pipe.dit."
CONFIG_NAME = "model_config.json"

_REQUIRED_FIELDS = ("dim", "in_dim", "ffn_dim", "out_dim", "text_dim", "freq_dim", "eps", "patch_size", "num_heads", "num_layers")
_KNOWN_FIELDS = {*_REQUIRED_FIELDS, "has_image_input", "has_image_pos_emb", "shift_ref_pos", "use_hand", "use_hand_proj"}

# Module paths: release (DiffSynth / original Wan) -> diffusers. Parameter names (weight, bias) are kept.
_TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "ref_patch_embedding": "ref_patch_embedding",
    "hand_patch_embedding": "hand_patch_embedding",
    "hand_patch_embedding.0": "hand_patch_embedding.0",
    "hand_patch_embedding.1": "hand_patch_embedding.1",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
}
_BLOCK_MODULES = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def release_module_to_diffusers(path: str) -> str | None:
    """Diffusers module path for a release module path, or None if it is not part of the PoseGen DiT."""
    if path in _TOP_MODULES:
        return _TOP_MODULES[path]
    match = _BLOCK.fullmatch(path)
    if match and match.group(2) in _BLOCK_MODULES:
        return f"blocks.{match.group(1)}.{_BLOCK_MODULES[match.group(2)]}"
    return None


def release_key_to_diffusers(key: str) -> str | None:
    """Diffusers parameter name for a release parameter name (``.base_layer`` already removed), or None."""
    if key == "head.modulation":
        return "scale_shift_table"
    match = _BLOCK.fullmatch(key)
    if match and match.group(2) == "modulation":
        return f"blocks.{match.group(1)}.scale_shift_table"
    module, _, param = key.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    target = release_module_to_diffusers(module)
    return None if target is None else f"{target}.{param}"


_TOP_MODULES_BACK = {v: k for k, v in _TOP_MODULES.items()}
_BLOCK_MODULES_BACK = {v: k for k, v in _BLOCK_MODULES.items()}


def diffusers_key_to_release(key: str) -> str | None:
    """Release parameter name for a diffusers parameter name, or None: the inverse of :func:`release_key_to_diffusers`."""
    if key == "scale_shift_table":
        return "head.modulation"
    match = _BLOCK.fullmatch(key)
    if match and match.group(2) == "scale_shift_table":
        return f"blocks.{match.group(1)}.modulation"
    module, _, param = key.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    if module in _TOP_MODULES_BACK:
        return f"{_TOP_MODULES_BACK[module]}.{param}"
    match = _BLOCK.fullmatch(module)
    if match and match.group(2) in _BLOCK_MODULES_BACK:
        return f"blocks.{match.group(1)}.{_BLOCK_MODULES_BACK[match.group(2)]}.{param}"
    return None


def release_config_to_diffusers(config: dict[str, Any], source: Path) -> dict[str, Any]:
    """The diffusers config of ``PoseGenTransformer3DModel`` for a release ``model_config.json``."""
    missing = [f for f in _REQUIRED_FIELDS if f not in config]
    if missing:
        raise InputError(f"{source}: missing field(s) {', '.join(missing)} (is this a PoseGen model_config.json?)")
    unknown = sorted(set(config) - _KNOWN_FIELDS)
    if unknown:
        raise InputError(f"{source}: unknown field(s) {', '.join(unknown)} (the release's loader would reject them too)")
    if not config.get("has_image_input", False):
        raise InputError(f"{source}: has_image_input is false, but PoseGen is image-to-video and needs the CLIP branch")
    if config.get("has_image_pos_emb", False):
        raise InputError(f"{source}: has_image_pos_emb (first/last-frame model) is not a PoseGen checkpoint")
    dim, heads = int(config["dim"]), int(config["num_heads"])
    if dim % heads:
        raise InputError(f"{source}: dim {dim} is not divisible by num_heads {heads}")
    return {
        "patch_size": [int(p) for p in config["patch_size"]],
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": int(config["in_dim"]),
        "out_channels": int(config["out_dim"]),
        "text_dim": int(config["text_dim"]),
        "freq_dim": int(config["freq_dim"]),
        "ffn_dim": int(config["ffn_dim"]),
        "num_layers": int(config["num_layers"]),
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": float(config["eps"]),
        "image_dim": 1280,
        "added_kv_proj_dim": dim,
        "rope_max_seq_len": 1024,
        "shift_ref_pos": bool(config.get("shift_ref_pos", False)),
        "use_hand": bool(config.get("use_hand", False)),
        "use_hand_proj": bool(config.get("use_hand_proj", False)),
    }


@dataclass
class ReleaseCheckpoint:
    """One release folder as read from disk: release names, base and LoRA tensors kept apart, nothing merged.

    ``base`` keeps the release's insertion order (first file first) because the merge dtype is the dtype of
    its first entry; a key repeated in a later file keeps its first position and takes the later value.
    """

    folder: Path
    config: dict[str, Any]
    base: dict[str, torch.Tensor]
    lora: dict[str, torch.Tensor]
    sources: dict[str, Path]

    @property
    def merge_dtype(self) -> torch.dtype:
        return next(iter(self.base.values())).dtype

    def lora_pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Release parameter name -> (B "up", A "down") for every LoRA pair, as the release pairs them."""
        pairs = {}
        for key, up in self.lora.items():
            parts = key.split(".")
            if "lora_B" not in parts:
                continue
            at = parts.index("lora_B")
            down_key = key.replace(".lora_B.", ".lora_A.")
            if down_key not in self.lora:
                raise InputError(f"{self.sources[key]}: {RELEASE_PREFIX}{key} has no matching lora_A tensor (incomplete checkpoint?)")
            target = ".".join(parts[:at] + parts[at + 2 :]) if len(parts) > at + 2 else ".".join(parts[:at] + parts[at + 1 :])
            if target not in self.base:
                raise InputError(f"{self.sources[key]}: LoRA {RELEASE_PREFIX}{key} targets {target}, which the checkpoint lacks")
            pairs[target] = (up, self.lora[down_key])
        return pairs


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # any parse failure of an untrusted shard means an unreadable file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable PyTorch weights file ({reason[:160]}); re-download it") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise InputError(f"{path}: expected a dict of named tensors (a release .bin shard)")
    return data


def read_release_checkpoint(folder: str | Path, reporter: Reporter | None = None) -> ReleaseCheckpoint:
    """Read ``model_config.json`` and every ``*.bin`` shard (sorted by name; later files win) of a release folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (pass the PoseGen checkpoint folder, e.g. 720p-81f-base)")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise InputError(f"{config_path}: missing (a PoseGen checkpoint folder has {CONFIG_NAME} beside its .bin shards)")
    try:
        raw_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(raw_config, dict):
        raise InputError(f"{config_path}: expected a JSON object")
    config = release_config_to_diffusers(raw_config, config_path)
    shards = sorted(p for p in folder.iterdir() if p.name.endswith(".bin") and p.is_file())
    if not shards:
        raise InputError(f"{folder}: no .bin shards found (is this a PoseGen checkpoint folder?)")
    base: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    sources: dict[str, Path] = {}
    for shard in shards:
        if reporter is not None:
            reporter.info(f"reading {shard.name}")
        for name, tensor in _load_shard(shard).items():
            if not name.startswith(RELEASE_PREFIX):
                raise InputError(f"{shard}: tensor {name!r} lacks the {RELEASE_PREFIX!r} prefix (not a PoseGen DiT shard)")
            key = name[len(RELEASE_PREFIX) :]
            if "lora" in key:
                lora[key] = tensor
            else:
                key = key.replace(".base_layer", "")
                base[key] = tensor
            sources[key] = shard
    if not base:
        raise InputError(f"{folder}: the shards hold only LoRA tensors; a PoseGen folder carries the full DiT")
    clip_norm = base.get("img_emb.proj.0.weight")
    if clip_norm is not None:
        # The release hard-codes CLIP's 1280; reading it from the weights also serves tiny test checkpoints.
        config["image_dim"] = int(clip_norm.shape[0])
    return ReleaseCheckpoint(folder, config, base, lora, sources)


def lora_delta(up: torch.Tensor, down: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1.0·(B·A) in ``dtype`` on CPU, shaped like the target weight (1×1 conv LoRA is squeezed first)."""
    up, down = up.to(device="cpu", dtype=dtype), down.to(device="cpu", dtype=dtype)
    if up.ndim != down.ndim or up.ndim < 2 or any(s != 1 for s in (*up.shape[2:], *down.shape[2:])):
        raise ValueError(f"unsupported LoRA shapes {tuple(up.shape)} and {tuple(down.shape)}")
    return (1.0 * torch.mm(up.flatten(1), down.flatten(1))).reshape(like.shape)


def merged_release_state_dict(ckpt: ReleaseCheckpoint) -> dict[str, torch.Tensor]:
    """W + 1.0·(B·A) for every LoRA pair, as the release's ``merge_lora_weights`` computes it (release names)."""
    merged = dict(ckpt.base)
    dtype = ckpt.merge_dtype
    for target, (up, down) in ckpt.lora_pairs().items():
        try:
            merged[target] = merged[target] + lora_delta(up, down, merged[target], dtype)
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"{ckpt.sources[target]}: cannot merge the LoRA of {target}: {exc}") from exc
    return merged


def to_diffusers_names(sd: dict[str, torch.Tensor], ckpt: ReleaseCheckpoint) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in sd.items():
        new = release_key_to_diffusers(key)
        if new is None:
            raise InputError(f"{ckpt.sources[key]}: unexpected tensor {RELEASE_PREFIX}{key} (not part of the PoseGen DiT)")
        out[new] = tensor
    return out


def _check_keys(model_keys: set[str], sd: dict[str, torch.Tensor], ckpt: ReleaseCheckpoint) -> None:
    missing = sorted(model_keys - set(sd))
    unexpected = sorted(set(sd) - model_keys)
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
        if unexpected:
            detail.append(f"unexpected {', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''}")
        raise InputError(f"{ckpt.folder}: weights do not match {CONFIG_NAME} ({'; '.join(detail)}); check use_hand/use_hand_proj")


def build_model(config: dict[str, Any], sd: dict[str, torch.Tensor], ckpt: ReleaseCheckpoint, dtype: torch.dtype, copy: bool = False):
    """A ``PoseGenTransformer3DModel`` holding ``sd`` cast to ``dtype``, built without a throwaway random init.

    Without ``copy`` the parameters may share storage with ``sd`` where no cast is needed.
    """
    from accelerate import init_empty_weights

    from posegen_cli.models.transformer import PoseGenTransformer3DModel

    with init_empty_weights():
        model = PoseGenTransformer3DModel(**config)
    expected = dict(model.state_dict())
    _check_keys(set(expected), sd, ckpt)
    for key, tensor in sd.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise InputError(
                f"{ckpt.sources.get(key, ckpt.folder)}: {key} has shape {tuple(tensor.shape)}, config needs {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(dtype, copy=copy) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def load_release_model(folder: str | Path, dtype: torch.dtype = torch.bfloat16, reporter: Reporter | None = None):
    """The merged model of a release folder, in memory (what ``convert_checkpoint`` writes)."""
    ckpt = read_release_checkpoint(folder, reporter)
    sd = to_diffusers_names(merged_release_state_dict(ckpt), ckpt)
    return build_model(ckpt.config, sd, ckpt, dtype)


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    reporter: Reporter | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "5GB",
) -> Path:
    """Write ``src`` (release layout) as a diffusers folder at ``dst``: sharded safetensors + ``config.json``.

    LoRA is merged exactly as the release does before the cast to ``dtype`` (bf16, the release's runtime
    dtype), so ``PoseGenTransformer3DModel.from_pretrained(dst)`` reproduces the release's weights bit for bit.
    Raises InputError naming the file for anything unreadable or inconsistent; ``dst`` appears only on success.
    """
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise InputError(f"{dst}: the output folder must differ from the release folder")
    model = load_release_model(src, dtype, reporter)
    with atomic_dir(dst) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    if reporter is not None:
        n = sum(p.numel() for p in model.parameters())
        reporter.info(f"wrote {dst} ({n / 1e9:.2f} B parameters, {str(dtype).removeprefix('torch.')})")
    return dst

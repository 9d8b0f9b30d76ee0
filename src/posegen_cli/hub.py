"""Everything posegen downloads, in one table, and how a stage finds it on disk.

Lookup order for a model ``name``: a models folder (``models_dir``, or ``$POSEGEN_MODELS_DIR``) holding ``<dir>/<name>/``
in the repository's own layout, then the Hugging Face cache, then a download (unless offline).
Only the files a stage needs are fetched: never the stock Wan transformer, since each PoseGen
checkpoint folder already holds a complete DiT.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from posegen_cli.errors import InputError, MissingModelError, MissingModelsError, option


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo_id: str
    allow_patterns: tuple[str, ...]
    size_gb: float
    licence: str
    used_by: str
    revision: str = "main"


_WAN = "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"
_SAPIENS_POSE = "noahcao/sapiens-pose-coco"
_POSE_FILES = {
    "0.3b": "sapiens_0.3b_coco_wholebody_best_coco_wholebody_AP_620_torchscript.pt2",
    "0.6b": "sapiens_0.6b_coco_wholebody_best_coco_wholebody_AP_695_torchscript.pt2",
    "1b": "sapiens_1b_coco_wholebody_best_coco_wholebody_AP_727_torchscript.pt2",
    "2b": "sapiens_2b_coco_wholebody_best_coco_wholebody_AP_745_torchscript.pt2",
}
_POSE_GB = {"0.3b": 1.3, "0.6b": 2.7, "1b": 4.7, "2b": 8.7}
_SEG_FILES = {
    "0.6b": ("sapiens_0.6b_goliath_best_goliath_mIoU_7777_epoch_178_torchscript.pt2", 2.69),
    "1b": ("sapiens_1b_goliath_best_goliath_mIoU_7994_epoch_151_torchscript.pt2", 4.72),
}
_NORMAL_FILES = {
    "0.3b": ("sapiens_0.3b_normal_render_people_epoch_66_torchscript.pt2", 1.36),
    "0.6b": ("sapiens_0.6b_normal_render_people_epoch_200_torchscript.pt2", 2.69),
    "1b": ("sapiens_1b_normal_render_people_epoch_115_torchscript.pt2", 4.72),
    "2b": ("sapiens_2b_normal_render_people_epoch_70_torchscript.pt2", 8.71),
}
_NC = "CC BY-NC 4.0 (non-commercial)"


def _registry() -> dict[str, ModelSpec]:
    specs = [
        ModelSpec(
            "wan-i2v-720p", _WAN,
            ("model_index.json", "vae/*", "text_encoder/*", "tokenizer/*", "image_encoder/*", "image_processor/*"),
            size_gb=24.0, licence="Apache-2.0", used_by="animate: VAE, umT5 text encoder + tokenizer, CLIP image encoder",
        ),
        ModelSpec(
            "posegen", "Jessie459/PoseGen", ("720p-81f-base/*", "720p-81f-cond/*"),
            size_gb=66.0, licence="Apache-2.0", used_by="animate: PoseGen DiT, base and transition checkpoints",
        ),
        ModelSpec(
            "lightx2v-wan21-i2v-distill", "lightx2v/Wan2.1-Distill-Loras", ("wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors",),
            size_gb=0.74, licence="Apache-2.0 (LightX2V)", used_by="animate with the lightx2v distillation (speed turbo): 4-step, guidance-distilled LoRA",
        ),
        ModelSpec(
            "qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct",
            ("config.json", "*.safetensors", "*.json"),  # tokenizer.json serves the fast tokenizer; merges.txt is not needed
            size_gb=16.6, licence="Apache-2.0", used_by="prompt: captions the reference image",
        ),
        ModelSpec(
            "sapiens-detector", "facebook/sapiens-pose-bbox-detector",
            ("rtmdet_m_8xb32-100e_coco-obj365-person-235e8209.pth",),
            size_gb=0.1, licence="Apache-2.0", used_by="extract-pose (sapiens): person boxes",
        ),
    ]
    for size, filename in _POSE_FILES.items():
        specs.append(ModelSpec(
            f"sapiens-pose-{size}", _SAPIENS_POSE,
            (f"sapiens_lite_host/torchscript/pose/checkpoints/sapiens_{size}/{filename}",),
            size_gb=_POSE_GB[size], licence=_NC, used_by="extract-pose (sapiens): 133 COCO-WholeBody keypoints",
        ))
    for size, (filename, gb) in _SEG_FILES.items():
        specs.append(ModelSpec(
            f"sapiens-seg-{size}", f"facebook/sapiens-seg-{size}-torchscript", (filename,),
            size_gb=gb, licence=_NC, used_by="extract-pose (sapiens): body-part segmentation for the hand mask",
        ))
    for size, (filename, gb) in _NORMAL_FILES.items():
        specs.append(ModelSpec(
            f"sapiens-normal-{size}", f"facebook/sapiens-normal-{size}-torchscript", (filename,),
            size_gb=gb, licence=_NC, used_by="extract-pose (sapiens): surface normals for the hand video",
        ))
    return {spec.name: spec for spec in specs}


MODELS: dict[str, ModelSpec] = _registry()

DEFAULT_DOWNLOADS: tuple[str, ...] = (
    "wan-i2v-720p", "posegen", "qwen2.5-vl-7b", "sapiens-detector", "sapiens-pose-2b", "sapiens-seg-1b", "sapiens-normal-2b",
    "lightx2v-wan21-i2v-distill",
)
"""What ``posegen download`` fetches with no names: everything ``animate`` needs (the turbo speed preset included), with the release's Sapiens sizes."""


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise InputError(f"unknown model {name!r} (known: {', '.join(MODELS)})") from None


def models_dir_from_env(models_dir: str | Path | None) -> Path | None:
    value = models_dir if models_dir is not None else os.environ.get("POSEGEN_MODELS_DIR")
    return Path(value) if value else None


def offline() -> bool:
    """Whether the Hub is off limits: huggingface_hub's own reading of ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def _patterns(spec: ModelSpec, parts: tuple[str, ...] | None) -> tuple[str, ...]:
    """The allow patterns a stage needs: all of the model's, or the ``parts`` it names (a subset)."""
    if parts is None:
        return spec.allow_patterns
    unknown = [part for part in parts if part not in spec.allow_patterns]
    if unknown:
        raise ValueError(f"{spec.name} has no part {unknown[0]!r} (its parts: {', '.join(spec.allow_patterns)})")
    return parts


def _complete(root: Path, patterns: tuple[str, ...]) -> bool:
    """Every pattern matches at least one file, so a half-finished download never counts as present."""
    return root.is_dir() and all(any(path.is_file() for path in root.glob(pattern)) for pattern in patterns)


def find_local(name: str, models_dir: str | Path | None = None, *, parts: tuple[str, ...] | None = None) -> Path | None:
    """The folder holding ``name`` (or just its ``parts``) without touching the network, or None."""
    spec = get_spec(name)
    patterns = _patterns(spec, parts)
    root = models_dir_from_env(models_dir)
    if root is not None:
        candidate = root / name
        return candidate if _complete(candidate, patterns) else None
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=list(patterns), local_files_only=True))
    except OSError:  # LocalEntryNotFoundError and friends: not in the cache
        return None
    return path if _complete(path, patterns) else None


def model_path(name: str, models_dir: str | Path | None = None, *, parts: tuple[str, ...] | None = None, download: bool = True) -> Path:
    """The local folder of ``name`` in its repository's layout, downloading (only ``parts``, if given) when needed."""
    spec = get_spec(name)
    local = find_local(name, models_dir, parts=parts)
    if local is not None:
        return local
    root = models_dir_from_env(models_dir)
    if root is not None:
        raise MissingModelError(
            f"model {name} not found in {root / name} (run `posegen download {name} {option('models_dir')} {root}`, or drop {option('models_dir')} to use the Hugging Face cache)"
        )
    if offline():
        raise MissingModelError(
            f"model {name} ({spec.repo_id}) is not downloaded and HF_HUB_OFFLINE is set (unset it and run `posegen download {name}`)"
        )
    if not download:
        raise MissingModelError(f"model {name} ({spec.repo_id}) is not downloaded (run `posegen download {name}`)")
    return fetch(spec, parts=parts)


def fetch(spec: ModelSpec, *, parts: tuple[str, ...] | None = None, local_dir: Path | None = None) -> Path:
    """Download ``spec``'s files (or its ``parts``) with huggingface_hub's progress bars.

    Into the Hugging Face cache, or with ``local_dir`` into that folder in the repository's layout (what
    ``find_local`` looks for under a models folder).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # the CLI silences library bars for loading, not for downloads
    patterns = _patterns(spec, parts)
    target = {} if local_dir is None else {"local_dir": local_dir}
    try:
        return Path(snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=list(patterns), **target))
    except Exception as exc:  # noqa: BLE001 - network, auth, gating and disk errors all end as one clear line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MissingModelError(
            f"cannot download {spec.name} ({spec.repo_id}): {reason} (check the network, accept the licence on the Hub if gated, and run `posegen download {spec.name}` again)"
        ) from None


def download(name: str, models_dir: str | Path | None = None) -> Path:
    """Fetch whatever of ``name`` is missing (a finished model costs one metadata call).

    Into the Hugging Face cache, or into ``<models_dir>/<name>/`` when a models folder is given, where every
    stage then finds it.
    """
    spec = get_spec(name)
    if offline():
        raise MissingModelError(f"cannot download {name} ({spec.repo_id}): HF_HUB_OFFLINE is set (unset it and run `posegen download {name}`)")
    root = models_dir_from_env(models_dir)
    return fetch(spec) if root is None else fetch(spec, local_dir=root / name)


Parts = dict[str, tuple[str, ...]]
"""For models a stage needs only part of (the Wan tokenizer): model name to the allow patterns it needs."""


def missing_models(names: list[str], models_dir: str | Path | None = None, parts: Parts | None = None) -> list[str]:
    """The ``names`` (in order, once each) with no complete local copy (of their ``parts``); nothing is downloaded."""
    parts = parts or {}
    return [name for name in dict.fromkeys(names) if find_local(name, models_dir, parts=parts.get(name)) is None]


def require_models(names: list[str], models_dir: str | Path | None = None, parts: Parts | None = None) -> list[str]:
    """The missing ``names`` this run may download itself, or one MissingModelsError listing all of them.

    A models folder is never filled behind the user's back, and nothing is fetched while offline.
    """
    missing = missing_models(names, models_dir, parts)
    root = models_dir_from_env(models_dir)
    if missing and (root is not None or offline()):
        raise MissingModelsError(missing, root, offline())
    return missing

"""The PoseGen DiT on diffusers, its checkpoint conversion, variant switching and background K/V sharing."""

from posegen_cli.models.adapters import PoseGenVariants
from posegen_cli.models.convert import convert_checkpoint, load_release_model, read_release_checkpoint
from posegen_cli.models.kv_cache import KVShareCache, KVShareHook, KVShareView, kv_sharing
from posegen_cli.models.transformer import PoseGenTransformer3DModel, tiny_transformer_config

__all__ = [
    "KVShareCache",
    "KVShareHook",
    "KVShareView",
    "PoseGenTransformer3DModel",
    "PoseGenVariants",
    "convert_checkpoint",
    "kv_sharing",
    "load_release_model",
    "read_release_checkpoint",
    "tiny_transformer_config",
]

"""Tiny random models in the real download layout, so the whole CLI runs offline in seconds.

``make_tiny_models(DIR)`` writes ``DIR/wan-i2v-720p/`` (the Wan-AI/Wan2.1-I2V-14B-720P-Diffusers folders posegen
uses), ``DIR/posegen/`` (Jessie459/PoseGen's ``720p-81f-base`` and ``720p-81f-cond`` checkpoint folders) and
``DIR/lightx2v-wan21-i2v-distill/`` (a random LoRA in the LightX2V distillation file's key layout), so
``posegen animate ... --models-dir DIR --device cpu`` exercises exactly the code paths of a real install.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from posegen_cli.fsutil import atomic_dir
from posegen_cli.models import PoseGenTransformer3DModel, tiny_transformer_config
from posegen_cli.models.convert import diffusers_key_to_release
from posegen_cli.models.distill import LIGHTX2V
from posegen_cli.pipelines.image import CLIP_MEAN, CLIP_STD
from posegen_cli.testing.tokenizer import make_tiny_tokenizer

TEXT_DIM = 32
IMAGE_DIM = 20
SEED = 0

WAN_MODEL_INDEX = {
    "_class_name": "WanImageToVideoPipeline",
    "image_encoder": ["transformers", "CLIPVisionModel"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}
"""The Wan I2V repository's ``model_index.json``; posegen reads the folders directly and never its transformer."""


CLIP_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(CLIP_MEAN),
    "image_processor_type": "CLIPImageProcessor",
    "image_std": list(CLIP_STD),
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 224},
}
"""The repository's ``image_processor/`` config; posegen bypasses it (port.md §4.2) but keeps the layout complete."""


def tiny_text_encoder(vocab_size: int) -> UMT5EncoderModel:
    """umT5 with the real structure (gated-gelu, per-layer relative bias, 32 buckets) at width 32."""
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def tiny_image_encoder() -> CLIPVisionModel:
    """A ViT with the real token grid (224 px, patch 14: 257 tokens) at width 20."""
    config = CLIPVisionConfig(
        hidden_size=IMAGE_DIM,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=IMAGE_DIM,
    )
    return CLIPVisionModel(config).eval()


def tiny_vae() -> AutoencoderKLWan:
    """The Wan 2.1 VAE structure (16 latent channels, 8x spatial, 4x causal temporal compression) at base width 8."""
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()


def write_wan_components(folder: Path) -> None:
    """``model_index.json``, ``tokenizer/``, ``text_encoder/``, ``image_encoder/``, ``image_processor/`` and ``vae/``."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    tiny_text_encoder(len(tokenizer)).save_pretrained(folder / "text_encoder")
    tiny_image_encoder().save_pretrained(folder / "image_encoder")
    (folder / "image_processor").mkdir()
    (folder / "image_processor" / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2) + "\n")
    tiny_vae().save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps(WAN_MODEL_INDEX, indent=2) + "\n")


LORA_RANK = 2
LORA_TARGETS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)
"""DiffSynth's default LoRA targets (q, k, v, o, ffn.0, ffn.2), as the PoseGen checkpoints carry them."""
VARIANT_FOLDERS = {"720p-81f-base": {"shift_ref_pos": False, "seed": 1}, "720p-81f-cond": {"shift_ref_pos": True, "seed": 2}}
OWN_TENSORS = ("patch_embedding.", "ref_patch_embedding.", "hand_patch_embedding.")
"""Fully trained per checkpoint; everything else is the shared Wan base."""


def release_config(config: dict) -> dict:
    """``model_config.json`` fields (the only ones the release's loader accepts) for a tiny diffusers config."""
    return {
        "dim": config["num_attention_heads"] * config["attention_head_dim"],
        "in_dim": config["in_channels"],
        "ffn_dim": config["ffn_dim"],
        "out_dim": config["out_channels"],
        "text_dim": config["text_dim"],
        "freq_dim": config["freq_dim"],
        "eps": config["eps"],
        "patch_size": list(config["patch_size"]),
        "num_heads": config["num_attention_heads"],
        "num_layers": config["num_layers"],
        "has_image_input": True,
        "has_image_pos_emb": False,
        "shift_ref_pos": config["shift_ref_pos"],
        "use_hand": config["use_hand"],
        "use_hand_proj": config["use_hand_proj"],
    }


def _random_like(shape: torch.Size, generator: torch.Generator, std: float) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std


def release_state_dict(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``pipe.dit.*`` tensors of one checkpoint: peft ``base_layer`` + LoRA names on the targets, own patch embeddings."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, value in base.items():
        name = diffusers_key_to_release(key)
        if name is None:
            raise ValueError(f"{key} has no release name")
        if key.startswith(OWN_TENSORS):
            value = _random_like(value.shape, g, 0.3)
        module, _, param = name.rpartition(".")
        lora = module.split(".", 2)[-1] in LORA_TARGETS and module.startswith("blocks.")
        if not lora:
            out[f"pipe.dit.{name}"] = value.clone()
            continue
        out[f"pipe.dit.{module}.base_layer.{param}"] = value.clone()
        if param == "weight":
            out[f"pipe.dit.{module}.lora_A.default.weight"] = _random_like((LORA_RANK, value.shape[1]), g, 0.3)
            out[f"pipe.dit.{module}.lora_B.default.weight"] = _random_like((value.shape[0], LORA_RANK), g, 0.1)
    return out


def write_posegen_checkpoints(folder: Path) -> None:
    """The two release checkpoint folders: ``model_config.json`` plus two ``.bin`` shards each, one shared base."""
    config = tiny_transformer_config(text_dim=TEXT_DIM, image_dim=IMAGE_DIM, use_hand_proj=False)
    model = PoseGenTransformer3DModel(**config)
    g = torch.Generator().manual_seed(SEED)
    base = {k: _random_like(v.shape, g, 0.3) for k, v in model.state_dict().items()}
    for name, variant in VARIANT_FOLDERS.items():
        target = folder / name
        target.mkdir(parents=True)
        sd = release_state_dict(base, variant["seed"])
        keys = list(sd)
        half = len(keys) // 2
        for index, part in enumerate((keys[:half], keys[half:])):
            torch.save({k: sd[k] for k in part}, target / f"pytorch_model-{index + 1:05d}-of-00002.bin")
        fields = release_config({**config, "shift_ref_pos": variant["shift_ref_pos"]})
        (target / "model_config.json").write_text(json.dumps(fields, indent=2) + "\n")


LIGHTX2V_BLOCK_MODULES = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
    "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2",
)  # fmt: skip
"""Per-block modules (Wan original names) a LightX2V Wan2.1 I2V LoRA file carries pairs for."""
LIGHTX2V_WITH_ALPHA = ("self_attn.q", "ffn.2")
LIGHTX2V_WITH_BIAS = ("self_attn.o", "cross_attn.k_img", "ffn.0")


def lightx2v_lora(weights: dict[str, torch.Tensor], num_layers: int, seed: int, rank: int = 3) -> dict[str, torch.Tensor]:
    """A random LoRA in LightX2V's layout for a model with release-named ``weights`` (only shapes are read).

    ``diffusion_model.`` + Wan names; ``lora_down``/``lora_up`` pairs on every block module, ``time_projection.1`` and
    ``head.head``; an ``alpha`` on some (scale alpha / rank), ``diff_b`` bias deltas on others, and the zero
    ``norm3.diff`` entries the real file carries.
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    modules = [f"blocks.{i}.{m}" for i in range(num_layers) for m in LIGHTX2V_BLOCK_MODULES] + ["time_projection.1", "head.head"]
    for module in modules:
        rows, cols = weights[f"{module}.weight"].shape
        out[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(rank, cols, generator=g) * 0.2
        out[f"diffusion_model.{module}.lora_up.weight"] = torch.randn(rows, rank, generator=g) * 0.2
        if module.endswith(LIGHTX2V_WITH_ALPHA):
            out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(2 * rank))
        if module.endswith(LIGHTX2V_WITH_BIAS):
            out[f"diffusion_model.{module}.diff_b"] = torch.randn(rows, generator=g) * 0.1
    for i in range(num_layers):
        out[f"diffusion_model.blocks.{i}.norm3.diff"] = torch.zeros_like(weights[f"blocks.{i}.norm3.weight"])
    return out


def write_distill_lora(folder: Path) -> None:
    """``lightx2v/Wan2.1-Distill-Loras``' file name holding a random LightX2V-layout LoRA for the tiny DiT."""
    from safetensors.torch import save_file

    config = tiny_transformer_config(text_dim=TEXT_DIM, image_dim=IMAGE_DIM, use_hand_proj=False)
    model = PoseGenTransformer3DModel(**config)
    weights = {diffusers_key_to_release(k): v for k, v in model.state_dict().items()}
    save_file(lightx2v_lora(weights, config["num_layers"], SEED + 3), folder / LIGHTX2V.weight_name)


def make_tiny_models(directory: str | Path) -> Path:
    """Write a complete random model set under ``directory`` (replacing an earlier one) and return it.

    Weights are drawn from a fixed seed, so two calls write the same models; the global RNG is left untouched.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        with atomic_dir(root / "wan-i2v-720p") as wan:
            write_wan_components(wan)
        with atomic_dir(root / "posegen") as posegen:
            write_posegen_checkpoints(posegen)
        with atomic_dir(root / LIGHTX2V.model) as distill:
            write_distill_lora(distill)
    return root

"""CLIP image features of the reference, preprocessed the release's way (port.md §4.2).

diffusers' ``CLIPImageProcessor`` resizes the short side and center-crops, cutting the head and feet off a portrait; the
release instead squashes the whole 9:16 frame to 224x224 (bicubic, no antialias) in the model dtype. The processor is
therefore bypassed and these steps are done with torch. The tower's attention computes q, k and v with one fused
GEMM, as the release's ``to_qkv`` does, instead of transformers' three.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPAttention

from posegen_cli.pipelines.offload import onload

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ReleaseCLIPAttention(CLIPAttention):
    """CLIP self-attention with one fused q/k/v GEMM, as the release's ``to_qkv`` computes it.

    transformers splits the weight into three projections; on the GPU three GEMMs of a third of the width
    may be given kernels with another reduction order than the release's single one.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: object):  # type: ignore[override]
        if attention_mask is not None:
            raise ValueError("the release's image tower attends without a mask")
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        b, s, _ = hidden_states.shape
        q, k, v = (t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2) for t in F.linear(hidden_states, weight, bias).chunk(3, -1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
        return self.out_proj(out), None


def use_release_attention(model: CLIPVisionModel) -> CLIPVisionModel:
    """Put a :class:`ReleaseCLIPAttention` in place of each attention module, holding the same projection layers.

    The new modules are built on the meta device and given the loaded ``q/k/v/out_proj`` layers, so no weight is
    copied or re-initialised; they are installed with ``nn.Module.set_submodule``.
    """
    for name, module in list(model.named_modules()):
        if type(module) is CLIPAttention:
            with torch.device("meta"):
                fused = ReleaseCLIPAttention(module.config)
            fused.q_proj, fused.k_proj, fused.v_proj, fused.out_proj = module.q_proj, module.k_proj, module.v_proj, module.out_proj
            model.set_submodule(name, fused)
    return model


def load_image_encoder(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> CLIPVisionModel:
    """The ViT-H/14 image tower of the Wan I2V repository (``image_encoder/``), with the release's fused q/k/v."""
    model = CLIPVisionModel.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    return use_release_attention(model).to(device).eval()


def clip_pixels(image: torch.Tensor, size: int) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1] -> normalised [1, 3, size, size], every op in the input's dtype as in the release."""
    x = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_clip(image_encoder: CLIPVisionModel, image: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer tokens [1, 257, hidden] (no post-norm) of a [1, 3, H, W] image in [-1, 1]."""
    device = onload(image_encoder)
    pixels = clip_pixels(image.to(device), image_encoder.config.image_size).to(image_encoder.dtype)
    out = image_encoder(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[-2]

"""Wan VAE encode/decode with the release's spatial tiler and latent normalisation (port.md §4.3).

diffusers' ``enable_tiling`` is a different algorithm (256-px tiles, linear ``blend_v``/``blend_h``, then crop) and its
``_decode`` clamps every tile, so it cannot reproduce the release. This module tiles on top of the per-tile encoder and
decoder instead: every tile covers all frames, tiles overlap by ``size - stride`` and are blended with linear ramps,
accumulated in the tensor dtype on the CPU, divided by the summed weights and (decode only) clamped once at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm
from torch import nn

from posegen_cli.pipelines.offload import onload

ENCODE_TILE = (30, 52)
"""Tile size (height, width) in latent units, as the release passes it; x8 in pixels for encoding."""
ENCODE_STRIDE = (15, 26)
SPATIAL = 8
TEMPORAL = 4
LATENT_CHANNELS = 16


class ReleaseRMSNorm(WanRMS_norm):
    """``WanRMS_norm`` normalising in the input dtype, as the original VAE does.

    diffusers upcasts bf16 to float32 for ``F.normalize``; the release does not, and the two differ in the last bit.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1 if self.channel_first else -1) * self.scale * self.gamma + self.bias


def use_release_norms(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """Put a :class:`ReleaseRMSNorm` in place of each RMS norm of this VAE, holding the same parameters.

    Each is built on the meta device with the norm's own shape settings and given the loaded ``gamma``/``bias``, then
    installed with ``nn.Module.set_submodule``: same parameters, the release's rounding.
    """
    for name, module in list(vae.named_modules()):
        if type(module) is WanRMS_norm:
            gamma = module.gamma
            with torch.device("meta"):
                norm = ReleaseRMSNorm(
                    gamma.shape[0], channel_first=module.channel_first, images=gamma.ndim == 3, bias=isinstance(module.bias, nn.Parameter)
                )
            norm.gamma, norm.bias = gamma, module.bias
            vae.set_submodule(name, norm)
    return vae


def load_vae(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> AutoencoderKLWan:
    """The Wan 2.1 VAE (``vae/`` folder) in ``dtype``, with the release's RMS norm rounding."""
    vae = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype)
    return use_release_norms(vae).to(device).eval()


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Start offsets along one axis; a start is dropped when the previous tile already reaches the end."""
    return [s for s in range(0, length, stride) if not (s - stride >= 0 and s - stride + size >= length)]


def ramp(length: int, ramp_start: bool, ramp_end: bool, border: int) -> torch.Tensor:
    """1-D blend weights: 1, except linear ramps (k+1)/border over ``border`` samples on the requested sides."""
    w = torch.ones(length)
    up = (torch.arange(border) + 1) / border if border > 0 else torch.ones(0)
    if ramp_start and border > 0:
        w[:border] = up
    if ramp_end and border > 0:
        w[-border:] = torch.flip(up, dims=(0,))
    return w


def tile_weight(height: int, width: int, at_edge: tuple[bool, bool, bool, bool], border: tuple[int, int]) -> torch.Tensor:
    """[height, width] weights of one tile: min of the row and column ramps; sides at the image edge do not ramp."""
    top, bottom, left, right = at_edge
    rows = ramp(height, not top, not bottom, border[0])
    cols = ramp(width, not left, not right, border[1])
    return torch.minimum(rows[:, None].expand(height, width), cols[None, :].expand(height, width))


def plan_tiles(height: int, width: int, size: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Tiles as (top, bottom, left, right) with unclipped ends, rows outer, columns inner."""
    return [
        (h, h + size[0], w, w + size[1]) for h in tile_starts(height, size[0], stride[0]) for w in tile_starts(width, size[1], stride[1])
    ]


def latent_stats(vae: AutoencoderKLWan, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and *inverse* std, each rounded to ``dtype`` separately (the release divides by the rounded inverse)."""
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32)
    shape = (1, -1, 1, 1, 1)
    return mean.to(dtype).view(shape).to(device), inv_std.to(dtype).view(shape).to(device)


@torch.no_grad()
def encode_untiled(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """Normalised latent of a [1, 3, F, H, W] clip in [-1, 1]: the distribution mean, no sampling."""
    x = video.to(device=onload(vae), dtype=vae.dtype)
    mu = vae.encode(x).latent_dist.mean
    mean, inv_std = latent_stats(vae, mu.dtype, mu.device)
    return (mu - mean) * inv_std


@torch.no_grad()
def decode_untiled(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Pixels [1, 3, 4T-3, 8h, 8w] of normalised latents, *not* clamped (the tiler clamps after blending)."""
    z = latents.to(device=onload(vae), dtype=vae.dtype)
    mean, inv_std = latent_stats(vae, z.dtype, z.device)
    x = vae.post_quant_conv(z / inv_std + mean)
    cache: list[torch.Tensor | None] = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    frames = []
    for i in range(x.shape[2]):
        frames.append(vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0))
    return torch.cat(frames, dim=2)


@torch.no_grad()
def encode_video(
    vae: AutoencoderKLWan,
    video: torch.Tensor,
    tile_size: tuple[int, int] = ENCODE_TILE,
    tile_stride: tuple[int, int] = ENCODE_STRIDE,
) -> torch.Tensor:
    """Tiled encode of [1, 3, F, H, W] (F = 4k+1) into normalised latents [1, 16, k+1, H/8, W/8] on the CPU.

    ``tile_size``/``tile_stride`` are in latent units, as in the release's call; the tiles themselves are cut in pixels.
    """
    _, _, frames, height, width = video.shape
    size = (tile_size[0] * SPATIAL, tile_size[1] * SPATIAL)
    stride = (tile_stride[0] * SPATIAL, tile_stride[1] * SPATIAL)
    border = ((size[0] - stride[0]) // SPATIAL, (size[1] - stride[1]) // SPATIAL)
    out_shape = (1, LATENT_CHANNELS, (frames + 3) // TEMPORAL, height // SPATIAL, width // SPATIAL)
    return blend_tiles(video, lambda tile: encode_untiled(vae, tile), out_shape, size, stride, border, 1 / SPATIAL)


@torch.no_grad()
def decode_latents(
    vae: AutoencoderKLWan,
    latents: torch.Tensor,
    tile_size: tuple[int, int] = ENCODE_TILE,
    tile_stride: tuple[int, int] = ENCODE_STRIDE,
) -> torch.Tensor:
    """Tiled decode of normalised latents [1, 16, T, h, w] into pixels [1, 3, 4T-3, 8h, 8w] in [-1, 1] on the CPU."""
    _, _, frames, height, width = latents.shape
    border = ((tile_size[0] - tile_stride[0]) * SPATIAL, (tile_size[1] - tile_stride[1]) * SPATIAL)
    out_shape = (1, 3, frames * TEMPORAL - 3, height * SPATIAL, width * SPATIAL)
    pixels = blend_tiles(latents, lambda tile: decode_untiled(vae, tile), out_shape, tile_size, tile_stride, border, SPATIAL)
    return pixels.clamp_(-1, 1)


def blend_tiles(
    source: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor],
    out_shape: tuple[int, ...],
    size: tuple[int, int],
    stride: tuple[int, int],
    border: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Run ``run`` on every spatial tile of ``source`` and blend the results into a CPU tensor of ``out_shape``.

    ``scale`` maps source offsets to output offsets (1/8 encoding, 8 decoding); ``border`` is in output units.
    """
    _, _, _, height, width = source.shape
    dtype = source.dtype
    values = torch.zeros(out_shape, dtype=dtype)
    weight = torch.zeros((1, 1, *out_shape[2:]), dtype=dtype)
    for top, bottom, left, right in plan_tiles(height, width, size, stride):
        result = run(source[:, :, :, top:bottom, left:right]).to(device="cpu", dtype=dtype)
        rows, cols = result.shape[3], result.shape[4]
        at_edge = (top == 0, bottom >= height, left == 0, right >= width)
        w = tile_weight(rows, cols, at_edge, border).to(dtype)
        y, x = int(top * scale), int(left * scale)
        values[:, :, :, y : y + rows, x : x + cols] += result * w
        weight[:, :, :, y : y + rows, x : x + cols] += w
    return values / weight


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [1, 3, F, H, W] in [-1, 1], computed as ``x / 255 * 2 - 1`` like the release."""
    x = torch.from_numpy(np.ascontiguousarray(frames))
    return ((x / 255.0) * 2.0 - 1.0).permute(3, 0, 1, 2).unsqueeze(0)


def tensor_to_frames(pixels: torch.Tensor) -> np.ndarray:
    """[1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], *truncating* ``(x + 1) * 127.5`` like the release."""
    x = ((pixels[0].float() + 1) * 127.5).clip(0, 255)
    return x.permute(1, 2, 3, 0).cpu().numpy().astype(np.uint8)

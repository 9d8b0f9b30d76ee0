"""The release's VAE tiler, normalisation and RMS-norm rounding (port.md §4.3), on a tiny random Wan VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

from posegen_cli.pipelines.vae import (
    ReleaseRMSNorm,
    blend_tiles,
    decode_latents,
    decode_untiled,
    encode_untiled,
    encode_video,
    frames_to_tensor,
    plan_tiles,
    tensor_to_frames,
    tile_weight,
    use_release_norms,
)
from posegen_cli.testing import tiny_vae

TILE = (4, 2)
STRIDE = (2, 1)


@pytest.fixture(scope="module")
def vae():
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tiny_vae()
    return use_release_norms(model).to(torch.bfloat16)


def spec_tiles(length: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Starts 0, s, 2s, ... < length, skipping a start when the previous tile already reaches the end."""
    out = []
    h = 0
    while h < length:
        if not (h - stride >= 0 and h - stride + size >= length):
            out.append((h, h + size))
        h += stride
    return out


def spec_weight(rows: int, cols: int, edges: tuple[bool, bool, bool, bool], border: tuple[int, int]) -> np.ndarray:
    """w = min(r_h, r_w); r ramps (k+1)/border from every side that is not at the image border, else 1."""
    top, bottom, left, right = edges

    def r(k: int, n: int, at_start: bool, at_end: bool, b: int) -> float:
        value = 1.0
        if not at_start and k < b:
            value = min(value, (k + 1) / b)
        if not at_end and k >= n - b:
            value = min(value, (n - k) / b)
        return value

    return np.array(
        [[min(r(y, rows, top, bottom, border[0]), r(x, cols, left, right, border[1])) for x in range(cols)] for y in range(rows)],
        dtype=np.float32,
    )


def spec_blend(source, run, out_shape, size, stride, border, scale, dtype):
    """Σ(tile·w) / Σw accumulated in ``dtype`` on the CPU, tiles clipped at the image edge."""
    _, _, _, height, width = source.shape
    values = torch.zeros(out_shape, dtype=dtype)
    weight = torch.zeros((1, 1, *out_shape[2:]), dtype=dtype)
    for top, bottom in spec_tiles(height, size[0], stride[0]):
        for left, right in spec_tiles(width, size[1], stride[1]):
            out = run(source[:, :, :, top:bottom, left:right]).to(dtype)
            rows, cols = out.shape[-2:]
            edges = (top == 0, bottom >= height, left == 0, right >= width)
            w = torch.from_numpy(spec_weight(rows, cols, edges, border)).to(dtype)
            y, x = int(top * scale), int(left * scale)
            values[..., y : y + rows, x : x + cols] += out * w
            weight[..., y : y + rows, x : x + cols] += w
    return values / weight


def test_tile_plan_at_720p_matches_the_release():
    encode = plan_tiles(1280, 720, (240, 416), (120, 208))
    assert len(encode) == 30
    assert sorted({t[0] for t in encode}) == list(range(0, 1081, 120))
    assert sorted({(t[2], min(t[3], 720)) for t in encode}) == [(0, 416), (208, 624), (416, 720)]
    decode = plan_tiles(160, 90, (30, 52), (15, 26))
    assert len(decode) == 30
    assert sorted({t[0] for t in decode}) == list(range(0, 136, 15))
    assert sorted({(t[2], min(t[3], 90)) for t in decode}) == [(0, 52), (26, 78), (52, 90)]
    rows = spec_tiles(1280, 240, 120)
    cols = spec_tiles(720, 416, 208)
    assert encode == [(r[0], r[1], c[0], c[1]) for r in rows for c in cols]


@pytest.mark.parametrize("edges", [(True, False, False, True), (False, False, False, False), (True, True, True, True)])
def test_tile_weights_match_the_spec_ramps(edges):
    got = tile_weight(30, 52, edges, (15, 26)).numpy()
    np.testing.assert_allclose(got, spec_weight(30, 52, edges, (15, 26)), rtol=0, atol=1e-7)


def test_blending_a_pointwise_function_gives_back_the_whole_image():
    source = torch.rand(1, 2, 3, 37, 29, dtype=torch.float64)
    out = blend_tiles(source, lambda t: t * 3.0, source.shape, (10, 12), (6, 5), (4, 7), 1)
    torch.testing.assert_close(out, source * 3.0, rtol=1e-12, atol=1e-12)


def test_release_rms_norm_normalises_in_bf16():
    norm = WanRMS_norm(8, images=False)
    with torch.no_grad():
        norm.gamma.copy_(torch.randn_like(norm.gamma))
    x = torch.randn(2, 8, 3, 5, 5).to(torch.bfloat16)
    norm = norm.to(torch.bfloat16)
    upcast = norm(x)
    norm.__class__ = ReleaseRMSNorm
    ours = norm(x)
    expected = F.normalize(x, dim=1) * (8**0.5) * norm.gamma + 0.0
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, upcast)


def test_use_release_norms_converts_every_norm_and_keeps_weights():
    model = tiny_vae()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_release_norms(model)
    norms = [m for m in model.modules() if isinstance(m, WanRMS_norm)]
    assert norms and all(type(m) is ReleaseRMSNorm for m in norms)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_encode_normalises_the_mean_with_bf16_constants(vae):
    video = (torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(torch.bfloat16)
    mu = vae.encode(video).latent_dist.mean
    mean = torch.tensor(vae.config.latents_mean).to(torch.bfloat16).view(1, 16, 1, 1, 1)
    inv_std = (1.0 / torch.tensor(vae.config.latents_std)).to(torch.bfloat16).view(1, 16, 1, 1, 1)
    latents = encode_untiled(vae, video)
    assert latents.shape == (1, 16, 2, 2, 2) and latents.dtype == torch.bfloat16
    assert torch.equal(latents, (mu - mean) * inv_std)


def test_tiled_encode_matches_the_spec_reference_bitwise(vae):
    video = (torch.rand(1, 3, 9, 48, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(torch.bfloat16)
    got = encode_video(vae, video, TILE, STRIDE)
    size = (TILE[0] * 8, TILE[1] * 8)
    stride = (STRIDE[0] * 8, STRIDE[1] * 8)
    expected = spec_blend(video, lambda t: encode_untiled(vae, t), (1, 16, 3, 6, 4), size, stride, (2, 1), 1 / 8, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (1, 16, 3, 6, 4)
    assert torch.equal(got, expected)
    # One tile covering everything is the untiled encode.
    assert torch.equal(encode_video(vae, video), encode_untiled(vae, video))


def test_untiled_decode_is_diffusers_decode_without_the_clamp(vae):
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16) * 4
    raw = decode_untiled(vae, latents)
    assert raw.shape == (1, 3, 9, 32, 32)
    mean = torch.tensor(vae.config.latents_mean).to(torch.bfloat16).view(1, 16, 1, 1, 1)
    inv_std = (1.0 / torch.tensor(vae.config.latents_std)).to(torch.bfloat16).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        reference = vae.decode(latents / inv_std + mean).sample
    assert torch.equal(raw.clamp(-1, 1), reference)
    assert raw.abs().max() > 1  # the unclamped tiles are what the tiler blends


def test_tiled_decode_matches_the_spec_reference_bitwise(vae):
    latents = torch.randn(1, 16, 3, 6, 4, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16) * 4
    got = decode_latents(vae, latents, TILE, STRIDE)
    expected = spec_blend(latents, lambda t: decode_untiled(vae, t), (1, 3, 9, 48, 32), TILE, STRIDE, (16, 8), 8, torch.bfloat16).clamp(
        -1, 1
    )
    assert got.shape == (1, 3, 9, 48, 32) and got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    assert got.abs().max() <= 1


def test_pixel_conversions_scale_and_truncate():
    frames = np.array([[[[0, 128, 255]]]], dtype=np.uint8)
    tensor = frames_to_tensor(frames)
    assert tensor.shape == (1, 3, 1, 1, 1) and tensor.dtype == torch.float32
    assert tensor.flatten().tolist() == pytest.approx([-1.0, 128 / 255 * 2 - 1, 1.0], abs=1e-7)
    # (x + 1) * 127.5: 0.999 -> 254.87 truncates to 254; -1.5 clips to 0; 0.0 -> 127.5 -> 127.
    pixels = torch.tensor([0.999, -1.5, 0.0]).view(1, 3, 1, 1, 1)
    assert tensor_to_frames(pixels).tolist() == [[[[254, 0, 127]]]]
    assert np.array_equal(tensor_to_frames(frames_to_tensor(frames)), frames)

"""umT5 and CLIP embeddings against references written from the spec (port.md §3.5, §4.1, §4.2), tiny random weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from posegen_cli.pipelines.image import clip_pixels, encode_clip, load_image_encoder
from posegen_cli.pipelines.text import DEFAULT_NEGATIVE, encode_text, load_text_encoder, match_release_dtype
from posegen_cli.prompting.umt5 import TEXT_LEN, load_tokenizer, tokenize
from posegen_cli.testing import tiny_image_encoder, tiny_text_encoder
from posegen_cli.testing.tokenizer import make_tiny_tokenizer

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("text")
    tokenizer = make_tiny_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tiny_text_encoder(len(tokenizer))
        with torch.no_grad():  # spread the tiny weights so bf16 rounding differences would show
            for p in model.parameters():
                p.mul_(4.0)
    model.save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("image")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        tiny_image_encoder().save_pretrained(root / "image_encoder")
    return root


# ---------------------------------------------------------------- umT5 reference (the release's WanTextEncoder)


def t5_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    y = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * y.type_as(weight)


def t5_bucket(rel: torch.Tensor, num_buckets: int, max_dist: int) -> torch.Tensor:
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    large = torch.clamp(large, max=half - 1)
    return buckets + torch.where(rel < exact, rel, large)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def reference_umt5(sd: dict[str, torch.Tensor], cfg, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wan's T5 encoder in bf16: per-layer relative bias, no attention scaling, fp32 softmax, gated tanh-GELU."""
    x = F.embedding(ids, sd["shared.weight"])
    n, d, length = cfg.num_heads, cfg.d_kv, ids.shape[1]
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    bucket = t5_bucket(rel, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer."
        h = t5_norm(x, sd[p + "0.layer_norm.weight"], cfg.layer_norm_epsilon)
        q, k, v = (F.linear(h, sd[p + f"0.SelfAttention.{m}.weight"]).view(1, -1, n, d) for m in "qkv")
        bias = x.new_zeros(1, n, length, length) + sd[p + "0.SelfAttention.relative_attention_bias.weight"][bucket].permute(2, 0, 1)[None]
        bias.masked_fill_(mask.view(1, 1, 1, -1) == 0, torch.finfo(x.dtype).min)
        attn = torch.einsum("binc,bjnc->bnij", q, k) + bias
        attn = F.softmax(attn.float(), dim=-1).type_as(attn)
        out = torch.einsum("bnij,bjnc->binc", attn, v).reshape(1, -1, n * d)
        x = x + F.linear(out, sd[p + "0.SelfAttention.o.weight"])
        h = t5_norm(x, sd[p + "1.layer_norm.weight"], cfg.layer_norm_epsilon)
        ff = F.linear(h, sd[p + "1.DenseReluDense.wi_1.weight"]) * gelu_tanh(F.linear(h, sd[p + "1.DenseReluDense.wi_0.weight"]))
        x = x + F.linear(ff, sd[p + "1.DenseReluDense.wo.weight"])
    x = t5_norm(x, sd["encoder.final_layer_norm.weight"], cfg.layer_norm_epsilon)
    x[:, int(mask.sum()) :] = 0
    return x


def test_prompt_is_cleaned_and_padded_to_512(text_dir):
    tokenizer = load_tokenizer(text_dir / "tokenizer")
    ids, mask = tokenize(tokenizer, "  a   woman &amp;amp; a\tman\n")
    clean_ids, _ = tokenize(tokenizer, "a woman & a man")
    assert ids.shape == mask.shape == (1, TEXT_LEN)
    assert torch.equal(ids, clean_ids)
    seq_len = int(mask.sum())
    assert ids[0, seq_len - 1].item() == tokenizer.eos_token_id
    assert (ids[0, seq_len:] == tokenizer.pad_token_id).all() and (mask[0, :seq_len] == 1).all()
    long_ids, long_mask = tokenize(tokenizer, "woman " * 600)
    assert long_ids.shape == (1, TEXT_LEN) and int(long_mask.sum()) == TEXT_LEN


def test_text_encoder_weights_all_load_in_bf16(text_dir):
    model = load_text_encoder(text_dir / "text_encoder", BF16)
    assert {p.dtype for p in model.parameters()} == {BF16}
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("prompt", ["a woman dancing in a red dress, studio background", DEFAULT_NEGATIVE])
def test_umt5_embeddings_match_the_release_bitwise(text_dir, prompt):
    tokenizer = load_tokenizer(text_dir / "tokenizer")
    model = load_text_encoder(text_dir / "text_encoder", BF16)
    got = encode_text(tokenizer, model, prompt)
    ids, mask = tokenize(tokenizer, prompt)
    expected = reference_umt5(model.state_dict(), model.config, ids, mask)
    assert got.shape == (1, TEXT_LEN, 32) and got.dtype == BF16
    assert torch.equal(got, expected)
    seq_len = int(mask.sum())
    assert (got[0, seq_len:] == 0).all() and got[0, :seq_len].abs().sum() > 0


def test_fp32_wo_projections_are_cast_to_the_model_dtype(text_dir):
    """transformers may keep ``wo`` in fp32 (``_keep_in_fp32_modules``), which promotes the residual stream."""
    tokenizer = load_tokenizer(text_dir / "tokenizer")
    model = load_text_encoder(text_dir / "text_encoder", BF16)
    prompt = "a woman dancing in a red dress"
    expected = encode_text(tokenizer, model, prompt)
    for block in model.encoder.block:
        block.layer[1].DenseReluDense.wo.float()
    promoted = encode_text(tokenizer, model, prompt)
    assert not torch.equal(promoted, expected)
    match_release_dtype(model, BF16)
    assert {p.dtype for p in model.parameters()} == {BF16}
    assert torch.equal(encode_text(tokenizer, model, prompt), expected)


# ---------------------------------------------------------------- CLIP reference (the release's WanImageEncoder)


def reference_clip(sd: dict[str, torch.Tensor], cfg, image: torch.Tensor) -> torch.Tensor:
    """Squash to 224 (bicubic, no antialias), to [0, 1], normalise, ViT without its last block, all in bf16."""
    x = F.interpolate(image, size=(224, 224), mode="bicubic", align_corners=False)
    x = x.mul(0.5).add(0.5)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - mean) / std
    p = ""  # transformers 5 names the tower's weights without the on-disk "vision_model." prefix
    x = F.conv2d(x, sd[p + "embeddings.patch_embedding.weight"], stride=cfg.patch_size).flatten(2).transpose(1, 2)
    cls = sd[p + "embeddings.class_embedding"].view(1, 1, -1)
    x = torch.cat([cls, x], dim=1) + sd[p + "embeddings.position_embedding.weight"][None]
    dim, heads = cfg.hidden_size, cfg.num_attention_heads

    def ln(h, name):
        return F.layer_norm(h, (dim,), sd[name + ".weight"], sd[name + ".bias"], cfg.layer_norm_eps)

    def lin(h, name):
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    x = ln(x, p + "pre_layrnorm")
    for i in range(cfg.num_hidden_layers - 1):
        b = p + f"encoder.layers.{i}."
        h = ln(x, b + "layer_norm1")
        # The release's to_qkv: one GEMM over the concatenated q, k, v weights, then split.
        w_qkv = torch.cat([sd[b + f"self_attn.{m}_proj.weight"] for m in "qkv"])
        b_qkv = torch.cat([sd[b + f"self_attn.{m}_proj.bias"] for m in "qkv"])
        q, k, v = (t.reshape(1, -1, heads, dim // heads).transpose(1, 2) for t in F.linear(h, w_qkv, b_qkv).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, -1, dim)
        x = x + lin(a, b + "self_attn.out_proj")
        h = ln(x, b + "layer_norm2")
        x = x + lin(F.gelu(lin(h, b + "mlp.fc1")), b + "mlp.fc2")
    return x


def test_clip_preprocessing_squashes_the_whole_portrait():
    image = torch.linspace(-1, 1, 64).view(1, 1, 64, 1).expand(1, 3, 64, 36).to(BF16)
    pixels = clip_pixels(image, 224)
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == BF16
    # No centre crop: the top row stays the image's top (value -1 -> 0 after scaling), the bottom its bottom.
    top = (0.0 - 0.48145466) / 0.26862954
    bottom = (1.0 - 0.48145466) / 0.26862954
    assert pixels[0, 0, 0, 0].item() == pytest.approx(top, abs=0.05)
    assert pixels[0, 0, -1, 0].item() == pytest.approx(bottom, abs=0.05)


def test_clip_features_match_the_release(image_dir):
    model = load_image_encoder(image_dir / "image_encoder", BF16)
    image = (torch.rand(1, 3, 64, 36, generator=torch.Generator().manual_seed(5)) * 2 - 1).to(BF16)
    got = encode_clip(model, image)
    expected = reference_clip(model.state_dict(), model.config, image)
    assert got.shape == (1, 257, 20) and got.dtype == BF16
    assert torch.equal(got, expected)


def test_clip_attention_runs_one_fused_qkv_gemm_like_the_release(image_dir):
    """The release's ``to_qkv`` is one GEMM; the three split projections must not run on their own."""
    model = load_image_encoder(image_dir / "image_encoder", BF16)
    calls = []
    attention = [m for m in model.modules() if hasattr(m, "q_proj")]
    assert len(attention) == model.config.num_hidden_layers
    hooks = [getattr(a, f"{m}_proj").register_forward_hook(lambda *_: calls.append(1)) for a in attention for m in "qkv"]
    encode_clip(model, torch.zeros(1, 3, 64, 36, dtype=BF16))
    for hook in hooks:
        hook.remove()
    assert calls == []

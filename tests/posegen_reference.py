"""An independent PoseGen DiT forward written from shared/specs/port.md §1-§2, reading release-named weights.

Plain torch, no posegen or diffusers code: the tests compare the diffusers port against this. It also keeps
the release's K/V-sharing data flow (full K/V and cross-attention q/k saved by the anchor, maps recomputed
by the base run), so the port's leaner cache is checked against what the release does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Diffusers name fragment -> release name fragment (spec §3.2), applied to every key by the tests.
DIFFUSERS_TO_RELEASE = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    (".attn1.to_out.0.", ".self_attn.o."),
    (".attn2.to_out.0.", ".cross_attn.o."),
    (".attn1.to_", ".self_attn."),
    (".attn2.to_", ".cross_attn."),
    (".attn1.norm_", ".self_attn.norm_"),
    (".attn2.norm_added_k.", ".cross_attn.norm_k_img."),
    (".attn2.norm_", ".cross_attn.norm_"),
    (".attn2.add_k_proj.", ".cross_attn.k_img."),
    (".attn2.add_v_proj.", ".cross_attn.v_img."),
    (".norm2.", ".norm3."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
    (".scale_shift_table", ".modulation"),
    ("proj_out.", "head.head."),
]


def to_release_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        new = key
        if new == "scale_shift_table":
            new = "head.modulation"
        for src, dst in DIFFUSERS_TO_RELEASE:
            new = new.replace(src, dst)
        out[new] = value
    return out


def linear(sd: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def rms(sd: dict[str, Tensor], name: str, x: Tensor, eps: float) -> Tensor:
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * sd[name + ".weight"]


def ln0(x: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def sin_emb(t: Tensor, dim: int) -> Tensor:
    k = torch.arange(dim // 2, dtype=torch.float64)
    omega = 10000.0 ** (-k / (dim // 2))
    arg = t.double()[:, None] * omega[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], 1).to(t.dtype)


def rope_table(head_dim: int, positions: list[Tensor]) -> Tensor:
    """Complex128 factors per token; positions per axis (f, h, w) already broadcast to the token list."""
    a_hw = head_dim // 3
    dims = [head_dim - 2 * a_hw, a_hw, a_hw]
    parts = []
    for a, pos in zip(dims, positions):
        j = torch.arange(a // 2, dtype=torch.float64)
        angle = pos.double()[:, None] * (1.0 / 10000.0 ** (2 * j / a))[None]
        parts.append(torch.polar(torch.ones_like(angle), angle))
    return torch.cat(parts, 1)[:, None, :]


def grid_positions(f: int, h: int, w: int, w_shift: int = 0) -> list[Tensor]:
    ff, hh, ww = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    return [ff.reshape(-1), hh.reshape(-1), ww.reshape(-1) + w_shift]


def rope(x: Tensor, table: Tensor, heads: int) -> Tensor:
    b, s, d = x.shape
    z = torch.view_as_complex(x.double().reshape(b, s, heads, d // heads // 2, 2)) * table
    return torch.view_as_real(z).reshape(b, s, d).to(x.dtype)


def sdpa(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    b = q.shape[0]
    q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, q.shape[2], -1)


def attn_map(q: Tensor, k: Tensor, heads: int, tau: list[int], grid: tuple[int, int, int]) -> Tensor:
    """Norm(Map(q, k)): head-mean of pre-softmax logits at the subject columns, min-max per frame."""
    b = q.shape[0]
    qh = q.reshape(b, q.shape[1], heads, -1).transpose(1, 2)
    kh = k.reshape(b, k.shape[1], heads, -1).transpose(1, 2)
    a = (torch.matmul(qh, kh.transpose(-2, -1)) / math.sqrt(qh.shape[-1])).mean(1)
    a = a[..., tau].sum(-1).reshape(b, *grid)
    lo = a.amin((-2, -1), keepdim=True)
    hi = a.amax((-2, -1), keepdim=True)
    return (a - lo) / (hi - lo + 1e-6)


def otsu(maps: Tensor) -> Tensor:
    """Per-image Otsu binarisation (spec §2.2) of [N, h, w] maps; returns uint8 of the same shape."""
    out = []
    for img in maps.float():
        hist = torch.histc(img.reshape(-1), bins=256, min=0.0, max=1.0)
        p = hist / img.numel()
        edges = torch.linspace(0, 1, 257)
        centers = (edges[:-1] + edges[1:]) / 2
        omega = torch.cumsum(p, 0)
        mu = torch.cumsum(p * centers, 0)
        mu_t = mu[-1]
        omega1 = 1.0 - omega
        mu0 = torch.where(omega > 1e-8, mu / (omega + 1e-8), torch.zeros_like(omega))
        mu1 = torch.where(omega1 > 1e-8, (mu_t - mu) / (omega1 + 1e-8), torch.zeros_like(omega1))
        var = omega * omega1 * (mu0 - mu1) ** 2
        out.append((img > centers[torch.argmax(var)]).to(torch.uint8))
    return torch.stack(out)


@dataclass
class ReleaseShare:
    """The release's K/V-sharing state: ``saved`` is what the anchor run writes to disk."""

    steps: set[int]
    blocks: set[int]
    tau: list[int]
    max_block: int = 10
    use_mask: bool = True
    saved: dict[tuple, Tensor] = field(default_factory=dict)
    curr_maps: dict[tuple[int, int], Tensor] = field(default_factory=dict)


def reference_forward(
    sd: dict[str, Tensor],
    cfg: dict,
    x: Tensor,
    t: Tensor,
    context: Tensor,
    clip: Tensor,
    cond: Tensor,
    ref: Tensor,
    hand: Tensor | None,
    *,
    share: ReleaseShare | None = None,
    mode: str = "",
    step: int = 0,
    branch: str = "positive",
) -> Tensor:
    """PoseGen DiT (spec §1) in the dtype of ``sd``; ``mode`` is "" | "anch" | "base" for K/V sharing."""
    dt = sd["patch_embedding.weight"].dtype
    heads, eps, pt = cfg["num_heads"], cfg["eps"], cfg["patch_size"]
    x, t, context, clip, cond, ref = (v.to(dt) for v in (x, t, context, clip, cond, ref))

    v = F.conv3d(torch.cat([x, cond], 1), sd["patch_embedding.weight"], sd["patch_embedding.bias"], stride=pt)
    if hand is not None:
        hand = hand.to(dt)
        if cfg["use_hand_proj"]:
            e = F.conv3d(hand, sd["hand_patch_embedding.0.weight"], sd["hand_patch_embedding.0.bias"], stride=pt)
            e = F.conv3d(e, sd["hand_patch_embedding.1.weight"], sd["hand_patch_embedding.1.bias"])
        else:
            e = F.conv3d(hand, sd["hand_patch_embedding.weight"], sd["hand_patch_embedding.bias"], stride=pt)
        v = v + e
    f, h, w = v.shape[2:]
    v = v.flatten(2).transpose(1, 2)
    r = F.conv3d(ref, sd["ref_patch_embedding.weight"], sd["ref_patch_embedding.bias"], stride=pt)
    rf, rh, rw = r.shape[2:]
    r = r.flatten(2).transpose(1, 2)
    nv = v.shape[1]

    def time(tt: Tensor) -> tuple[Tensor, Tensor]:
        e = linear(sd, "time_embedding.0", sin_emb(tt, cfg["freq_dim"]))
        e = linear(sd, "time_embedding.2", F.silu(e))
        return e, linear(sd, "time_projection.1", F.silu(e)).reshape(e.shape[0], 6, -1)

    temb, tmod = time(t)
    _, rtmod = time(torch.zeros_like(t))
    ctx = linear(sd, "text_embedding.2", F.gelu(linear(sd, "text_embedding.0", context), approximate="tanh"))
    img = F.layer_norm(clip, (clip.shape[-1],), sd["img_emb.proj.0.weight"], sd["img_emb.proj.0.bias"], 1e-5)
    img = linear(sd, "img_emb.proj.3", F.gelu(linear(sd, "img_emb.proj.1", img)))
    img = F.layer_norm(img, (img.shape[-1],), sd["img_emb.proj.4.weight"], sd["img_emb.proj.4.bias"], 1e-5)

    head_dim = v.shape[-1] // heads
    table_v = rope_table(head_dim, grid_positions(f, h, w))
    table_r = rope_table(head_dim, grid_positions(rf, rh, rw, -rw if cfg["shift_ref_pos"] else 0))

    sharing_step = share is not None and step in share.steps
    prev_sum = curr_sum = None
    prev_cnt = curr_cnt = 0
    for i in range(cfg["num_layers"]):
        p = f"blocks.{i}."
        mod = sd[p + "modulation"]
        m = (mod + tmod).chunk(6, 1)
        rm = (mod + rtmod).chunk(6, 1)
        if sharing_step and mode == "base" and share.use_mask and i <= share.max_block:
            q_a, k_a = share.saved[("ca", step, i)]
            pm = attn_map(q_a, k_a, heads, share.tau, (f, h, w))
            prev_sum = pm if prev_sum is None else prev_sum + pm
            prev_cnt += 1

        a = ln0(v, eps) * (1 + m[1]) + m[0]
        ar = ln0(r, eps) * (1 + rm[1]) + rm[0]
        qkv = []
        for inp, table in ((a, table_v), (ar, table_r)):
            q = rope(rms(sd, p + "self_attn.norm_q", linear(sd, p + "self_attn.q", inp), eps), table, heads)
            k = rope(rms(sd, p + "self_attn.norm_k", linear(sd, p + "self_attn.k", inp), eps), table, heads)
            qkv.append((q, k, linear(sd, p + "self_attn.v", inp)))
        q_all = torch.cat([qkv[0][0], qkv[1][0]], 1)
        k_all = torch.cat([qkv[0][1], qkv[1][1]], 1)
        v_all = torch.cat([qkv[0][2], qkv[1][2]], 1)
        sharing_block = sharing_step and i in share.blocks
        if sharing_block and mode == "anch":
            share.saved[("sa", branch, step, i)] = (k_all.clone(), v_all.clone())
        # The release projects the video and the reference rows with two separate GEMMs.
        o = sdpa(q_all, k_all, v_all, heads)
        v_new = v + m[2] * linear(sd, p + "self_attn.o", o[:, :nv])
        r_new = r + rm[2] * linear(sd, p + "self_attn.o", o[:, nv:])
        if sharing_block and mode == "base":
            k_s, v_s = share.saved[("sa", branch, step, i)]
            o2 = sdpa(q_all, k_s, v_s, heads)
            v2 = v + m[2] * linear(sd, p + "self_attn.o", o2[:, :nv])
            r_new = r + rm[2] * linear(sd, p + "self_attn.o", o2[:, nv:])
            if share.use_mask:
                prev = otsu((prev_sum / prev_cnt).reshape(-1, h, w)).reshape(v.shape[0], -1)
                curr = otsu((curr_sum / curr_cnt).reshape(-1, h, w)).reshape(v.shape[0], -1)
                keep_fg = torch.bitwise_or(curr, prev)
                v_new = v_new.clone()
                v_new[keep_fg == 0] = v2[keep_fg == 0]
            else:
                v_new = v2
        v, r = v_new, r_new

        c = F.layer_norm(v, (v.shape[-1],), sd[p + "norm3.weight"], sd[p + "norm3.bias"], eps)
        q = rms(sd, p + "cross_attn.norm_q", linear(sd, p + "cross_attn.q", c), eps)
        k = rms(sd, p + "cross_attn.norm_k", linear(sd, p + "cross_attn.k", ctx), eps)
        if sharing_step and mode == "anch" and branch == "positive":
            share.saved[("ca", step, i)] = (q.clone(), k.clone())
        if sharing_step and mode == "base" and share.use_mask and i <= share.max_block:
            if branch == "positive":
                share.curr_maps[(step, i)] = attn_map(q, k, heads, share.tau, (f, h, w))
            cm = share.curr_maps[(step, i)]
            curr_sum = cm if curr_sum is None else curr_sum + cm
            curr_cnt += 1
        y = sdpa(q, k, linear(sd, p + "cross_attn.v", ctx), heads)
        k_img = rms(sd, p + "cross_attn.norm_k_img", linear(sd, p + "cross_attn.k_img", img), eps)
        y = y + sdpa(q, k_img, linear(sd, p + "cross_attn.v_img", img), heads)
        v = v + linear(sd, p + "cross_attn.o", y)

        def ffn(z: Tensor, p: str = p) -> Tensor:
            return linear(sd, p + "ffn.2", F.gelu(linear(sd, p + "ffn.0", z), approximate="tanh"))

        v = v + m[5] * ffn(ln0(v, eps) * (1 + m[4]) + m[3])
        r = r + rm[5] * ffn(ln0(r, eps) * (1 + rm[4]) + rm[3])

    shift, scale = (sd["head.modulation"] + temb[:, None]).chunk(2, 1)
    out = linear(sd, "head.head", ln0(v, eps) * (1 + scale) + shift)
    b = out.shape[0]
    out = out.reshape(b, f, h, w, pt[0], pt[1], pt[2], -1)
    return torch.einsum("bfhwxyzc->bcfxhywz", out).reshape(b, -1, f * pt[0], h * pt[1], w * pt[2])


def release_config(model_config: dict) -> dict:
    """The few release-style config fields the reference reads, from a diffusers-style model config."""
    return {
        "num_heads": model_config["num_attention_heads"],
        "eps": model_config["eps"],
        "patch_size": tuple(model_config["patch_size"]),
        "freq_dim": model_config["freq_dim"],
        "num_layers": model_config["num_layers"],
        "shift_ref_pos": model_config["shift_ref_pos"],
        "use_hand_proj": model_config["use_hand_proj"],
    }


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Give every parameter (norm weights and modulation tables included) non-trivial random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def make_inputs(seed: int, cfg: dict, frames: int = 3, height: int = 6, width: int = 8, text_len: int = 7, image_len: int = 5) -> dict:
    """Random model inputs (keyword names of the port) for a tiny config."""
    g = torch.Generator().manual_seed(seed)
    lat = cfg["out_channels"]
    return {
        "hidden_states": torch.randn(1, lat, frames, height, width, generator=g),
        "timestep": torch.tensor([991.7355]),
        "encoder_hidden_states": torch.randn(1, text_len, cfg["text_dim"], generator=g),
        "encoder_hidden_states_image": torch.randn(1, image_len, cfg["image_dim"], generator=g),
        "control_latents": torch.randn(1, cfg["in_channels"] - lat, frames, height, width, generator=g),
        "reference_latents": torch.randn(1, lat, 1, height, width, generator=g),
        "hand_latents": torch.randn(1, lat, frames, height, width, generator=g),
    }


def reference_from_inputs(sd: dict[str, Tensor], rcfg: dict, inputs: dict, **kwargs) -> Tensor:
    return reference_forward(
        sd,
        rcfg,
        inputs["hidden_states"],
        inputs["timestep"],
        inputs["encoder_hidden_states"],
        inputs["encoder_hidden_states_image"],
        inputs["control_latents"],
        inputs["reference_latents"],
        inputs["hand_latents"],
        **kwargs,
    )

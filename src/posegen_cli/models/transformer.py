"""The PoseGen DiT on diffusers: Wan2.1-I2V's parameter tree plus reference, hand and pose inputs.

The forward is written with functional ops that read the module weights because the release runs every
add, modulation and residual as a separate op in the model dtype (bf16), while diffusers' Wan blocks upcast
to fp32; only this order of operations reproduces the release's numbers (see shared/specs/port.md §1.8).
Linear layers are still called as modules so peft adapters and layerwise casting keep working, and all
attention goes through diffusers' attention dispatch so the backends apply.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanAttention, WanTransformer3DModel, WanTransformerBlock
from diffusers.utils import apply_lora_scale
from torch import nn

if TYPE_CHECKING:
    from posegen_cli.models.kv_cache import KVShareView

IMAGE_LN_EPS = 1e-5
"""The release's image-embedding LayerNorms use torch's default eps, unlike the 1e-6 of every block norm."""


def tiny_transformer_config(**overrides: Any) -> dict[str, Any]:
    """A few-kilobyte config with the real model's structure, for tests and ``make-tiny-models``.

    head_dim 12 splits into RoPE axes (4, 4, 4) exactly as 128 splits into (44, 42, 42).
    """
    config: dict[str, Any] = {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 36,
        "out_channels": 16,
        "text_dim": 32,
        "freq_dim": 16,
        "ffn_dim": 48,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": 20,
        "added_kv_proj_dim": 24,
        "rope_max_seq_len": 1024,
        "shift_ref_pos": False,
        "use_hand": True,
        "use_hand_proj": False,
    }
    config.update(overrides)
    if "added_kv_proj_dim" not in overrides:
        config["added_kv_proj_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    return config


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Per-axis (f, h, w) rotary widths; the release uses ``head_dim // 3`` for h and w, the rest for f."""
    hw = head_dim // 3
    f = head_dim - 2 * hw
    if hw % 2 or f % 2:
        raise ValueError(f"attention_head_dim {head_dim} does not split into even RoPE widths (use a multiple of 6)")
    return f, hw, hw


def _axis_angles(dim: int, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    return positions.to(torch.float64)[:, None] * inv_freq[None, :]


def rope_freqs(head_dim: int, grid: tuple[int, int, int], w_offset: int, device: torch.device) -> torch.Tensor:
    """Complex128 rotations [f*h*w, 1, head_dim/2] for tokens at (f, h, w + w_offset), moved to ``device``.

    Computed in float64 on the CPU, where the release precomputes its table: CUDA's float64 pow/sin/cos are
    not correctly rounded, so a table computed on the GPU may differ in the last bit.
    """
    return _cpu_rope_freqs(head_dim, tuple(grid), w_offset).to(device)


@functools.lru_cache(maxsize=4)
def _cpu_rope_freqs(head_dim: int, grid: tuple[int, int, int], w_offset: int) -> torch.Tensor:
    """The CPU table of :func:`rope_freqs`, kept for the next forward (every step uses the same grid); read-only."""
    f, h, w = grid
    df, dh, dw = rope_axis_dims(head_dim)
    af = _axis_angles(df, torch.arange(f))
    ah = _axis_angles(dh, torch.arange(h))
    aw = _axis_angles(dw, torch.arange(w) + w_offset)
    angles = torch.cat(
        [
            af.view(f, 1, 1, -1).expand(f, h, w, -1),
            ah.view(1, h, 1, -1).expand(f, h, w, -1),
            aw.view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor, chunk_tokens: int = 8192) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` [B, S, H, D] in complex128, then round once to x's dtype.

    Token chunks bound the float64 temporaries (3 GiB per 79k-token tensor at 720p); the op is elementwise,
    so chunking changes no bit.
    """
    b, s, h, d = x.shape
    out = torch.empty_like(x)
    for start in range(0, s, chunk_tokens):
        part = x[:, start : start + chunk_tokens]
        rotated = torch.view_as_complex(part.to(torch.float64).reshape(b, part.shape[1], h, d // 2, 2))
        rotated = rotated * freqs[start : start + chunk_tokens]
        out[:, start : start + chunk_tokens] = torch.view_as_real(rotated).flatten(3).to(x.dtype)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, round, then scale in the input dtype: two roundings, like the release."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin] of t·10000^(-k/half) computed in float64 from the (already rounded) timestep."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device) / half)
    angles = torch.outer(timestep.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(timestep.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Any) -> torch.Tensor:
    """Unmasked attention over [B, S, H, D] tensors through diffusers' dispatcher; returns [B, S, H*D]."""
    out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend)
    return out.flatten(2, 3).type_as(q)


class PoseGenTransformerBlock(WanTransformerBlock):
    """A Wan block run the release's way: joint video+reference self-attention, video-only cross-attention."""

    def _modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), eps=self.norm1.eps) * (1 + scale) + shift

    def _self_qkv(self, a: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn: WanAttention = self.attn1
        heads = attn.heads
        q = rms_norm(attn.to_q(a), attn.norm_q.weight, attn.norm_q.eps).unflatten(2, (heads, -1))
        k = rms_norm(attn.to_k(a), attn.norm_k.weight, attn.norm_k.eps).unflatten(2, (heads, -1))
        v = attn.to_v(a).unflatten(2, (heads, -1))
        return apply_rope(q, freqs), apply_rope(k, freqs), v

    def _project_out(self, out: torch.Tensor, n_video: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention output projection of the video rows and the reference rows as two GEMMs.

        The release projects the two streams separately; one GEMM over all rows has another shape, for which
        cuBLAS may pick a kernel with another reduction order.
        """
        proj = self.attn1.to_out[0]
        return proj(out[:, :n_video]), proj(out[:, n_video:])

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_context: torch.Tensor,
        image_context: torch.Tensor,
        tmod: torch.Tensor,
        ref_tmod: torch.Tensor,
        freqs: torch.Tensor,
        ref_freqs: torch.Tensor,
        share: KVShareView | None = None,
        block_index: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden_states`` [B, Nv, C] video tokens, ``encoder_hidden_states`` [B, Nr, C] the reference image's tokens:
        the block's two streams, under the names diffusers' cache hooks read (see ``models/feature_cache.py``)."""
        x, ref = hidden_states, encoder_hidden_states
        table = self.scale_shift_table.to(tmod)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (table + tmod).chunk(6, dim=1)
        r_shift_msa, r_scale_msa, r_gate_msa, r_shift_mlp, r_scale_mlp, r_gate_mlp = (table + ref_tmod).chunk(6, dim=1)

        # 1. Joint self-attention over [video; reference] tokens.
        qv, kv, vv = self._self_qkv(self._modulated(x, shift_msa, scale_msa), freqs)
        qr, kr, vr = self._self_qkv(self._modulated(ref, r_shift_msa, r_scale_msa), ref_freqs)
        q_all = torch.cat([qv, qr], dim=1)
        k_all = torch.cat([kv, kr], dim=1)
        v_all = torch.cat([vv, vr], dim=1)
        del qv, kv, vv, qr, kr, vr
        if share is not None:
            share.record_kv(block_index, k_all, v_all)
        backend = self.attn1.processor._attention_backend
        n_video = x.shape[1]
        out, out_ref = self._project_out(attention(q_all, k_all, v_all, backend), n_video)
        source = share.source_kv(block_index) if share is not None else None
        x_res, ref_res = x, ref
        x = x_res + gate_msa * out
        ref = ref_res + r_gate_msa * out_ref
        if source is not None:
            out_src, out_src_ref = self._project_out(attention(q_all, source[0], source[1], backend), n_video)
            x_src = x_res + gate_msa * out_src
            ref = ref_res + r_gate_msa * out_src_ref
            background = share.background(block_index)
            x = x_src if background is None else torch.where(background[..., None], x_src, x)

        # 2. Cross-attention to image and text, video tokens only.
        attn2: WanAttention = self.attn2
        heads = attn2.heads
        c = F.layer_norm(x, (x.shape[-1],), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        q = rms_norm(attn2.to_q(c), attn2.norm_q.weight, attn2.norm_q.eps).unflatten(2, (heads, -1))
        k_txt = rms_norm(attn2.to_k(text_context), attn2.norm_k.weight, attn2.norm_k.eps).unflatten(2, (heads, -1))
        v_txt = attn2.to_v(text_context).unflatten(2, (heads, -1))
        if share is not None:
            share.add_subject_map(block_index, q, k_txt)
        k_img = attn2.add_k_proj(image_context)
        k_img = rms_norm(k_img, attn2.norm_added_k.weight, attn2.norm_added_k.eps).unflatten(2, (heads, -1))
        v_img = attn2.add_v_proj(image_context).unflatten(2, (heads, -1))
        backend2 = attn2.processor._attention_backend
        cross = attention(q, k_txt, v_txt, backend2) + attention(q, k_img, v_img, backend2)
        x = x + attn2.to_out[0](cross)

        # 3. Feed-forward for both streams.
        x = x + gate_mlp * self.ffn(self._modulated(x, shift_mlp, scale_mlp))
        ref = ref + r_gate_mlp * self.ffn(self._modulated(ref, r_shift_mlp, r_scale_mlp))
        return x, ref


class PoseGenTransformer3DModel(WanTransformer3DModel):
    """PoseGen's DiT: Wan2.1-I2V-14B plus reference tokens, a hand-latent embedding and pose/mask channels.

    Parameter names are diffusers' Wan names plus ``ref_patch_embedding`` and ``hand_patch_embedding``
    (``.0``/``.1`` when ``use_hand_proj``), so diffusers' loaders, peft adapters and attention backends apply.
    Nothing is kept in fp32: the release computes everything in the model dtype.
    """

    _keep_in_fp32_modules = None
    _supports_gradient_checkpointing = False
    """Inference only: the forward never checkpoints, so ``enable_gradient_checkpointing`` is refused, not ignored."""
    _no_split_modules: ClassVar[list[str]] = ["PoseGenTransformerBlock"]
    _repeated_blocks: ClassVar[list[str]] = ["PoseGenTransformerBlock"]
    _cp_plan = None

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 36,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = 1280,
        added_kv_proj_dim: int | None = 5120,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        shift_ref_pos: bool = False,
        use_hand: bool = True,
        use_hand_proj: bool = False,
    ) -> None:
        if pos_embed_seq_len is not None:
            raise ValueError("PoseGen is image-to-video: the first/last-frame image position embedding is not supported")
        if image_dim is None or added_kv_proj_dim is None:
            raise ValueError("PoseGen needs the image branch: set image_dim and added_kv_proj_dim")
        if not cross_attn_norm or qk_norm != "rms_norm_across_heads":
            raise ValueError("PoseGen uses cross_attn_norm=True and qk_norm='rms_norm_across_heads'")
        rope_axis_dims(attention_head_dim)
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
        )
        # Re-class rather than rebuild: same parameters, PoseGen forward, and no second copy of 40 blocks.
        for block in self.blocks:
            block.__class__ = PoseGenTransformerBlock
        inner_dim = num_attention_heads * attention_head_dim
        self.ref_patch_embedding = nn.Conv3d(out_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        if use_hand:
            hand = nn.Conv3d(out_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
            self.hand_patch_embedding = nn.Sequential(hand, nn.Conv3d(inner_dim, inner_dim, 1)) if use_hand_proj else hand

    def _embed_time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.condition_embedder
        temb = emb.time_embedder(timestep_sinusoid(timestep, self.config.freq_dim))
        tmod = emb.time_proj(emb.act_fn(temb)).unflatten(1, (6, -1))
        return temb, tmod

    def _embed_image(self, image: torch.Tensor) -> torch.Tensor:
        emb = self.condition_embedder.image_embedder
        h = F.layer_norm(image, (image.shape[-1],), emb.norm1.weight, emb.norm1.bias, IMAGE_LN_EPS)
        h = emb.ff(h)
        return F.layer_norm(h, (h.shape[-1],), emb.norm2.weight, emb.norm2.bias, IMAGE_LN_EPS)

    def _check_inputs(
        self,
        hidden_states: torch.Tensor,
        control_latents: torch.Tensor,
        reference_latents: torch.Tensor,
        hand_latents: torch.Tensor | None,
    ) -> None:
        b, c, f, h, w = hidden_states.shape
        cfg = self.config
        p_t, p_h, p_w = cfg.patch_size
        if f % p_t or h % p_h or w % p_w:
            raise ValueError(f"latent size {(f, h, w)} is not divisible by patch_size {tuple(cfg.patch_size)}")
        want = cfg.in_channels - c
        if control_latents.shape != (b, want, f, h, w):
            raise ValueError(f"control_latents must be {(b, want, f, h, w)}, got {tuple(control_latents.shape)}")
        if reference_latents.shape[:2] != (b, cfg.out_channels) or reference_latents.shape[2] != 1:
            raise ValueError(f"reference_latents must be [{b}, {cfg.out_channels}, 1, H, W], got {tuple(reference_latents.shape)}")
        if hand_latents is not None:
            if not cfg.use_hand:
                raise ValueError("hand_latents given but this checkpoint has no hand embedding (use_hand=false)")
            if hand_latents.shape != (b, cfg.out_channels, f, h, w):
                raise ValueError(f"hand_latents must be {(b, cfg.out_channels, f, h, w)}, got {tuple(hand_latents.shape)}")

    @apply_lora_scale("attention_kwargs")
    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor,
        control_latents: torch.Tensor,
        reference_latents: torch.Tensor,
        hand_latents: torch.Tensor | None = None,
        kv_share: KVShareView | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """One velocity prediction [B, 16, F, H, W] for one guidance branch.

        ``timestep`` is cast to the model dtype before embedding (bf16 rounds 991.7 to 992, as the release does).
        ``kv_share`` is ``KVShareCache.view(step, branch)`` for background K/V sharing, or None.
        """
        self._check_inputs(hidden_states, control_latents, reference_latents, hand_latents)
        dtype = self.patch_embedding.weight.dtype
        device = self.patch_embedding.weight.device
        b, _, f, h, w = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (f // p_t, h // p_h, w // p_w)
        ref_grid = (reference_latents.shape[2] // p_t, reference_latents.shape[3] // p_h, reference_latents.shape[4] // p_w)

        x = self.patch_embedding(torch.cat([hidden_states, control_latents], dim=1).to(dtype))
        if hand_latents is not None:
            x = x + self.hand_patch_embedding(hand_latents.to(dtype))
        x = x.flatten(2).transpose(1, 2).contiguous()
        ref = self.ref_patch_embedding(reference_latents.to(dtype)).flatten(2).transpose(1, 2).contiguous()

        t = timestep.to(device=device, dtype=dtype).reshape(-1)
        temb, tmod = self._embed_time(t)
        _, ref_tmod = self._embed_time(torch.zeros_like(t))
        text = self.condition_embedder.text_embedder(encoder_hidden_states.to(dtype))
        image = self._embed_image(encoder_hidden_states_image.to(dtype))

        head_dim = self.config.attention_head_dim
        freqs = rope_freqs(head_dim, grid, 0, device)
        ref_freqs = rope_freqs(head_dim, ref_grid, -ref_grid[2] if self.config.shift_ref_pos else 0, device)

        if kv_share is not None:
            kv_share.begin(grid, device)
        for index, block in enumerate(self.blocks):
            x, ref = block(x, ref, text, image, tmod, ref_tmod, freqs, ref_freqs, kv_share, index)
        if kv_share is not None:
            kv_share.end()

        shift, scale = (self.scale_shift_table.to(temb) + temb.unsqueeze(1)).chunk(2, dim=1)
        x = self.proj_out(F.layer_norm(x, (x.shape[-1],), eps=self.norm_out.eps) * (1 + scale) + shift)
        x = x.reshape(b, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

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
    from posegen_cli.models.kv_cache import BlockShare, ForwardShare

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
    """Unmasked attention over [B, S, H, D] tensors through diffusers' dispatcher; returns [B, S, H*D].

    ``backend`` is the processor's ``_attention_backend`` (set by ``set_attention_backend``); None uses the active
    one (``attention_backend(...)`` context manager, or ``DIFFUSERS_ATTN_BACKEND``). No call passes a mask, so every
    kernel applies.
    """
    out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend)
    return out.flatten(2, 3).type_as(q)


def _head_split(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


class PoseGenAttnProcessor:
    """Joint video+reference self-attention of a PoseGen block, the release's way, through diffusers' dispatcher.

    Video and reference tokens are projected, normalised and rotated separately (as the release does) and attend
    to all keys together; the output projection runs on the two row sets as two GEMMs. When a
    :class:`~posegen_cli.models.kv_cache.KVShareHook` hands this processor a ``share`` for the forward, it records
    the K/V (anchor) or also attends to the anchor's K/V and fuses the two results per token (replay).
    Returns the projected (video, reference) outputs, before the gated residual.
    """

    _attention_backend: Any = None
    _parallel_config: Any = None

    def __init__(self) -> None:
        self.share: BlockShare | None = None

    @staticmethod
    def _q(attn: WanAttention, a: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        return apply_rope(_head_split(rms_norm(attn.to_q(a), attn.norm_q.weight, attn.norm_q.eps), attn.heads), freqs)

    @staticmethod
    def _kv(attn: WanAttention, a: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = _head_split(rms_norm(attn.to_k(a), attn.norm_k.weight, attn.norm_k.eps), attn.heads)
        return apply_rope(k, freqs), _head_split(attn.to_v(a), attn.heads)

    @classmethod
    def joint_kv(
        cls, attn: WanAttention, a: torch.Tensor, a_ref: torch.Tensor, freqs: torch.Tensor, ref_freqs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K_all, V_all [B, Nv + Nr, H, D/H] of modulated inputs, video and reference projected apart as the release does.

        The same ops and GEMM shapes as the block's own K/V, so K/V re-projected from a stored anchor input are the
        anchor's K/V bit for bit (the "inputs" storage format of the K/V cache).
        """
        kv, vv = cls._kv(attn, a, freqs)
        kr, vr = cls._kv(attn, a_ref, ref_freqs)
        return torch.cat([kv, kr], dim=1), torch.cat([vv, vr], dim=1)

    @staticmethod
    def _project_out(attn: WanAttention, out: torch.Tensor, n_video: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Output projection of the video rows and the reference rows as two GEMMs.

        The release projects the two streams separately; one GEMM over all rows has another shape, for which
        cuBLAS may pick a kernel with another reduction order.
        """
        proj = attn.to_out[0]
        return proj(out[:, :n_video]), proj(out[:, n_video:])

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: torch.Tensor | None = None,
        *,
        reference_states: torch.Tensor,
        reference_rotary_emb: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None:
            raise ValueError("PoseGen self-attention takes video and reference states with their RoPE tables, and no mask")
        q_all = torch.cat([self._q(attn, hidden_states, rotary_emb), self._q(attn, reference_states, reference_rotary_emb)], dim=1)
        k_all, v_all = self.joint_kv(attn, hidden_states, reference_states, rotary_emb, reference_rotary_emb)
        share = self.share
        if share is not None:
            share.keep((k_all, v_all), (hidden_states, reference_states))
        n_video = hidden_states.shape[1]
        out, out_ref = self._project_out(attn, attention(q_all, k_all, v_all, self._attention_backend), n_video)
        del k_all, v_all
        project = functools.partial(self.joint_kv, attn, freqs=rotary_emb, ref_freqs=reference_rotary_emb)
        source = share.source_kv(project) if share is not None else None
        if source is not None:
            out_src, out_ref = self._project_out(attn, attention(q_all, source[0], source[1], self._attention_backend), n_video)
            out = share.fuse(out, out_src)
        return out, out_ref


class PoseGenCrossAttnProcessor:
    """Cross-attention of the video tokens to the text and the CLIP image tokens, summed, then projected.

    When the K/V-sharing hook hands it the forward's ``share``, the block adds its subject map (the head-mean
    logits of its queries against the subject token's keys) to the running sum.
    """

    _attention_backend: Any = None
    _parallel_config: Any = None

    def __init__(self) -> None:
        self.share: ForwardShare | None = None

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: torch.Tensor | None = None,
        *,
        encoder_hidden_states_image: torch.Tensor,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("PoseGen cross-attention takes the text states and the image states, and no mask")
        heads = attn.heads
        q = _head_split(rms_norm(attn.to_q(hidden_states), attn.norm_q.weight, attn.norm_q.eps), heads)
        k_txt = _head_split(rms_norm(attn.to_k(encoder_hidden_states), attn.norm_k.weight, attn.norm_k.eps), heads)
        v_txt = _head_split(attn.to_v(encoder_hidden_states), heads)
        if self.share is not None:
            self.share.add_map(q, k_txt)
        k_img = rms_norm(attn.add_k_proj(encoder_hidden_states_image), attn.norm_added_k.weight, attn.norm_added_k.eps)
        k_img = _head_split(k_img, heads)
        v_img = _head_split(attn.add_v_proj(encoder_hidden_states_image), heads)
        backend = self._attention_backend
        cross = attention(q, k_txt, v_txt, backend) + attention(q, k_img, v_img, backend)
        return attn.to_out[0](cross)


class PoseGenTransformerBlock(WanTransformerBlock):
    """A Wan block run the release's way: joint video+reference self-attention, video-only cross-attention.

    Attention lives in the blocks' processors (:class:`PoseGenAttnProcessor`, :class:`PoseGenCrossAttnProcessor`);
    the block is pure tensor code, which ``compile_repeated_blocks`` compiles without graph breaks.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """``WanTransformerBlock``'s arguments; the attention modules get PoseGen's processors."""
        super().__init__(*args, **kwargs)
        self.attn1.set_processor(PoseGenAttnProcessor())
        self.attn2.set_processor(PoseGenCrossAttnProcessor())

    def _modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), eps=self.norm1.eps) * (1 + scale) + shift

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden_states`` [B, Nv, C] video tokens, ``encoder_hidden_states`` [B, Nr, C] the reference image's tokens:
        the block's two streams, under the names diffusers' cache hooks read (see ``models/feature_cache.py``)."""
        x, ref = hidden_states, encoder_hidden_states
        table = self.scale_shift_table.to(tmod)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (table + tmod).chunk(6, dim=1)
        r_shift_msa, r_scale_msa, r_gate_msa, r_shift_mlp, r_scale_mlp, r_gate_mlp = (table + ref_tmod).chunk(6, dim=1)

        # 1. Joint self-attention over [video; reference] tokens (K/V sharing happens inside the processor).
        out, out_ref = self.attn1(
            self._modulated(x, shift_msa, scale_msa),
            rotary_emb=freqs,
            reference_states=self._modulated(ref, r_shift_msa, r_scale_msa),
            reference_rotary_emb=ref_freqs,
        )
        x = x + gate_msa * out
        ref = ref + r_gate_msa * out_ref

        # 2. Cross-attention to image and text, video tokens only.
        c = F.layer_norm(x, (x.shape[-1],), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        x = x + self.attn2(c, text_context, encoder_hidden_states_image=image_context)

        # 3. Feed-forward for both streams.
        x = x + gate_mlp * self.ffn(self._modulated(x, shift_mlp, scale_mlp))
        ref = ref + r_gate_mlp * self.ffn(self._modulated(ref, r_shift_mlp, r_scale_mlp))
        return x, ref


class HandProjection(nn.Module):
    """The ``use_hand_proj`` hand embedding: patch convolution ``0``, then the 1x1 projection ``1``.

    The children carry the release's ``nn.Sequential`` names (``hand_patch_embedding.0``/``.1``), but the module is
    deliberately not a Sequential: diffusers' block-level group offloading gives a Sequential child groups of their
    own, chained for prefetch in the order of the first forward, and a variant switch that swaps in the other hand
    embedding would break that chain. A plain module stays in the model's top-level group, onloaded with it.
    """

    def __init__(self, patch: nn.Conv3d, projection: nn.Conv3d) -> None:
        super().__init__()
        self.add_module("0", patch)
        self.add_module("1", projection)

    def forward(self, hand_latents: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] latents -> [B, inner, F/p_t, H/p_h, W/p_w] embeddings."""
        return self.get_submodule("1")(self.get_submodule("0")(hand_latents))


def hand_embedding(in_channels: int, inner_dim: int, patch_size: tuple[int, int, int], use_hand_proj: bool) -> nn.Module:
    """The hand-latent patch embedding: a strided Conv3d, followed by a 1x1 projection when ``use_hand_proj``."""
    patch = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
    return HandProjection(patch, nn.Conv3d(inner_dim, inner_dim, 1)) if use_hand_proj else patch


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
            num_layers=0,  # the blocks are built below, as PoseGen blocks
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
        )
        self.register_to_config(num_layers=num_layers)  # Wan's __init__ registered the 0 it was given
        inner_dim = num_attention_heads * attention_head_dim
        self.blocks = nn.ModuleList(
            PoseGenTransformerBlock(inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
            for _ in range(num_layers)
        )
        self.ref_patch_embedding = nn.Conv3d(out_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        if use_hand:
            self.hand_patch_embedding = hand_embedding(out_channels, inner_dim, tuple(patch_size), use_hand_proj)

    def hold_standby_hand_embedding(self, module: nn.Module) -> None:
        """Register ``module`` (another variant's hand embedding) as ``standby_hand_embedding``, unused by the forward.

        Held as a child from the start, it is covered by whatever is applied to the model afterwards (device moves,
        group offloading's top-level group), so :meth:`swap_hand_embedding` needs no hook to be rebuilt.
        """
        self.standby_hand_embedding = module

    def swap_hand_embedding(self) -> None:
        """Exchange ``hand_patch_embedding`` and ``standby_hand_embedding`` (two attribute assignments, no copy).

        Raises:
            RuntimeError: no standby hand embedding was registered (:meth:`hold_standby_hand_embedding`).
        """
        standby = getattr(self, "standby_hand_embedding", None)
        if standby is None:
            raise RuntimeError("no standby hand embedding to swap in: call hold_standby_hand_embedding first")
        self.hand_patch_embedding, self.standby_hand_embedding = standby, self.hand_patch_embedding

    def token_grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """(f, h, w) token grid of latents [B, C, F, H, W] after the patch embedding."""
        p_t, p_h, p_w = self.config.patch_size
        return latents.shape[2] // p_t, latents.shape[3] // p_h, latents.shape[4] // p_w

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
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """One velocity prediction [B, 16, F, H, W] for one guidance branch.

        ``timestep`` is cast to the model dtype before embedding (bf16 rounds 991.7 to 992, as the release does).
        Background K/V sharing is a hook (``kv_cache.kv_sharing``) that reads ``cache_context(branch, step_index=...)``.
        """
        self._check_inputs(hidden_states, control_latents, reference_latents, hand_latents)
        dtype = self.patch_embedding.weight.dtype
        device = self.patch_embedding.weight.device
        b = hidden_states.shape[0]
        p_t, p_h, p_w = self.config.patch_size
        grid, ref_grid = self.token_grid(hidden_states), self.token_grid(reference_latents)

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

        for block in self.blocks:
            x, ref = block(x, ref, text, image, tmod, ref_tmod, freqs, ref_freqs)

        shift, scale = (self.scale_shift_table.to(temb) + temb.unsqueeze(1)).chunk(2, dim=1)
        x = self.proj_out(F.layer_norm(x, (x.shape[-1],), eps=self.norm_out.eps) * (1 + scale) + shift)
        x = x.reshape(b, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

"""How big a job is and where the anchor's background K/V can live: pure sizing and placement arithmetic.

Everything here is integer arithmetic on the model config and the job's sizes; nothing touches torch or a device,
so the job planner (a dry run) and tests can ask it anything. The figures:

- **K/V per (step, branch, block)**: the release keeps self-attention K and V, each [1, L, inner_dim], with
  L = video tokens + reference tokens (port spec §2.6): ``2 · L · inner · bytes``. At 720x1280x81 in bf16 that is
  2 · 79,200 · 5,120 · 2 = 1.62 GB.
- **The "inputs" format** keeps the block's modulated self-attention input [a; a_r] instead, one [1, L, inner]
  tensor, and recomputes K = RoPE(RMS(W_k·a)) and V = W_v·a with the same weights and GEMM shapes when a base
  segment reads it (port spec §2.6): half the bytes, bit-identical K/V, two extra L x inner x inner GEMMs per use.
- **Recompute** stores nothing between forwards: each base segment re-runs the anchor's forward at every shared
  (step, branch) from the anchor's latents (:class:`posegen_cli.models.kv_cache.AnchorInputs`); one extra forward
  per shared (step, branch), with one forward's worth of K/V inputs alive at a time.

Counts per job: ``steps x branches x blocks`` items; branches is 2 with classifier-free guidance, 1 without.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from posegen_cli.choices import KV_PLACEMENTS
from posegen_cli.errors import option

KVFormat = Literal["kv", "inputs"]

GIB = 1024**3
ACTIVATION_TOKEN_FACTOR = 8
"""Live [L, inner] activations in one block forward: x, ref, Q, K, V (joint), attention out, projected out, residual."""
ACTIVATION_FFN_FACTOR = 2
"""Live [L, ffn_dim] activations in the feed-forward: the projection and its GELU."""
GPU_HEADROOM_BYTES = 2 * GIB
"""Left free on the GPU for the allocator's fragmentation, CUDA context and kernels' workspaces."""
HOST_HEADROOM_BYTES = 8 * GIB
"""Left free in host memory for the process itself, the decoded frames and the page cache of the weights."""
DISK_HEADROOM_BYTES = 2 * GIB
DEFAULT_LOOKAHEAD = 2
"""Items read ahead of use from host or disk (``KVShareCache.lookahead``)."""

TEXT_ENCODER_PARAMS = 5_680_910_336
"""umT5-XXL encoder of Wan2.1 (``text_encoder/``, 24 layers of d_model 4096, d_ff 10240, 256,384-token vocabulary)."""
IMAGE_ENCODER_PARAMS = 632_076_800
"""CLIP ViT-H/14 vision tower of Wan2.1-I2V (``image_encoder/``, 32 layers of 1280)."""
VAE_PARAMS = 126_892_531
"""Wan2.1 VAE (``vae/``, AutoencoderKLWan base_dim 96)."""
VAE_DECODER_WIDTH = 96
"""Channels of the VAE decoder's last, full-resolution stage."""
VAE_TILE = (30, 52)
"""Latent (height, width) of one VAE tile (``pipelines.vae.ENCODE_TILE``, the release's tiling)."""
ROPE_CHUNK_TOKENS = 8192
"""Tokens per complex128 RoPE chunk (``models.transformer.apply_rope``)."""


def format_bytes(n: int) -> str:
    """``n`` bytes in GiB with one decimal, or MiB below 1 GiB (tiny test jobs)."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 1024**2:.1f} MiB"


@dataclass(frozen=True)
class ModelShape:
    """What sizing and the job planner need from a ``PoseGenTransformer3DModel`` config (diffusers names).

    ``text_len``/``image_len``: the text (umT5, 512) and image (CLIP, 257) tokens every forward cross-attends to.
    """

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    ffn_dim: int
    in_channels: int
    out_channels: int
    text_dim: int
    freq_dim: int
    image_dim: int
    added_kv_proj_dim: int
    patch_size: tuple[int, int, int]
    use_hand: bool = True
    use_hand_proj: bool = False
    text_len: int = 512
    image_len: int = 257

    @classmethod
    def from_config(cls, config: Mapping[str, Any], text_len: int = 512, image_len: int = 257) -> ModelShape:
        """From a diffusers config (``transformer.config`` or :func:`release_config_to_diffusers`)."""
        return cls(
            num_layers=int(config["num_layers"]),
            num_attention_heads=int(config["num_attention_heads"]),
            attention_head_dim=int(config["attention_head_dim"]),
            ffn_dim=int(config["ffn_dim"]),
            in_channels=int(config["in_channels"]),
            out_channels=int(config["out_channels"]),
            text_dim=int(config["text_dim"]),
            freq_dim=int(config["freq_dim"]),
            image_dim=int(config["image_dim"]),
            added_kv_proj_dim=int(config["added_kv_proj_dim"]),
            patch_size=tuple(int(p) for p in config["patch_size"]),  # type: ignore[arg-type]
            use_hand=bool(config.get("use_hand", True)),
            use_hand_proj=bool(config.get("use_hand_proj", False)),
            text_len=text_len,
            image_len=image_len,
        )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    def block_linear_params(self) -> tuple[int, int]:
        """(weights, biases) of one block's linear layers: self-attn q,k,v,o; cross q,k,v,o + image k,v; FFN."""
        d, f = self.inner_dim, self.ffn_dim
        weights = 4 * d * d + 4 * d * d + 2 * self.added_kv_proj_dim * d + 2 * d * f
        biases = 8 * d + 2 * d + d + f
        return weights, biases

    def block_params(self) -> int:
        """One block: its linears, q/k norms (4d, + image k norm d), the affine cross-attention LayerNorm (2d), table (6d)."""
        weights, biases = self.block_linear_params()
        return weights + biases + 5 * self.inner_dim + 2 * self.inner_dim + 6 * self.inner_dim

    def num_parameters(self) -> int:
        """Exact parameter count of the diffusers module tree (checked against a built model in the tests)."""
        d, p = self.inner_dim, self.patch_volume
        embed = (self.in_channels * p + 1) * d + (self.out_channels * p + 1) * d  # patch, reference patch
        if self.use_hand:
            embed += (self.out_channels * p + 1) * d + ((d * d + d) if self.use_hand_proj else 0)
        cond = (self.freq_dim * d + d) + (d * d + d) + (d * 6 * d + 6 * d)  # time embedding, time projection
        cond += (self.text_dim * d + d) + (d * d + d)  # text embedding
        cond += 2 * self.image_dim + (self.image_dim * self.image_dim + self.image_dim) + (self.image_dim * d + d) + 2 * d
        head = (d * self.out_channels * p + self.out_channels * p) + 2 * d  # proj_out, output scale/shift table
        return embed + cond + self.num_layers * self.block_params() + head


WAN_I2V_14B = ModelShape(
    num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, in_channels=36, out_channels=16,
    text_dim=4096, freq_dim=256, image_dim=1280, added_kv_proj_dim=5120, patch_size=(1, 2, 2), use_hand=True,
    use_hand_proj=True,
)  # fmt: skip
"""The release's DiT (Wan2.1-I2V-14B-720P + PoseGen inputs; ``use_hand_proj`` as the larger of the two variants)."""


@dataclass(frozen=True)
class JobShape:
    """The token grid of one segment: ``frames`` pixel frames (4k+1) at ``height`` x ``width``."""

    height: int
    width: int
    frames: int = 81
    dtype_bytes: int = 2
    guidance: bool = True

    def tokens(self, model: ModelShape) -> tuple[int, int]:
        """(video tokens, reference tokens): latent grid (1 + (F-1)/4, H/8, W/8) patchified by ``patch_size``."""
        pt, ph, pw = model.patch_size
        latent_frames = (self.frames - 1) // 4 + 1
        per_frame = (self.height // 8 // ph) * (self.width // 8 // pw)
        return (latent_frames // pt) * per_frame, per_frame

    @property
    def branches(self) -> int:
        return 2 if self.guidance else 1


def kv_item_bytes(model: ModelShape, job: JobShape, fmt: KVFormat) -> int:
    """Bytes of one (step, branch, block) entry: K and V [1, L, inner] each, or the one modulated input."""
    n_video, n_ref = job.tokens(model)
    one = (n_video + n_ref) * model.inner_dim * job.dtype_bytes
    return 2 * one if fmt == "kv" else one


def kv_items(job: JobShape, steps: int, blocks: int) -> int:
    """Entries the anchor records: shared steps x guidance branches x sharing blocks."""
    return steps * job.branches * blocks


def subject_mask_bytes(model: ModelShape, job: JobShape, steps: int) -> int:
    """The anchor's uint8 subject mask, one byte per video token per shared step."""
    return job.tokens(model)[0] * steps


def kv_cache_bytes(model: ModelShape, job: JobShape, steps: int, blocks: int, fmt: KVFormat = "kv") -> int:
    """Everything the anchor hands to the base segments when stored: K/V (or inputs) plus the subject masks."""
    return kv_items(job, steps, blocks) * kv_item_bytes(model, job, fmt) + subject_mask_bytes(model, job, steps)


def activation_bytes(model: ModelShape, job: JobShape, *, replay: bool = False) -> int:
    """Largest set of tensors alive at once inside one block's forward (batch 1), phase by phase.

    Always alive: the block's input x and ref and the complex128 RoPE tables (8 bytes per token and head channel).
    RoPE of the video keys: the modulated input, q (done), k, its rotated output and one chunk of float64 input
    plus complex128 product (24 bytes per element). Concatenation of q/k/v: the modulated inputs, the per-stream q/k/v
    and the joint ones (7 tensors of all tokens). Replay: the modulated inputs, joint q/k/v, the anchor's K/V copied in,
    the two attention outputs and a projection. FFN: the modulated input, two [tokens, ffn_dim] tensors (linear
    output, GELU) and the second linear's output. Checked against a measured peak of live tensors in the tests.
    """
    nv, nr = job.tokens(model)
    n, d, b = nv + nr, model.inner_dim, job.dtype_bytes
    base = n * d * b + n * model.attention_head_dim * 8
    rope = 4 * nv * d * b + min(ROPE_CHUNK_TOKENS, nv) * d * 24
    concat = 7 * n * d * b
    shared = 9 * n * d * b if replay else 0
    ffn = 2 * nv * d * b + 2 * nv * model.ffn_dim * b
    return base + max(rope, concat, shared, ffn)


def block_weight_bytes(model: ModelShape, quantize: str, dtype_bytes: int = 2) -> int:
    """Bytes of one block's weights: its linear weights at 1 byte (+ one fp32 scale per output row) when quantised."""
    total = model.block_params() * dtype_bytes
    if quantize in ("int8", "fp8"):
        linear_weights, _ = model.block_linear_params()
        d = model.inner_dim
        rows = 8 * d + 2 * d + model.ffn_dim + d  # output rows of one block's linears
        total += rows * 4 - linear_weights * (dtype_bytes - 1)
    return total


def weight_bytes(model: ModelShape, quantize: str, dtype_bytes: int = 2) -> int:
    """Bytes of the DiT's weights: the blocks (:func:`block_weight_bytes`) and the top-level modules in the model dtype."""
    top = (model.num_parameters() - model.num_layers * model.block_params()) * dtype_bytes
    return top + model.num_layers * block_weight_bytes(model, quantize, dtype_bytes)


def vae_decode_bytes(job: JobShape) -> int:
    """The VAE's tiled decode: the float32 output video, one tile's output and its widest activations."""
    tile_h, tile_w = VAE_TILE[0] * 8, VAE_TILE[1] * 8
    video = 3 * job.frames * job.height * job.width * 4
    tile = 3 * job.frames * tile_h * tile_w * 4
    chunk = 4 * VAE_DECODER_WIDTH * tile_h * tile_w * job.dtype_bytes * 6
    return video + tile + chunk


def resident_bytes(model: ModelShape, job: JobShape, offload: str, quantize: str = "none") -> int:
    """Device bytes a base segment keeps besides the K/V, once the encoders have left the GPU.

    offload "none": the DiT's and the VAE's weights plus the larger of a replaying forward's activations and the
    VAE decode; "model": whichever of DiT (+ activations) and VAE (+ decode) is on the device; "group": two blocks
    and the DiT's top-level weights (leaf-streamed VAE) plus the same working set as "none".
    """
    dit = weight_bytes(model, quantize, job.dtype_bytes)
    vae = VAE_PARAMS * job.dtype_bytes
    forward, decode = activation_bytes(model, job, replay=True), vae_decode_bytes(job)
    if offload == "model":
        return max(dit + forward, vae + decode)
    if offload == "group":
        streamed = (model.num_layers - 2) * block_weight_bytes(model, quantize, job.dtype_bytes)
        return dit - streamed + max(forward, decode)
    return dit + vae + max(forward, decode)


@dataclass(frozen=True)
class MemoryBudget:
    """Free bytes where the K/V can go, measured before anything loads.

    ``gpu_free``: free device memory (CUDA ``mem_get_info``; on a CPU run this is host memory and ``host_free`` is 0);
    ``gpu_resident``: what the job itself will keep on the device (weights, activations); ``host_free``: available
    host memory; ``disk_free``: free bytes where the disk tier writes (the work folder); None means no disk tier.
    """

    gpu_free: int
    gpu_resident: int
    host_free: int
    disk_free: int | None

    @property
    def gpu_for_kv(self) -> int:
        return max(0, self.gpu_free - self.gpu_resident - GPU_HEADROOM_BYTES)

    @property
    def host_for_kv(self) -> int:
        return max(0, self.host_free - HOST_HEADROOM_BYTES)

    @property
    def disk_for_kv(self) -> int:
        return 0 if self.disk_free is None else max(0, self.disk_free - DISK_HEADROOM_BYTES)


@dataclass(frozen=True)
class KVPlan:
    """Where the anchor's K/V lives for one job and what that costs.

    ``tiers`` are the bytes placed on "gpu", "host" and "disk" (filled in that order); ``transient_gpu`` the extra
    device memory while a base segment reads (items read ahead, or one recomputed forward's inputs);
    ``extra_forwards`` the transformer forwards a base segment adds; ``reprojected_items`` the (step, branch, block)
    entries whose K/V are recomputed from stored inputs (two extra [L, inner] x [inner, inner] GEMMs each);
    ``read_bytes`` what each base segment copies from host or disk.
    """

    placement: str
    fmt: KVFormat
    tiers: dict[str, int]
    transient_gpu: int
    extra_forwards: int
    reprojected_items: int
    read_bytes: int
    total_bytes: int

    def describe(self) -> str:
        parts = [f"{name} {format_bytes(size)}" for name, size in self.tiers.items() if size]
        where = ", ".join(parts) if parts else "nothing stored"
        cost = []
        if self.extra_forwards:
            cost.append(f"+{self.extra_forwards} forwards per base segment")
        if self.reprojected_items:
            cost.append(f"K/V re-projected for {self.reprojected_items} block calls")
        if self.read_bytes:
            cost.append(f"{format_bytes(self.read_bytes)} read back per base segment")
        return f"{self.placement} ({self.fmt}): {where}" + (f"; {', '.join(cost)}" if cost else "")


@dataclass(frozen=True)
class FitOption:
    """One change that would make a refused job fit: ``kind`` names it, ``detail`` gives the number."""

    kind: Literal["placement", "fewer_blocks", "disk", "host", "gpu"]
    detail: str


@dataclass
class KVFitError(Exception):
    """No K/V placement fits the budget; ``needed``/``available`` per tier and the ``options`` that would fit."""

    requested: str
    needed: dict[str, int]
    available: dict[str, int]
    options: list[FitOption] = field(default_factory=list)

    def __str__(self) -> str:
        need = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.needed.items())
        have = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.available.items())
        return f"K/V placement {self.requested} needs {need}; free for it: {have}"

    def describe(self, steps: tuple[int, int], blocks: tuple[int, int]) -> str:
        """One line for the ``steps``/``blocks`` ranges that were planned: what the K/V need, what is free, and each
        change that would make the job fit (settings named with :func:`~posegen_cli.errors.option`)."""
        tips = []
        for fit in self.options:
            if fit.kind == "placement":
                tips.append(f"{option('kv_placement')} {fit.detail}")
            elif fit.kind == "fewer_blocks":
                tips.append(f"{option('kv_blocks')} {blocks[1] - int(fit.detail)}-{blocks[1]}")
            elif fit.kind == "disk":
                tips.append(f"{option('work_dir')} on a disk with {fit.detail} free")
            elif fit.kind == "gpu":
                tips.append(f"{option('offload')} group, or {fit.detail} more free GPU memory")
        have = ", ".join(f"{tier} {format_bytes(size)}" for tier, size in self.available.items())
        return (
            f"the anchor's background K/V (steps {steps[0]}-{steps[1]}, blocks {blocks[0]}-{blocks[1]}) need "
            f"{format_bytes(self.needed['stored'])} stored or {format_bytes(self.needed['recompute on the GPU'])} of GPU "
            f"memory to recompute ({option('kv_placement')} {self.requested}), but only {have} are free for them"
            + (f" (try {'; or '.join(tips)})" if tips else " (free GPU memory, host memory or disk)")
        )


def _fill(total: int, item: int, capacities: list[tuple[str, int]]) -> dict[str, int] | None:
    """Whole items into tiers in order; None if they do not all fit."""
    tiers: dict[str, int] = {}
    left = total
    for name, cap in capacities:
        take = min(left, (cap // item) * item) if item else 0
        tiers[name] = take
        left -= take
    return tiers if left <= 0 else None


def plan_kv(
    model: ModelShape, job: JobShape, steps: int, blocks: int, budget: MemoryBudget, requested: str = "auto",
    lookahead: int = DEFAULT_LOOKAHEAD,
) -> KVPlan:  # fmt: skip
    """Choose where the anchor's K/V go; raise :class:`KVFitError` (with the options that fit) if nothing does.

    ``auto`` takes the first that fits of: K/V on the GPU (no extra work); inputs on the GPU; inputs on GPU then
    pinned host; inputs on GPU, host, then disk; recompute. Explicit placements: "gpu" (K/V, else inputs, all on
    the GPU), "host" (inputs in pinned host memory), "disk" (inputs on disk), "recompute". Whatever is read back
    from host or disk needs GPU memory for the entries in flight: one forward's sharing blocks plus ``lookahead``.
    """
    if requested not in KV_PLACEMENTS:
        raise ValueError(f"K/V placement must be one of {', '.join(KV_PLACEMENTS)}, not {requested!r}")
    plan = _first_fit(model, job, steps, blocks, budget, requested, lookahead)
    if plan is None:
        raise _refusal(model, job, steps, blocks, budget, requested, lookahead)
    return plan


def entries_in_flight(items: int, blocks: int, lookahead: int) -> int:
    """Entries read back from host or disk that sit on the GPU at once: a replaying forward takes all its sharing
    blocks' entries when it starts and holds them until it ends (``KVShareView.begin``), while the next forward's
    first ``lookahead`` are already being read."""
    return min(items, blocks + lookahead)


def _first_fit(
    model: ModelShape, job: JobShape, steps: int, blocks: int, budget: MemoryBudget, requested: str, lookahead: int
) -> KVPlan | None:
    n = kv_items(job, steps, blocks)
    masks = subject_mask_bytes(model, job, steps)
    kv_item, in_item = kv_item_bytes(model, job, "kv"), kv_item_bytes(model, job, "inputs")
    gpu, host, disk = budget.gpu_for_kv, budget.host_for_kv, budget.disk_for_kv
    ahead = entries_in_flight(n, blocks, lookahead) * in_item

    def stored(name: str, fmt: KVFormat, capacities: list[tuple[str, int]]) -> KVPlan | None:
        item = kv_item if fmt == "kv" else in_item
        tiers = _fill(n * item, item, [(t, max(0, c)) for t, c in capacities])
        if tiers is None:
            return None
        full = {"gpu": 0, "host": 0, "disk": 0, **tiers}
        moved = full["host"] + full["disk"]
        transient = ahead if moved else 0
        if full["gpu"] + transient > gpu:
            return None
        return KVPlan(name, fmt, full, transient, 0, n if fmt == "inputs" else 0, moved, n * item + masks)

    def recompute() -> KVPlan | None:
        transient = blocks * in_item if n else 0
        if transient > gpu:
            return None
        return KVPlan("recompute", "inputs", {"gpu": 0, "host": 0, "disk": 0}, transient, steps * job.branches if n else 0, n, 0, masks)

    candidates = {
        "gpu": [lambda: stored("gpu", "kv", [("gpu", gpu)]), lambda: stored("gpu", "inputs", [("gpu", gpu)])],
        "host": [lambda: stored("host", "inputs", [("host", host)])],
        "disk": [lambda: stored("disk", "inputs", [("disk", disk)])],
        "recompute": [recompute],
    }
    candidates["auto"] = [
        *candidates["gpu"],
        lambda: stored("gpu+host", "inputs", [("gpu", gpu - ahead), ("host", host)]),
        lambda: stored("gpu+host+disk", "inputs", [("gpu", gpu - ahead), ("host", host), ("disk", disk)]),
        recompute,
    ]
    for make in candidates[requested]:
        plan = make()
        if plan is not None:
            return plan
    return None


def _refusal(model: ModelShape, job: JobShape, steps: int, blocks: int, budget: MemoryBudget, requested: str, lookahead: int) -> KVFitError:
    """The facts of a refusal and every single change that would make the job fit."""
    in_item = kv_item_bytes(model, job, "inputs")
    n = kv_items(job, steps, blocks)
    gpu, host, disk = budget.gpu_for_kv, budget.host_for_kv, budget.disk_for_kv
    needed = {"stored": n * in_item, "recompute on the GPU": blocks * in_item}
    available = {"gpu": gpu, "host": host, "disk": disk}
    options: list[FitOption] = []
    if requested != "auto":
        plan = _first_fit(model, job, steps, blocks, budget, "auto", lookahead)
        if plan is not None:
            options.append(FitOption("placement", "auto" if "+" in plan.placement else plan.placement))
    for fewer in range(blocks - 1, 0, -1):
        if _first_fit(model, job, steps, fewer, budget, requested, lookahead) is not None:
            options.append(FitOption("fewer_blocks", str(fewer)))
            break
    ahead = entries_in_flight(n, blocks, lookahead) * in_item
    if gpu >= ahead and requested in ("auto", "disk"):
        short = n * in_item - (0 if requested == "disk" else (gpu - ahead) // in_item * in_item + host // in_item * in_item) - disk
        if short > 0:
            options.append(FitOption("disk", format_bytes(disk + short + DISK_HEADROOM_BYTES)))
    if blocks * in_item > gpu:
        options.append(FitOption("gpu", format_bytes(blocks * in_item - gpu)))
    return KVFitError(requested, needed, available, options)

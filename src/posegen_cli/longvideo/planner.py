"""The job planner: what a ``posegen animate`` job will cost, from the model config and tensor shapes alone.

Pure functions (no model, no GPU, no torch): a dry run of ``posegen animate`` prints :func:`plan_job`'s result.

- FLOPs count what ``torch.utils.flop_counter.FlopCounterMode`` counts on a real forward (matrix products,
  convolutions and attention at 2 FLOP per multiply-add; norms, RoPE and elementwise ops are not counted and are
  below 0.01 % at 720p), so a test checks them exactly on a tiny config.
- Memory is the peak of the allocations a segment makes on the GPU: resident weights, the anchor's K/V cache when it
  lives there, the largest set of activations alive at once inside a block, and the VAE's tiles.
- Time is FLOPs over an assumed fraction of the GPU's dense peak per attention kernel (:data:`UTILISATION`):
  estimates, to be replaced by ``benchmarks/gpu_suite.py`` figures; VAE, encoders and I/O are not included.

Sources: shared/specs/performance.md §D (FLOP formulas, 720p shapes), §A.1 (kernels), §A.3 (fp8), §A.9 (published
runs); GPU figures from NVIDIA's datasheets, listed per GPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    """Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s and memory; fp8 None where the GPU has no FP8 tensor cores."""

    name: str
    memory_gib: float
    bf16_tflops: float
    fp8_tflops: float | None
    capability: tuple[int, int]
    source: str


GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        GPU(
            "H200",
            141 * 1e9 / GIB,
            989.4,
            1978.9,
            (9, 0),
            "NVIDIA H200 SXM datasheet: 141 GB HBM3e; 1,979/3,958 TFLOPS bf16/fp8 with sparsity, half dense",
        ),
        GPU(
            "H100",
            80 * 1e9 / GIB,
            989.4,
            1978.9,
            (9, 0),
            "NVIDIA H100 SXM datasheet: 80 GB HBM3; 1,979/3,958 TFLOPS bf16/fp8 with sparsity, half dense",
        ),
        GPU("A100-80GB", 80 * 1e9 / GIB, 312.0, None, (8, 0), "NVIDIA A100 datasheet: 80 GB HBM2e; 312 TFLOPS bf16 dense; no FP8"),
        GPU(
            "L40S",
            48 * 1e9 / GIB,
            362.05,
            733.0,
            (8, 9),
            "NVIDIA L40S datasheet: 48 GB GDDR6; 362.05/733 TFLOPS bf16/fp8 dense (733/1,466 sparse)",
        ),
        GPU(
            "RTX 4090",
            24 * 1e9 / GIB,
            165.2,
            330.3,
            (8, 9),
            "NVIDIA Ada whitepaper: 24 GB GDDR6X; 165.2 bf16 and 330.3 fp8 TFLOPS dense with FP32 accumulate",
        ),
    )
}


def find_gpu(name: str) -> GPU:
    """The :data:`GPUS` entry whose name appears in ``name`` (a GPU option value or ``torch.cuda.get_device_name``)."""
    key = name.lower().replace("-", " ").replace("_", " ")
    for gpu in sorted(GPUS.values(), key=lambda g: -len(g.name)):
        short = gpu.name.lower().replace("-", " ")
        if short in key or (short == "a100 80gb" and "a100" in key and "80" in key):
            return gpu
    raise ValueError(f"GPU {name!r} is not in the planner's table (known: {', '.join(GPUS)})")


def expected_kernel(requested: str, capability: tuple[int, int] | None) -> str:
    """The attention kernel ``requested`` would run as on a GPU of ``capability`` (None: the CPU), without looking
    for optional packages: ``auto`` is cuDNN on Hopper, PyTorch's flash kernel on Ampere/Ada, native elsewhere."""
    if requested != "auto":
        return requested
    if capability is None or capability < (8, 0):
        return "native"
    return "cudnn" if capability[0] == 9 else "flash"


UTILISATION: dict[str, float] = {
    "native": 0.54,
    "cudnn": 0.70,
    "flash": 0.60,
    "flash3": 0.80,
    "sage": 1.00,
}
"""Assumed fraction of the dense bf16 peak the DiT reaches per attention kernel (estimates). native: official Wan2.1
on an H200 ran at 54 % (LightX2V, spec §D.5); flash: the paper's FlashAttention-2 runs on A100 at 55-64 %; flash3:
790 of 989 TFLOP/s (issue 13); cudnn between; sage (int8 QK, fp8 PV) counts its speed-up as if at full bf16 peak."""
COMPILE_SPEEDUP = 1.10
"""Regional compilation of the blocks: 1.05-1.2x estimated for Wan at 720p (spec §A.2)."""
GEMM_UTILISATION = 0.80
"""Fraction of the fp8 peak the fp8 linear layers reach (estimate; LightX2V measured 1.12x end to end at 720p)."""

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
AUTO_HEADROOM_GIB = 6.0
"""GPU memory the dry run's K/V estimate leaves free for the replaying forward (the run itself places K/V with
``longvideo.memory.plan_kv``)."""


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of the PoseGen DiT config (diffusers names; ``PoseGenTransformer3DModel.config``)."""

    dim: int
    heads: int
    ffn_dim: int
    layers: int
    in_channels: int
    out_channels: int
    text_dim: int
    freq_dim: int
    image_dim: int
    added_kv_dim: int
    patch: tuple[int, int, int]
    use_hand: bool = True
    use_hand_proj: bool = False
    text_len: int = 512
    image_len: int = 257

    @classmethod
    def from_config(cls, config: dict[str, Any], text_len: int = 512, image_len: int = 257) -> ModelShape:
        return cls(
            dim=config["num_attention_heads"] * config["attention_head_dim"],
            heads=config["num_attention_heads"],
            ffn_dim=config["ffn_dim"],
            layers=config["num_layers"],
            in_channels=config["in_channels"],
            out_channels=config["out_channels"],
            text_dim=config["text_dim"],
            freq_dim=config["freq_dim"],
            image_dim=config["image_dim"],
            added_kv_dim=config["added_kv_proj_dim"],
            patch=tuple(config["patch_size"]),
            use_hand=bool(config.get("use_hand", True)),
            use_hand_proj=bool(config.get("use_hand_proj", False)),
            text_len=text_len,
            image_len=image_len,
        )

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch)

    def block_linear_params(self) -> tuple[int, int]:
        """(weights, biases) of one block's linear layers: self-attn q,k,v,o; cross q,k,v,o + image k,v; FFN."""
        d, f = self.dim, self.ffn_dim
        weights = 4 * d * d + 4 * d * d + 2 * self.added_kv_dim * d + 2 * d * f
        biases = 8 * d + 2 * d + d + f
        return weights, biases

    def block_params(self) -> int:
        """One block: its linears, q/k norms (4 x d, + image k norm d), the affine cross-attn LayerNorm (2d), table (6d)."""
        weights, biases = self.block_linear_params()
        return weights + biases + 5 * self.dim + 2 * self.dim + 6 * self.dim

    def params(self) -> int:
        """Every parameter of the PoseGen DiT (checked against a built model by a test)."""
        d, p = self.dim, self.patch_volume
        embed = (self.in_channels * p + 1) * d + (self.out_channels * p + 1) * d  # patch, reference patch
        if self.use_hand:
            embed += (self.out_channels * p + 1) * d + ((d * d + d) if self.use_hand_proj else 0)
        cond = (self.freq_dim * d + d) + (d * d + d) + (d * 6 * d + 6 * d)  # time embedding, time projection
        cond += (self.text_dim * d + d) + (d * d + d)  # text embedding
        cond += 2 * self.image_dim + (self.image_dim * self.image_dim + self.image_dim) + (self.image_dim * d + d) + 2 * d
        head = (d * self.out_channels * p + self.out_channels * p) + 2 * d  # proj_out, output scale/shift table
        return embed + cond + self.layers * self.block_params() + head


WAN_I2V_14B = ModelShape(
    dim=5120, heads=40, ffn_dim=13824, layers=40, in_channels=36, out_channels=16, text_dim=4096, freq_dim=256,
    image_dim=1280, added_kv_dim=5120, patch=(1, 2, 2), use_hand=True, use_hand_proj=True,
)  # fmt: skip
"""The release's DiT (Wan2.1-I2V-14B-720P + PoseGen inputs; ``use_hand_proj`` as the larger of the two variants)."""


def token_grid(height: int, width: int, frames: int, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """(f, h, w) video tokens of a segment: the VAE's 4x time and 8x space strides, then the patch."""
    latent_frames = (frames - 1) // 4 + 1
    return latent_frames // patch[0], height // 8 // patch[1], width // 8 // patch[2]


@dataclass(frozen=True)
class Flops:
    """FLOPs of one transformer forward by kind (2 per multiply-add)."""

    attention: int
    linear: int
    other: int

    @property
    def total(self) -> int:
        return self.attention + self.linear + self.other

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.attention + other.attention, self.linear + other.linear, self.other + other.other)

    def scaled(self, factor: int) -> Flops:
        return Flops(self.attention * factor, self.linear * factor, self.other * factor)


def forward_flops(shape: ModelShape, grid: tuple[int, int, int], ref_grid: tuple[int, int, int], *,
                  map_blocks: int = 0, replay_blocks: int = 0, batch: int = 1) -> Flops:  # fmt: skip
    """FLOPs of one forward over ``grid`` video and ``ref_grid`` reference tokens.

    ``map_blocks``: blocks that also compute the subject map (head-mean logits of the cross-attention queries against
    all text keys: the positive branch of a sharing step); ``replay_blocks``: sharing blocks that also attend to the
    anchor's K/V and project that output (a base segment's sharing step). attention = QKᵀ and PV products;
    linear = every linear layer of the blocks; other = embeddings, patch convolutions, head, subject maps.
    """
    d, f, p = shape.dim, shape.ffn_dim, shape.patch_volume
    nv, nr = math.prod(grid) * batch, math.prod(ref_grid) * batch
    n = nv + nr
    lt, li = shape.text_len * batch, shape.image_len * batch
    self_attn = 4 * n * (n // batch) * d
    cross_attn = 4 * nv * (shape.text_len + shape.image_len) * d
    self_linear = 2 * n * d * d * 4
    cross_linear = 2 * nv * d * d * 2 + 2 * lt * d * d * 2 + 2 * li * shape.added_kv_dim * d * 2
    ffn = 2 * n * d * f * 2
    attention = shape.layers * (self_attn + cross_attn) + replay_blocks * self_attn
    linear = shape.layers * (self_linear + cross_linear + ffn) + replay_blocks * 2 * n * d * d
    embed = 2 * nv * d * shape.in_channels * p + 2 * nr * d * shape.out_channels * p
    if shape.use_hand:
        embed += 2 * nv * d * shape.out_channels * p + (2 * nv * d * d if shape.use_hand_proj else 0)
    time = 2 * (2 * batch * (shape.freq_dim * d + d * d + d * 6 * d))  # video and reference timestep embeddings
    text = 2 * lt * (shape.text_dim * d + d * d)
    image = 2 * li * (shape.image_dim * shape.image_dim + shape.image_dim * d)
    head = 2 * nv * d * shape.out_channels * p
    maps = map_blocks * 2 * nv * d * shape.text_len
    return Flops(attention, linear, embed + time + text + image + head + maps)


@dataclass(frozen=True)
class SegmentCost:
    """One segment of the plan: what it runs and what that costs."""

    index: int
    kind: str
    start: int
    stop: int
    passes: int
    flops: int
    seconds: float | None
    peak_gib: float


@dataclass
class JobPlan:
    """Everything a dry run prints; :meth:`as_dict` for scripts (JSON)."""

    gpu: str | None
    gpu_source: str | None
    settings: dict[str, Any]
    segments: list[SegmentCost]
    passes: int
    flops_per_pass: int
    flops: int
    seconds_per_pass: float | None
    seconds: float | None
    memory_gib: dict[str, float]
    peak_gib: float
    kv: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["segments"] = [asdict(seg) for seg in self.segments]
        return out


def pass_seconds(flops: Flops, gpu: GPU, attention: str, compiled: bool, quantize: str) -> float:
    """Estimated seconds of one forward on ``gpu``: attention and other work at the kernel's utilisation of the
    bf16 peak, the linear layers at the same rate, or at :data:`GEMM_UTILISATION` of the fp8 peak with fp8 weights."""
    rate = gpu.bf16_tflops * 1e12 * UTILISATION[attention]
    linear_rate = gpu.fp8_tflops * 1e12 * GEMM_UTILISATION if quantize == "fp8" and gpu.fp8_tflops else rate
    seconds = (flops.attention + flops.other) / rate + flops.linear / linear_rate
    return seconds / (COMPILE_SPEEDUP if compiled else 1.0)


def weight_bytes(shape: ModelShape, quantize: str, dtype_bytes: int = 2) -> int:
    """Bytes of the DiT's weights: block linear weights at 1 byte (+ one scale per output row) when quantised."""
    linear_weights, _ = shape.block_linear_params()
    rows = 8 * shape.dim + 2 * shape.dim + shape.ffn_dim + shape.dim  # output rows of one block's linears
    total = shape.params() * dtype_bytes
    if quantize in ("int8", "fp8"):
        total -= shape.layers * linear_weights * (dtype_bytes - 1)
        total += shape.layers * rows * 4
    return total


def kv_cache_bytes(
    shape: ModelShape, tokens: int, steps: int, blocks: int, dtype_bytes: int = 2, batch: int = 1, branches: int = 2
) -> int:
    """The anchor's K/V: K and V [B, tokens, dim] for each shared step, sharing block and guidance branch (spec §2.6;
    guidance 1, as with a distillation, runs one branch)."""
    return 2 * branches * steps * blocks * batch * tokens * shape.dim * dtype_bytes


def activation_bytes(shape: ModelShape, grid: tuple[int, int, int], ref_grid: tuple[int, int, int], *,
                     replay: bool, dtype_bytes: int = 2) -> int:  # fmt: skip
    """Largest set of tensors alive at once inside one block's forward (batch 1), phase by phase.

    Always alive: the block's input x and ref and the complex128 RoPE tables (8 bytes per token and head channel).
    RoPE of the video keys: the modulated input, q (done), k, its rotated output and one chunk of float64 input
    plus complex128 product (24 bytes per element). Concatenation of q/k/v: the modulated inputs, the per-stream q/k/v
    and the joint ones (7 tensors of all tokens). Replay: the modulated inputs, joint q/k/v, the anchor's K/V copied in,
    the two attention outputs and a projection. FFN: the modulated input, two [tokens, ffn_dim] tensors (linear
    output, GELU) and the second linear's output.
    """
    nv, nr = math.prod(grid), math.prod(ref_grid)
    n, d, b = nv + nr, shape.dim, dtype_bytes
    head_dim = d // shape.heads
    base = n * d * b + n * head_dim * 8
    rope = 4 * nv * d * b + min(ROPE_CHUNK_TOKENS, nv) * d * 24
    concat = 7 * n * d * b
    shared = 9 * n * d * b if replay else 0
    ffn = 2 * nv * d * b + 2 * nv * shape.ffn_dim * b
    return base + max(rope, concat, shared, ffn)


def vae_bytes(height: int, width: int, frames: int, dtype_bytes: int = 2) -> int:
    """The VAE's tiled decode: its weights, the float32 output video, one tile's output and its widest activations."""
    tile_h, tile_w = VAE_TILE[0] * 8, VAE_TILE[1] * 8
    video = 3 * frames * height * width * 4
    tile = 3 * frames * tile_h * tile_w * 4
    chunk = 4 * VAE_DECODER_WIDTH * tile_h * tile_w * dtype_bytes * 6
    return VAE_PARAMS * dtype_bytes + video + tile + chunk


@dataclass(frozen=True)
class JobSpec:
    """The settings of a job the plan depends on (``attention`` already resolved to the kernel the run would take)."""

    height: int
    width: int
    frames: int
    steps: int
    guidance: float
    kv_steps: tuple[int, int]
    kv_blocks: tuple[int, int]
    max_map_block: int
    attention: str = "native"
    compiled: bool = False
    quantize: str = "none"
    offload: str = "none"
    dtype_bytes: int = 2


def plan_job(segments: list[Any], shape: ModelShape, spec: JobSpec, gpu: GPU | None) -> JobPlan:
    """Cost of every segment of ``segments`` (``longvideo.plan.Segment``, in generation order) and of the job.

    ``gpu`` None gives no time estimate and sizes memory without a GPU's capacity (the K/V cache is then placed on
    the GPU, as on a CPU run).
    """
    height, width, frames, steps, guidance = spec.height, spec.width, spec.frames, spec.steps, spec.guidance
    kv_steps, kv_blocks, max_map_block = spec.kv_steps, spec.kv_blocks, spec.max_map_block
    attention, compiled, quantize, offload, dtype_bytes = spec.attention, spec.compiled, spec.quantize, spec.offload, spec.dtype_bytes
    grid = token_grid(height, width, frames, shape.patch)
    ref_grid = (1, grid[1], grid[2])
    tokens = math.prod(grid) + math.prod(ref_grid)
    branches = 2 if guidance != 1.0 else 1
    shared_steps = max(0, min(kv_steps[1], steps) - kv_steps[0])
    sharing = max(0, kv_blocks[1] - kv_blocks[0])
    map_blocks = min(max_map_block + 1, shape.layers)
    plain = forward_flops(shape, grid, ref_grid)
    with_maps = forward_flops(shape, grid, ref_grid, map_blocks=map_blocks)
    replaying = forward_flops(shape, grid, ref_grid, map_blocks=map_blocks, replay_blocks=sharing)
    replaying_uncond = forward_flops(shape, grid, ref_grid, replay_blocks=sharing)

    def seconds(f: Flops) -> float | None:
        return None if gpu is None else pass_seconds(f, gpu, attention, compiled, quantize)

    has_bases = any(seg.kind == "base" for seg in segments)
    kv_bytes = kv_cache_bytes(shape, tokens, shared_steps, sharing, dtype_bytes, branches=branches) if has_bases else 0
    weights = weight_bytes(shape, quantize, dtype_bytes)
    encoders = (TEXT_ENCODER_PARAMS + IMAGE_ENCODER_PARAMS + VAE_PARAMS) * dtype_bytes
    block_weights = weights // max(shape.layers, 1)
    if offload == "none":
        resident = weights + encoders
    elif offload == "model":
        resident = weights
    else:
        resident = (weights - shape.layers * block_weights) + 2 * block_weights + IMAGE_ENCODER_PARAMS * dtype_bytes
        resident += TEXT_ENCODER_PARAMS * dtype_bytes + VAE_PARAMS * dtype_bytes
    capacity = None if gpu is None else gpu.memory_gib * GIB
    kv_place = "gpu"
    if kv_bytes and capacity is not None and kv_bytes + AUTO_HEADROOM_GIB * GIB >= capacity - resident:
        kv_place = "cpu"
    act_plain = activation_bytes(shape, grid, ref_grid, replay=False, dtype_bytes=dtype_bytes)
    act_replay = activation_bytes(shape, grid, ref_grid, replay=True, dtype_bytes=dtype_bytes)
    vae = vae_bytes(height, width, frames, dtype_bytes)
    kv_gpu = kv_bytes if kv_place == "gpu" else 0

    costs = []
    for seg in segments:
        if seg.kind == "transition":
            per_step = [plain.scaled(branches)] * steps
            peak = resident + max(act_plain, vae)
        else:
            shared = plain + (with_maps if seg.kind == "anchor" else replaying)
            if branches == 1:
                shared = with_maps if seg.kind == "anchor" else replaying
            elif seg.kind == "base":
                shared = replaying + replaying_uncond
            else:
                shared = with_maps + plain
            per_step = [shared] * shared_steps + [plain.scaled(branches)] * (steps - shared_steps)
            act = act_replay if seg.kind == "base" and kv_place == "cpu" else act_plain
            peak = resident + kv_gpu + max(act, vae)
        total = sum((f.total for f in per_step), 0)
        secs = None if gpu is None else sum(seconds(f) for f in per_step)  # type: ignore[misc]
        costs.append(SegmentCost(seg.index, seg.kind, seg.start, seg.stop, steps * branches, total, secs, round(peak / GIB, 2)))

    notes = []
    if gpu is not None and capacity is not None and max(c.peak_gib for c in costs) * GIB > capacity:
        notes.append(
            f"the estimated peak exceeds the {gpu.name}'s {gpu.memory_gib:.0f} GiB: use offload group (or model), or quantize fp8/int8"
        )
    if gpu is not None:
        notes.append("time: DiT passes only (VAE, encoders, pose and I/O not included), at assumed kernel utilisations")
    memory = {
        "transformer_weights": round(weights / GIB, 2),
        "encoders_and_vae_weights": round(encoders / GIB, 2),
        "resident_weights": round(resident / GIB, 2),
        "kv_cache": round(kv_bytes / GIB, 2),
        "kv_cache_on_gpu": round(kv_gpu / GIB, 2),
        "activations": round(max(act_plain, act_replay if kv_place == "cpu" else act_plain) / GIB, 2),
        "vae_decode": round(vae / GIB, 2),
    }
    total_flops = sum(c.flops for c in costs)
    total_seconds = None if gpu is None else sum(c.seconds or 0.0 for c in costs)
    return JobPlan(
        gpu=None if gpu is None else gpu.name,
        gpu_source=None if gpu is None else gpu.source,
        settings={
            "size": f"{width}x{height}",
            "frames_per_segment": frames,
            "steps": steps,
            "guidance": guidance,
            "attention": attention,
            "compile": compiled,
            "quantize": quantize,
            "offload": offload,
            "tokens_per_pass": tokens,
        },
        segments=costs,
        passes=sum(c.passes for c in costs),
        flops_per_pass=plain.total,
        flops=total_flops,
        seconds_per_pass=seconds(plain),
        seconds=total_seconds,
        memory_gib=memory,
        peak_gib=max(c.peak_gib for c in costs),
        kv={
            "steps": list(kv_steps),
            "blocks": list(kv_blocks),
            "bytes": kv_bytes,
            "gib": round(kv_bytes / GIB, 2),
            "placement": kv_place if kv_bytes else "none",
        },
        notes=notes,
    )

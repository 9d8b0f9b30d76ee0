"""The job planner: what a ``posegen animate`` job will cost, from the model config and tensor shapes alone.

Pure functions (no model, no GPU, no torch): a dry run of ``posegen animate`` prints :func:`plan_job`'s result.

- FLOPs count what ``torch.utils.flop_counter.FlopCounterMode`` counts on a real forward (matrix products,
  convolutions and attention at 2 FLOP per multiply-add; norms, RoPE and elementwise ops are not counted and are
  below 0.01 % at 720p), so a test checks them exactly on a tiny config.
- Memory is ``longvideo.memory``'s sizing, the same the run uses: resident weights, the largest set of activations
  alive at once inside a block or the VAE's tiles, and the anchor's K/V where ``memory.plan_kv`` places it.
- Time is FLOPs over an assumed fraction of the GPU's dense peak per attention kernel (:data:`UTILISATION`):
  estimates, to be replaced by ``benchmarks/gpu_suite.py`` figures; VAE, encoders and I/O are not included.

Sources: shared/specs/performance.md §D (FLOP formulas, 720p shapes), §A.1 (kernels), §A.3 (fp8), §A.9 (published
runs); GPU figures from NVIDIA's datasheets, listed per GPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from posegen_cli.longvideo.memory import (
    GIB,
    IMAGE_ENCODER_PARAMS,
    TEXT_ENCODER_PARAMS,
    VAE_PARAMS,
    JobShape,
    KVFitError,
    KVPlan,
    MemoryBudget,
    ModelShape,
    activation_bytes,
    plan_kv,
    resident_bytes,
    vae_decode_bytes,
    weight_bytes,
)


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
    d, f, p = shape.inner_dim, shape.ffn_dim, shape.patch_volume
    nv, nr = math.prod(grid) * batch, math.prod(ref_grid) * batch
    n = nv + nr
    lt, li = shape.text_len * batch, shape.image_len * batch
    self_attn = 4 * n * (n // batch) * d
    cross_attn = 4 * nv * (shape.text_len + shape.image_len) * d
    self_linear = 2 * n * d * d * 4
    cross_linear = 2 * nv * d * d * 2 + 2 * lt * d * d * 2 + 2 * li * shape.added_kv_proj_dim * d * 2
    ffn = 2 * n * d * f * 2
    attention = shape.num_layers * (self_attn + cross_attn) + replay_blocks * self_attn
    linear = shape.num_layers * (self_linear + cross_linear + ffn) + replay_blocks * 2 * n * d * d
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


@dataclass(frozen=True)
class JobSpec:
    """The settings of a job the plan depends on (``attention`` already resolved to the kernel the run would take).

    ``host_free``/``disk_free``: bytes of host memory and of disk in the work folder the K/V may use (measured by the
    caller; None: unknown, so unlimited host memory and no disk tier). ``kv_placement``: as ``memory.plan_kv``.
    """

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
    kv_placement: str = "auto"
    host_free: int | None = None
    disk_free: int | None = None


UNKNOWN_MEMORY = 1 << 62
"""Stands in for a capacity the plan does not know (no GPU named, host memory not measured)."""


def kv_budget(spec: JobSpec, gpu: GPU | None, resident: int) -> MemoryBudget:
    """Where the K/V could go: the GPU's memory beside ``resident`` bytes, host memory, disk (see :class:`JobSpec`).

    Without a GPU the run's device is the host itself, so host memory is the "gpu" tier and there is no host tier.
    """
    host = UNKNOWN_MEMORY if spec.host_free is None else spec.host_free
    if gpu is None:
        return MemoryBudget(host, resident, 0, spec.disk_free)
    return MemoryBudget(int(gpu.memory_gib * GIB), resident, host, spec.disk_free)


def plan_job(segments: list[Any], shape: ModelShape, spec: JobSpec, gpu: GPU | None) -> JobPlan:
    """Cost of every segment of ``segments`` (``longvideo.plan.Segment``, in generation order) and of the job.

    Memory comes from ``longvideo.memory`` (the same sizing and K/V placement the run uses): the peak of a segment is
    :func:`~posegen_cli.longvideo.memory.resident_bytes` plus, for the anchor and the base segments, the K/V that
    :func:`~posegen_cli.longvideo.memory.plan_kv` puts on the GPU or holds there in flight. A K/V cache that fits
    nowhere is reported in ``kv["refused"]`` and a note (the run refuses such a job before any work). ``gpu`` None
    gives no time estimate and plans as a run on the host would.
    """
    height, width, frames, steps, guidance = spec.height, spec.width, spec.frames, spec.steps, spec.guidance
    kv_steps, kv_blocks, max_map_block = spec.kv_steps, spec.kv_blocks, spec.max_map_block
    attention, compiled, quantize, offload, dtype_bytes = spec.attention, spec.compiled, spec.quantize, spec.offload, spec.dtype_bytes
    grid = token_grid(height, width, frames, shape.patch_size)
    ref_grid = (1, grid[1], grid[2])
    tokens = math.prod(grid) + math.prod(ref_grid)
    branches = 2 if guidance != 1.0 else 1
    shared_steps = max(0, min(kv_steps[1], steps) - kv_steps[0])
    sharing = max(0, kv_blocks[1] - kv_blocks[0])
    map_blocks = min(max_map_block + 1, shape.num_layers)
    plain = forward_flops(shape, grid, ref_grid)
    with_maps = forward_flops(shape, grid, ref_grid, map_blocks=map_blocks)
    replaying = forward_flops(shape, grid, ref_grid, map_blocks=map_blocks, replay_blocks=sharing)
    replaying_uncond = forward_flops(shape, grid, ref_grid, replay_blocks=sharing)

    def seconds(f: Flops) -> float | None:
        return None if gpu is None else pass_seconds(f, gpu, attention, compiled, quantize)

    job = JobShape(height, width, frames, dtype_bytes, branches == 2)
    weights = weight_bytes(shape, quantize, dtype_bytes)
    encoders = (TEXT_ENCODER_PARAMS + IMAGE_ENCODER_PARAMS) * dtype_bytes
    vae_weights = VAE_PARAMS * dtype_bytes
    resident = resident_bytes(shape, job, offload, quantize)
    # the embeddings are computed before the first segment, with the encoders beside the DiT (then they leave the GPU)
    start_peak = {"none": weights + vae_weights + encoders, "model": TEXT_ENCODER_PARAMS * dtype_bytes}.get(offload, 0)
    kv: dict[str, Any] = {"steps": list(kv_steps), "blocks": list(kv_blocks), "bytes": 0, "gib": 0.0, "placement": "none"}
    kv_plan: KVPlan | None = None
    notes = []
    if any(seg.kind == "base" for seg in segments) and shared_steps and sharing:
        try:
            kv_plan = plan_kv(shape, job, shared_steps, sharing, kv_budget(spec, gpu, resident), spec.kv_placement)
        except KVFitError as exc:
            kv.update(placement="refused", refused=exc.describe(kv_steps, kv_blocks))
            notes.append(f"the run would refuse this job before any work: {kv['refused']}")
        else:
            kv.update(
                bytes=kv_plan.total_bytes, gib=round(kv_plan.total_bytes / GIB, 2), placement=kv_plan.placement,
                format=kv_plan.fmt, tiers_gib={t: round(b / GIB, 2) for t, b in kv_plan.tiers.items()},
                in_flight_gib=round(kv_plan.transient_gpu / GIB, 2), extra_forwards_per_base=kv_plan.extra_forwards,
                read_gib_per_base=round(kv_plan.read_bytes / GIB, 2), describe=kv_plan.describe(),
            )  # fmt: skip
    kv_gpu = 0 if kv_plan is None else kv_plan.tiers["gpu"]
    in_flight = 0 if kv_plan is None else kv_plan.transient_gpu

    costs = []
    for seg in segments:
        if seg.kind == "transition":
            per_step = [plain.scaled(branches)] * steps
            peak = resident
        else:
            if branches == 1:
                shared = with_maps if seg.kind == "anchor" else replaying
            elif seg.kind == "base":
                shared = replaying + replaying_uncond
            else:
                shared = with_maps + plain
            per_step = [shared] * shared_steps + [plain.scaled(branches)] * (steps - shared_steps)
            peak = resident + kv_gpu + (in_flight if seg.kind == "base" else 0)
        total = sum((f.total for f in per_step), 0)
        secs = None if gpu is None else sum(seconds(f) for f in per_step)  # type: ignore[misc]
        costs.append(SegmentCost(seg.index, seg.kind, seg.start, seg.stop, steps * branches, total, secs, round(peak / GIB, 2)))

    peak = max(start_peak, *(c.peak_gib * GIB for c in costs))
    if gpu is not None and peak > gpu.memory_gib * GIB:
        notes.append(
            f"the estimated peak exceeds the {gpu.name}'s {gpu.memory_gib:.0f} GiB: use offload group (or model), or quantize fp8/int8"
        )
    if gpu is not None:
        notes.append("time: DiT passes only (VAE, encoders, pose and I/O not included), at assumed kernel utilisations")
    memory = {
        "transformer_weights": round(weights / GIB, 2),
        "encoders_weights": round(encoders / GIB, 2),
        "vae_weights": round(vae_weights / GIB, 2),
        "resident_during_segments": round(resident / GIB, 2),
        "start_with_encoders": round(start_peak / GIB, 2),
        "kv_cache": round(kv["bytes"] / GIB, 2),
        "kv_cache_on_gpu": round((kv_gpu + in_flight) / GIB, 2),
        "activations": round(activation_bytes(shape, job, replay=kv_plan is not None) / GIB, 2),
        "vae_decode": round(vae_decode_bytes(job) / GIB, 2),
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
            "kv_placement": spec.kv_placement,
            "tokens_per_pass": tokens,
        },
        segments=costs,
        passes=sum(c.passes for c in costs),
        flops_per_pass=plain.total,
        flops=total_flops,
        seconds_per_pass=seconds(plain),
        seconds=total_seconds,
        memory_gib=memory,
        peak_gib=round(peak / GIB, 2),
        kv=kv,
        notes=notes,
    )

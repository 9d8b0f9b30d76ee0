"""Seconds per PoseGen DiT forward, with and without background K/V replay, peak memory and achieved TFLOP/s.

With a CUDA GPU: the full 14B configuration (random bf16 weights: same FLOPs as the real ones) at
720×1280×81 frames, against the GPU's own measured bf16 matmul throughput (targets: ≥ 60 % of it, replay
overhead ≤ 3 %, peak ≤ 40 GB without offload; shared/specs/performance.md §D). Without a GPU it runs a small
configuration on the CPU and says so: those numbers only show the harness works.

    python benchmarks/transformer_step.py [--device auto|cpu|cuda] [--repeats 2] [--placement gpu|host] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from posegen_cli.models import KVShareCache, PoseGenTransformer3DModel, tiny_transformer_config
from posegen_cli.models.kv_store import TieredStore

FULL = {
    "config": tiny_transformer_config(
        num_attention_heads=40,
        attention_head_dim=128,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=13824,
        num_layers=40,
        image_dim=1280,
        added_kv_proj_dim=5120,
        use_hand_proj=True,
        shift_ref_pos=True,
    ),
    "latent": (21, 160, 90),
    "text_len": 512,
    "image_len": 257,
    "share_blocks": set(range(34, 40)),
    "max_map_block": 10,
}
SMALL = {
    "config": tiny_transformer_config(
        num_attention_heads=4, attention_head_dim=24, text_dim=64, freq_dim=32, ffn_dim=256, num_layers=8, image_dim=32
    ),
    "latent": (5, 32, 18),
    "text_len": 64,
    "image_len": 17,
    "share_blocks": {6, 7},
    "max_map_block": 3,
}


def forward_flops(n_video: int, n_ref: int, n_ctx: int, d: int, ffn: int, layers: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add), as counted in performance.md §D.2."""
    n = n_video + n_ref
    per_block = 8 * n * d * d + 4 * n * n * d + 4 * n_video * d * d + 4 * n_ctx * d * d + 4 * n_video * n_ctx * d + 4 * n * d * ffn
    return float(layers * per_block)


def replay_extra_flops(n_video: int, n_ref: int, d: int, blocks: int) -> float:
    """Source attention (QKᵀ and PV against the anchor's keys) plus its output projection, per sharing block."""
    n = n_video + n_ref
    return float(blocks * (4 * n * n * d + 2 * n * d * d))


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's achieved dense matmul throughput, the yardstick for the model's utilisation."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(config: dict, device: torch.device, dtype: torch.dtype) -> PoseGenTransformer3DModel:
    """Random weights straight on the device in ``dtype`` (no fp32 copy of 14B parameters on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = PoseGenTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def make_inputs(setup: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    cfg = setup["config"]
    f, h, w = setup["latent"]
    gen = torch.Generator(device=device).manual_seed(1)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    return {
        "hidden_states": rnd(1, 16, f, h, w),
        "timestep": torch.tensor([1000.0], device=device),
        "encoder_hidden_states": rnd(1, setup["text_len"], cfg["text_dim"]),
        "encoder_hidden_states_image": rnd(1, setup["image_len"], cfg["image_dim"]),
        "control_latents": rnd(1, 20, f, h, w),
        "reference_latents": rnd(1, 16, 1, h, w),
        "hand_latents": rnd(1, 16, f, h, w),
    }


def timed(model: PoseGenTransformer3DModel, inputs: dict, device: torch.device, repeats: int, cache: KVShareCache | None) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            model(**inputs, kv_share=cache.view(0, "cond") if cache is not None else None)
            sync(device)
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--placement", default="host", choices=["gpu", "host"], help="where the anchor K/V live")
    parser.add_argument("--backend", default=None, help="diffusers attention backend, e.g. _native_cudnn, _flash_3_hub")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    )
    gpu = device.type == "cuda"
    setup = FULL if gpu else SMALL
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.set_grad_enabled(False)
    if not gpu:
        print("no GPU: running a SMALL configuration on the CPU; these numbers say nothing about the 14B targets", file=sys.stderr)

    cfg = setup["config"]
    model = build_model(cfg, device, dtype)
    if args.backend:
        model.set_attention_backend(args.backend)
    inputs = make_inputs(setup, device, dtype)
    f, h, w = setup["latent"]
    n_video, n_ref = f * h * w // 4, h * w // 4
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    flops = forward_flops(n_video, n_ref, setup["text_len"] + setup["image_len"], d, cfg["ffn_dim"], cfg["num_layers"])

    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    timed(model, inputs, device, 1, None)
    plain_s = timed(model, inputs, device, args.repeats, None)
    plain_peak = torch.cuda.max_memory_allocated(device) if gpu else None

    subject = list(range(2, 4))
    store = TieredStore() if args.placement == "gpu" else TieredStore(gpu_bytes=0, host_bytes=None)
    cache = KVShareCache({0}, setup["share_blocks"], subject, max_map_block=setup["max_map_block"], store=store)
    with torch.no_grad():
        model(**inputs, kv_share=cache.view(0, "cond"))
    cache.start_replay()
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    replay_s = timed(model, inputs, device, args.repeats, cache)
    replay_peak = torch.cuda.max_memory_allocated(device) if gpu else None
    extra = replay_extra_flops(n_video, n_ref, d, len(setup["share_blocks"]))

    peak_matmul = matmul_tflops(device, dtype)
    achieved = flops / plain_s / 1e12
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "configuration": "full 14B, 720x1280x81" if gpu else "small (no GPU)",
        "dtype": str(dtype).removeprefix("torch."),
        "attention_backend": args.backend or "native",
        "tokens": {"video": n_video, "reference": n_ref},
        "forward_pflop": flops / 1e15,
        "plain_s_per_forward": plain_s,
        "replay_s_per_forward": replay_s,
        "replay_overhead_pct": 100 * (replay_s / plain_s - 1),
        # The release's defaults share 2 of 25 steps: the cost per base segment (both guidance branches).
        "replay_overhead_pct_per_segment": 100 * (replay_s / plain_s - 1) * 2 / 25,
        "replay_extra_flop_pct": 100 * extra / flops,
        "kv_cache_gib": cache.nbytes / 2**30,
        "kv_placement": args.placement,
        "achieved_tflops": achieved,
        "matmul_tflops": peak_matmul,
        "utilisation_pct_of_matmul": 100 * achieved / peak_matmul,
        "peak_gib_plain": None if plain_peak is None else plain_peak / 2**30,
        "peak_gib_replay": None if replay_peak is None else replay_peak / 2**30,
        "targets": {"utilisation_pct_min": 60, "replay_overhead_pct_max": 3, "peak_gb_max": 40},
    }
    cache.release()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

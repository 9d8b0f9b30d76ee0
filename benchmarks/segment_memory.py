"""Peak GPU memory and seconds per base segment with background K/V sharing, beside the planner's estimate.

For each shot preset (default half-body and full-body) on random weights: the anchor's shared steps run and record
their K/V where ``plan_kv`` places them (``--placement``, default auto), then a base segment's shared forwards
replay them. Measured: the peak device memory of the replaying forwards, seconds per plain and per replaying
forward, and from those the seconds of a whole ``--steps`` segment (shared steps replay, the rest are plain; the DiT
only, no VAE) and the share the K/V path adds. The planner's placement, its peak estimate
(DiT weights, a replaying forward and the K/V on the GPU) and its K/V bytes are printed beside each.

With CUDA: the full 14B configuration at 720x1280x81 in bf16; ``--gpu-memory-limit GB`` caps the process to that
much device memory (``torch.cuda.set_per_process_memory_fraction``) and ``--host-memory-limit GB`` the host tier, so
an 80 GB GPU with 64 GB of host memory can be checked on a larger machine. Without CUDA (or ``--scale tiny``) a tiny
configuration on the CPU shows the harness works; its figures say nothing about the targets (40 GB at half-body,
K/V path ≤ 10 % of a full-body base segment).

    python benchmarks/segment_memory.py [--scale auto|tiny|full] [--presets half-body full-body]
        [--placement auto|gpu|host|disk|recompute] [--gpu-memory-limit 80] [--host-memory-limit 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_suite import build_model

from posegen_cli.device import available_host_bytes
from posegen_cli.longvideo.memory import (
    GIB,
    JobShape,
    MemoryBudget,
    ModelShape,
    activation_bytes,
    format_bytes,
    kv_cache_bytes,
    plan_kv,
    weight_bytes,
)
from posegen_cli.longvideo.presets import kv_share_ranges
from posegen_cli.longvideo.renderer import plan_store
from posegen_cli.models import KVShareCache, kv_sharing, tiny_transformer_config
from posegen_cli.video import available_bytes

SCALES = {
    "full": {
        "config": tiny_transformer_config(
            num_attention_heads=40, attention_head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
            image_dim=1280, added_kv_proj_dim=5120,
        ),
        "size": (720, 1280), "frames": 81, "text_len": 512, "image_len": 257,
    },
    "tiny": {
        "config": tiny_transformer_config(num_layers=8),
        "size": (96, 64), "frames": 9, "text_len": 16, "image_len": 5,
    },
}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(setup: dict, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    cfg = setup["config"]
    height, width = setup["size"]
    f, h, w = (setup["frames"] - 1) // 4 + 1, height // 8, width // 8
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    return {
        "hidden_states": rnd(1, 16, f, h, w),
        "encoder_hidden_states_image": rnd(1, setup["image_len"], cfg["image_dim"]),
        "control_latents": rnd(1, 20, f, h, w),
        "reference_latents": rnd(1, 16, 1, h, w),
        "hand_latents": rnd(1, 16, f, h, w),
    }


def _forward(
    model: Any, inputs: dict, context: torch.Tensor, step: int, cache: KVShareCache | None, branch: str, device: torch.device
) -> float:
    """Seconds of one forward, including what the cache does for it (a recomputed anchor forward, reads)."""
    _sync(device)
    start = time.perf_counter()
    with kv_sharing(model, cache), model.cache_context(branch, step_index=step):
        model(**inputs, timestep=torch.tensor([1000.0 - 40 * step], device=device), encoder_hidden_states=context)
    _sync(device)
    return time.perf_counter() - start


def run(
    scale: str = "auto",
    presets: tuple[str, ...] = ("half-body", "full-body"),
    placement: str = "auto",
    steps: int = 25,
    device: str = "auto",
    gpu_memory_limit_gb: float | None = None,
    host_memory_limit_gb: float | None = None,
    disk_dir: Path | None = None,
) -> dict[str, Any]:
    """Measure each preset; returns plain values (bytes, seconds) and the planner's estimate for each.

    ``scale`` "auto" is "full" with CUDA and "tiny" without. Raises ``KVFitError`` if a preset fits nowhere.
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    cuda = dev.type == "cuda"
    scale = ("full" if cuda else "tiny") if scale == "auto" else scale
    setup = SCALES[scale]
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.set_grad_enabled(False)
    if cuda and gpu_memory_limit_gb is not None:
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_memory_limit_gb * GIB / total), dev)
    model = build_model(setup["config"], dev, dtype)
    shape = ModelShape.from_config(model.config)
    height, width = setup["size"]
    job = JobShape(height, width, setup["frames"], torch.finfo(dtype).bits // 8)
    gen = torch.Generator(device=dev).manual_seed(7)
    cond = torch.randn(1, setup["text_len"], setup["config"]["text_dim"], device=dev, dtype=dtype, generator=gen)
    uncond = torch.randn_like(cond)
    anchor, base = _inputs(setup, dev, dtype, 1), _inputs(setup, dev, dtype, 2)
    work = Path(disk_dir) if disk_dir is not None else Path(tempfile.mkdtemp(prefix="segment-memory-"))
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "scale": scale,
        "dtype": str(dtype).removeprefix("torch."),
        "size": f"{width}x{height}x{setup['frames']}",
        "parameters": shape.num_parameters(),
        "gpu_memory_limit_gb": gpu_memory_limit_gb,
        "host_memory_limit_gb": host_memory_limit_gb,
        "presets": {},
    }
    for preset in presets:
        kv = kv_share_ranges(preset, steps, shape.num_layers)
        n_steps, n_blocks = kv.steps[1] - kv.steps[0], kv.blocks[1] - kv.blocks[0]
        if cuda:
            free, _ = torch.cuda.mem_get_info(dev)
            if gpu_memory_limit_gb is not None:
                free = min(free, int(gpu_memory_limit_gb * GIB) - torch.cuda.memory_reserved(dev))
            budget_gpu, resident = free, activation_bytes(shape, job, replay=True)
        else:
            budget_gpu, resident = available_host_bytes(), activation_bytes(shape, job, replay=True)
        host = available_host_bytes()  # on the CPU the "GPU" tier and the host tier are the same memory
        if host_memory_limit_gb is not None:
            host = min(host, int(host_memory_limit_gb * GIB))
        budget = MemoryBudget(budget_gpu, resident, host, available_bytes(work))
        plan = plan_kv(shape, job, n_steps, n_blocks, budget, placement)
        # the DiT alone (this script runs no VAE): weights, a replaying forward, the K/V on the GPU or in flight
        estimate = weight_bytes(shape, "none", job.dtype_bytes) + resident + plan.tiers["gpu"] + plan.transient_gpu
        cache_kwargs: dict[str, Any] = {"max_map_block": kv.max_map_block}
        if plan.placement == "recompute":
            cache_kwargs["recompute_model"] = model
        else:
            cache_kwargs.update(store=plan_store(plan, work / f"kv-{preset}"), kv_format=plan.fmt)
        cache = KVShareCache(kv.step_list, kv.block_list, [1, 2], **cache_kwargs)
        plain = []
        for step in kv.step_list:
            for branch, context in (("cond", cond), ("uncond", uncond)):
                plain.append(_forward(model, anchor, context, step, cache, branch, dev))
        cache.start_replay()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        replay = []
        for step in kv.step_list:
            for branch, context in (("cond", cond), ("uncond", uncond)):
                replay.append(_forward(model, base, context, step, cache, branch, dev))
        peak = torch.cuda.max_memory_allocated(dev) if cuda else None
        plain_s = _forward(model, base, cond, steps - 1, None, "cond", dev)
        stored = cache.store.tier_bytes()
        cache.release()
        segment_s = sum(replay) + (steps - n_steps) * 2 * plain_s
        results["presets"][preset] = {
            "kv_steps": list(kv.steps),
            "kv_blocks": list(kv.blocks),
            "kv_bytes_release_format": kv_cache_bytes(shape, job, n_steps, n_blocks, "kv"),
            "planner": plan.describe(),
            "planner_kv_bytes": plan.total_bytes,
            "planner_peak_gpu_bytes": estimate,
            "stored_bytes_by_tier": stored,
            "measured_peak_gpu_bytes": peak,
            "seconds_plain_forward": plain_s,
            "seconds_recording_forwards": plain,
            "seconds_replaying_forwards": replay,
            "seconds_per_segment_dit": segment_s,
            "kv_path_pct_of_segment": 100 * (sum(replay) - len(replay) * plain_s) / segment_s,
        }
    return results


def _summary(results: dict[str, Any]) -> str:
    lines = [f"{results['device']} ({results['scale']}, {results['dtype']}, {results['size']})"]
    for preset, r in results["presets"].items():
        peak = "n/a (CPU)" if r["measured_peak_gpu_bytes"] is None else format_bytes(r["measured_peak_gpu_bytes"])
        lines.append(
            f"  {preset}: {r['planner']}; peak {peak} (planner {format_bytes(r['planner_peak_gpu_bytes'])}); "
            f"{r['seconds_per_segment_dit']:.2f} s/segment (DiT), K/V path {r['kv_path_pct_of_segment']:+.1f} %"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="auto", choices=["auto", "tiny", "full"])
    parser.add_argument("--presets", nargs="+", default=["half-body", "full-body"])
    parser.add_argument("--placement", default="auto", choices=["auto", "gpu", "host", "disk", "recompute"])
    parser.add_argument("--steps", type=int, default=25, help="steps of the segment the per-forward times extrapolate to")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--gpu-memory-limit", type=float, default=None, help="GB of device memory the run may use")
    parser.add_argument("--host-memory-limit", type=float, default=None, help="GB of host memory for the K/V host tier")
    parser.add_argument("--disk-dir", type=Path, default=None, help="where the disk tier writes (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available() and args.scale != "full":
        print("no GPU: tiny configuration on the CPU; these figures only show the harness works", file=sys.stderr)
    results = run(
        args.scale, tuple(args.presets), args.placement, args.steps, args.device, args.gpu_memory_limit, args.host_memory_limit, args.disk_dir
    )
    print(_summary(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

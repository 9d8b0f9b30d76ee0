"""GPU figures for issue 13: seconds per PoseGen DiT pass per attention kernel, compiled or not, fp8, K/V record/replay.

One prepared run on one H100/H200 (at most 8 minutes: ``--budget-s``): the full-size PoseGen transformer with random
bf16 weights (the same FLOPs as real ones) at 720x1280x81 (79,200 tokens). After a warm-up pass, it times
``--repeats`` passes of each configuration and prints, per configuration: seconds per pass, TFLOP/s (FLOPs from
``longvideo.planner.forward_flops``, exact to ``FlopCounterMode``), the ratio to the rate of an 8192x8192x8192 bf16
matrix product measured in the same run, the peak GPU memory and the planner's estimate beside it. It writes
everything to ``--json``. Configurations: native eager, cudnn, flash3 (if its package or Hub kernel can be had),
sage (if it can be had; approximate), the best exact kernel compiled, fp8 weights (needs torchao), one K/V record
pass and one replay pass (anchor K/V on the GPU); then ``benchmarks/segment_memory.py``'s ``run()`` if that file
exists, and ``benchmarks/segment_speed.py``'s ``run()`` (one whole segment per speed preset: exact, fast, turbo), its
DiT shortened to the layers the time left allows (else "skipped: not present").
Targets (issue 13): exact stack >= 1.4x native eager and >= 75 % of the matmul rate; replay <= 3 % of a pass;
720p peak <= 40 GB bf16, <= 30 GB fp8; planner within 10 % of each measured peak.

The GPU machine has PyTorch only: carry diffusers (and its small needs), torchao, and optionally kernels /
flash_attn_interface / sageattention as wheels, install them to /tmp/site first (see /work/.library/device/README.md):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:src \\
        python3 benchmarks/gpu_suite.py --json $OUT/gpu_suite.json

``--tiny`` runs a small configuration (on the CPU when there is no GPU; about 5 minutes on a loaded 2-core CPU, most
of it compiling): it proves the script and the compile path work; its numbers say nothing about the targets.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from posegen_cli.longvideo.memory import JobShape, ModelShape, activation_bytes, weight_bytes
from posegen_cli.longvideo.planner import forward_flops
from posegen_cli.models import (
    KVShareCache,
    PoseGenTransformer3DModel,
    acceleration,
    kv_sharing,
    tiny_transformer_config,
)

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
    "matmul": 8192,
}
SEGMENT_SPEED_PASSES = 84
"""Full-DiT passes of ``segment_speed.run()``: exact 25 x 2, fast about 30 (MagCache skips), turbo 4 x 1."""
TINY = {
    "config": tiny_transformer_config(
        num_attention_heads=4, attention_head_dim=24, text_dim=64, freq_dim=32, ffn_dim=256, num_layers=4, image_dim=32
    ),
    "latent": (5, 32, 18),
    "text_len": 64,
    "image_len": 17,
    "share_blocks": {3},
    "max_map_block": 1,
    "matmul": 1024,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Dense matrix-product rate on random data (3 warm-ups, 10 timed), the yardstick for the model's utilisation."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * size**3 * 10 / (time.perf_counter() - start) / 1e12


def build_model(config: dict, device: torch.device, dtype: torch.dtype) -> PoseGenTransformer3DModel:
    """Random weights straight on the device in ``dtype`` (no fp32 copy of 16B parameters on the way)."""
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


class Suite:
    """Runs and records the configurations, within a time budget."""

    def __init__(self, setup: dict, device: torch.device, dtype: torch.dtype, repeats: int, budget_s: float) -> None:
        self.setup, self.device, self.dtype, self.repeats = setup, device, dtype, repeats
        self.deadline = time.perf_counter() + budget_s
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        cfg = setup["config"]
        self.shape = ModelShape.from_config(cfg, setup["text_len"], setup["image_len"])
        f, h, w = setup["latent"]
        self.grid, self.ref_grid = (f, h // 2, w // 2), (1, h // 2, w // 2)
        self.model = build_model(cfg, device, dtype)
        self.inputs = make_inputs(setup, device, dtype)
        self.reference: torch.Tensor | None = None

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def skip(self, name: str, why: str) -> None:
        self.skipped.append(f"{name}: skipped: {why}")
        print(f"{name}: skipped: {why}", flush=True)

    def forward(self, cache: KVShareCache | None = None, branch: str = "cond") -> torch.Tensor:
        with torch.no_grad(), kv_sharing(self.model, cache), self.model.cache_context(branch, step_index=0):
            return self.model(**self.inputs).sample

    def time(self, name: str, *, quantize: str = "none", replay: bool = False, cache: KVShareCache | None = None,
             repeats: int | None = None, warmup: bool = True) -> dict[str, Any] | None:  # fmt: skip
        """Time ``repeats`` passes (after one warm-up) and record one row; None when the budget is spent."""
        repeats = repeats or self.repeats
        if self.rows and self.left() < (1 + repeats) * self.rows[0]["s_per_pass"] * 1.2:
            self.skip(name, "time budget spent")
            return None
        cuda = self.device.type == "cuda"
        if warmup:
            out = self.forward(cache)
        if cuda:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(repeats):
            sync(self.device)
            start = time.perf_counter()
            out = self.forward(cache)
            sync(self.device)
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        maps = self.setup["max_map_block"] + 1 if cache is not None else 0
        flops = forward_flops(
            self.shape, self.grid, self.ref_grid, map_blocks=maps, replay_blocks=len(self.setup["share_blocks"]) if replay else 0
        )
        f, h, w = self.setup["latent"]
        job = JobShape(h * 8, w * 8, (f - 1) * 4 + 1, self.dtype.itemsize)
        estimate = weight_bytes(self.shape, quantize, self.dtype.itemsize) + activation_bytes(self.shape, job)
        if cache is not None:
            estimate += cache.nbytes
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        if self.reference is None:
            self.reference = out.float()
        error = float((out.float() - self.reference).norm() / self.reference.norm())
        row = {
            "config": name,
            "s_per_pass": seconds,
            "tflops": flops.total / seconds / 1e12,
            "peak_gib": None if peak is None else peak / 1024**3,
            "planner_gib": estimate / 1024**3,
            "rel_error_vs_native": error,
        }
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row


def try_backend(suite: Suite, choice: str) -> str | None:
    """The diffusers backend of ``choice`` if it can run here, else None (and a 'skipped' line)."""
    try:
        resolved = acceleration.resolve_attention(choice, suite.device, suite.dtype)
        acceleration.set_attention(suite.model, resolved)
    except Exception as exc:  # noqa: BLE001 - any reason a kernel cannot run is reported and skipped
        suite.skip(choice, str(exc).splitlines()[0])
        return None
    return resolved.backend


def optional_extras(suite: Suite, results: dict[str, Any]) -> None:
    """Other helpers' benchmarks, when their code is on this branch."""
    segment_memory = ROOT / "benchmarks" / "segment_memory.py"
    if segment_memory.is_file():
        spec = importlib.util.spec_from_file_location("segment_memory", segment_memory)
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(module)
        results["segment_memory"] = module.run()
        print("segment_memory:", json.dumps(results["segment_memory"], default=str), flush=True)
    else:
        suite.skip("segment_memory", "not present (benchmarks/segment_memory.py, issue 12)")
    segment_speed = ROOT / "benchmarks" / "segment_speed.py"
    if not segment_speed.is_file():
        suite.skip("segment_speed", "not present (benchmarks/segment_speed.py, issue 14)")
        return
    spec = importlib.util.spec_from_file_location("segment_speed", segment_speed)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if suite.device.type != "cuda":
        results["segment_speed"] = module.run("tiny", "cpu")
    else:
        # exact, fast and turbo cost about 50 + 30 + 4 passes of the full DiT; fit the depth to the time left
        full_layers = suite.setup["config"]["num_layers"]
        per_layer_pass = suite.rows[0]["s_per_pass"] / full_layers
        layers = int(suite.left() / (SEGMENT_SPEED_PASSES * per_layer_pass * 1.5))
        if layers < 1:
            suite.skip("segment_speed", f"{suite.left():.0f} s left: not enough for one DiT layer per preset")
            return
        suite.model = None
        torch.cuda.empty_cache()
        results["segment_speed"] = module.run("full", "cuda", layers=min(layers, full_layers))
    print(module.markdown(results["segment_speed"]), flush=True)


def run(setup: dict, device: torch.device, repeats: int, budget_s: float) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    matmul = matmul_tflops(device, dtype, setup["matmul"])
    print(f"matmul {setup['matmul']}^3 {str(dtype).removeprefix('torch.')}: {matmul:.1f} TFLOP/s", flush=True)
    suite = Suite(setup, device, dtype, repeats, budget_s - (time.perf_counter() - started))

    suite.time("native eager")
    best = "native"
    for choice in ("cudnn", "flash3", "sage"):
        if try_backend(suite, choice) is not None and suite.time(f"{choice} eager") is not None and choice != "sage":
            best = choice
    try_backend(suite, best)
    acceleration.compile_blocks(suite.model)
    compile_start = time.perf_counter()
    suite.forward()
    print(f"compile ({best}): {time.perf_counter() - compile_start:.1f} s incl. the first pass", flush=True)
    suite.time(f"{best} compiled", warmup=False)

    cache = KVShareCache({0}, suite.setup["share_blocks"], [2, 3], max_map_block=suite.setup["max_map_block"])
    suite.time(f"{best} compiled, K/V record", cache=cache, repeats=1)
    cache.start_replay()
    suite.time(f"{best} compiled, K/V replay", cache=cache, replay=True, warmup=True)
    cache.release()

    if device.type == "cuda":
        try:
            acceleration.quantize_linears(suite.model, acceleration.quantization_config("fp8", device))
            suite.time(f"{best} compiled, fp8", quantize="fp8")
        except Exception as exc:  # noqa: BLE001
            suite.skip("fp8", str(exc).splitlines()[0])
    else:
        suite.skip("fp8", "needs an FP8 GPU (compute capability >= 8.9)")

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "configuration": "full PoseGen DiT, 720x1280x81, random bf16" if setup is FULL else "tiny (says nothing about the targets)",
        "matmul_tflops": matmul,
        "rows": suite.rows,
        "skipped": suite.skipped,
    }
    optional_extras(suite, results)
    results["seconds"] = time.perf_counter() - started
    print(f"\n{'configuration':38} {'s/pass':>8} {'TFLOP/s':>8} {'of mm':>6} {'peak GiB':>9} {'planner':>8}")
    for row in suite.rows:
        peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        print(
            f"{row['config']:38} {row['s_per_pass']:8.3f} {row['tflops']:8.1f} {row['tflops'] / matmul:6.0%} {peak:>9} {row['planner_gib']:8.2f}"
        )
    native = suite.rows[0]["s_per_pass"]
    exact = [r for r in suite.rows if "compiled" in r["config"] and "K/V" not in r["config"] and "fp8" not in r["config"]]
    replay = [r for r in suite.rows if r["config"].endswith("replay")]
    if exact:
        print(f"exact stack: {native / exact[0]['s_per_pass']:.2f}x native eager (target >= 1.4x)")
    if exact and replay:
        print(f"K/V replay: +{replay[0]['s_per_pass'] / exact[0]['s_per_pass'] - 1:.1%} of a pass (includes the source attention)")
    for line in suite.skipped:
        print(line)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small configuration (the CPU's when there is no GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting configurations after this long")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print("no GPU: running the --tiny configuration on the CPU (its numbers say nothing about the targets)", file=sys.stderr)
    results = run(TINY if args.tiny or device.type != "cuda" else FULL, device, args.repeats, args.budget_s)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.json}")
    sys.exit(0 if math.isfinite(results["seconds"]) else 1)


if __name__ == "__main__":
    main()

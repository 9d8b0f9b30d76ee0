"""Time and memory of a whole ``animate`` run, per phase, and the share of time spent outside the DiT.

``--scale tiny`` (default without a GPU) runs the tiny random model set on the CPU: it shows the harness and the
fixed costs (pose, merge, encode), not model speed. ``--scale full`` builds the real architecture with random
weights in memory (the 14B DiT in bf16, the real Wan VAE; text and image encoders keep their output widths but
one layer, as they run once per job) and renders at 720x1280 with 81-frame segments: the target is under 5 %
of the segment time outside the transformer. Both variants are the same weights at full size (no release
checkpoint to adapt), so variant switches cost nothing there.

    python benchmarks/animate.py [--scale tiny|full] [--frames 36] [--steps 2] [--resolution WxH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from animate_inputs import make_driving_clip
from gpu_suite import FULL, build_model

from posegen_cli.longvideo import AnimateOptions, animate, loading
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline
from posegen_cli.report import Reporter
from posegen_cli.testing import make_tiny_models

REFERENCE = ROOT.parent / "shared" / "data" / "reference_person.png"
PROMPT = "a young man in a black cardigan and jeans standing on a beach at dusk"


class TransformerClock:
    """Wall time inside the DiT's forward calls (synchronised on CUDA so queued kernels are counted)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.calls = 0
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before(self, *args: Any, **kwargs: Any) -> None:
        self._sync()
        self._start = time.perf_counter()

    def after(self, *args: Any, **kwargs: Any) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def attach(self, pipe: PoseGenPipeline) -> None:
        pipe.transformer.register_forward_pre_hook(self.before, with_kwargs=True)
        pipe.transformer.register_forward_hook(self.after, with_kwargs=True)


class FullSizePipeline(PoseGenPipeline):
    """The pipeline over in-memory random full-size components; one DiT serves both segment kinds."""

    def use_variant(self, name: str) -> None:
        return None


def full_size_pipeline(device: torch.device, dtype: torch.dtype, layers: int) -> PoseGenPipeline:
    """Random weights with the real shapes; encoders are one layer deep but emit the real widths."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from posegen_cli.pipelines.scheduling import make_scheduler
    from posegen_cli.testing.tokenizer import make_tiny_tokenizer

    config = {**FULL["config"], "num_layers": layers}
    tokenizer = make_tiny_tokenizer()
    text = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=config["text_dim"], d_kv=64, d_ff=256, num_layers=1, num_heads=8,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    )  # fmt: skip
    image = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=config["image_dim"], intermediate_size=512, num_hidden_layers=2, num_attention_heads=16,
                         image_size=224, patch_size=14)
    )  # fmt: skip
    return FullSizePipeline(
        tokenizer=tokenizer,
        text_encoder=text.to(device, dtype).eval(),
        image_encoder=image.to(device, dtype).eval(),
        vae=AutoencoderKLWan().to(device, dtype).eval(),
        transformer=build_model(config, device, dtype),
        scheduler=make_scheduler(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["tiny", "full"], default=None, help="default: full with a GPU, else tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frames", type=int, default=None, help="driving frames (default: 3 segments' worth)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 25 full, 2 tiny)")
    parser.add_argument("--resolution", default=None, help="WxH (default: 720x1280 full, 64x112 tiny)")
    parser.add_argument("--layers", type=int, default=40, help="DiT depth for --scale full (40 is the real model)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    )
    scale = args.scale or ("full" if device.type == "cuda" else "tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    full = scale == "full"
    geometry = {"segment_frames": 81, "head": 21, "tail": 20} if full else {"segment_frames": 13, "head": 5, "tail": 4}
    frames = args.frames or (2 * geometry["segment_frames"] - geometry["head"] - geometry["tail"] + geometry["segment_frames"] // 2)
    steps = args.steps or (25 if full else 2)
    resolution = args.resolution or ("720x1280" if full else "64x112")
    if device.type != "cuda":
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))

    clock = TransformerClock(device)
    load_models = loading.load_pipeline

    def load_pipeline(*a: Any, **kw: Any) -> PoseGenPipeline:
        pipe = full_size_pipeline(device, dtype, args.layers) if full else load_models(*a, **kw)
        clock.attach(pipe)
        return pipe

    loading.load_pipeline = load_pipeline
    with tempfile.TemporaryDirectory(prefix="posegen-bench-") as tmp:
        work = Path(tmp)
        os.environ["POSEGEN_CACHE_DIR"] = str(work / "cache")
        os.environ["HF_HUB_OFFLINE"] = "1"
        models = make_tiny_models(work / "models")
        driving = make_driving_clip(REFERENCE, work / "driving.mp4", frames)
        options = AnimateOptions(
            prompt=PROMPT, steps=steps, resolution=resolution, device=str(device), pose_backend="mediapipe",
            models_dir=models, shot="half-body", **geometry,
        )  # fmt: skip
        result = animate(REFERENCE, driving, work / "out.mp4", options=options, reporter=Reporter(quiet=True))

    segments_s = result.phases["segments"]
    total_s = sum(result.phases.values())
    report = {
        "scale": scale,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "resolution": resolution,
        "driving_frames": frames,
        "segments": result.segments,
        "segment_frames": geometry["segment_frames"],
        "steps": steps,
        "dit_layers": args.layers if full else None,
        "seconds": {k: round(v, 3) for k, v in result.phases.items()},
        "phase_memory": result.phase_memory,
        "transformer_seconds": round(clock.seconds, 3),
        "transformer_calls": clock.calls,
        "outside_transformer_share_of_segments": round(1 - clock.seconds / segments_s, 4),
        "outside_transformer_share_of_run": round(1 - clock.seconds / total_s, 4),
        "peak_gpu_memory_gb": None if result.peak_gpu_memory_bytes is None else round(result.peak_gpu_memory_bytes / 1024**3, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if full and report["outside_transformer_share_of_segments"] >= 0.05:
        print("warning: more than 5 % of the segment time is spent outside the transformer", file=sys.stderr)


if __name__ == "__main__":
    main()

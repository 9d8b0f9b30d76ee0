"""Seconds to load both PoseGen DiT variants: from the converted cache, against reading its files once and the release path.

Target (issue 12): a job's model load from the converted cache takes at most 2x the time to read the converted files
once. Measured here: (1) reading every converted safetensors file once (cold unless the page cache holds them),
(2) ``PoseGenVariants.from_converted`` onto the device plus one base -> transition -> base switch, (3) the release
path ``PoseGenVariants.from_release`` (read and compare both folders, merge the LoRAs on the CPU) plus the same
switches. The first conversion's time is reported separately (once per checkpoint).

``--posegen-dir`` takes a real ``posegen`` download (``720p-81f-base``/``720p-81f-cond``); without it the tiny random
release folders of ``make-tiny-models`` are used, which only shows the harness works (not run on a GPU here).

    python benchmarks/model_load.py [--posegen-dir DIR] [--device auto|cpu|cuda] [--dtype bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from posegen_cli.longvideo.loading import BASE_FOLDER, TRANSITION_FOLDER
from posegen_cli.models import PoseGenVariants
from posegen_cli.models.checkpoint_cache import converted_checkpoint
from posegen_cli.testing import make_tiny_models


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_once(folder: Path) -> tuple[float, int]:
    start, size = time.perf_counter(), 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 26):
                size += len(chunk)
    return time.perf_counter() - start, size


def _load_and_switch(load: Callable[[], PoseGenVariants], device: torch.device) -> tuple[float, float]:
    """Seconds to load both variants, then seconds of one base -> transition -> base round of switches."""
    _sync(device)
    start = time.perf_counter()
    variants = load()
    _sync(device)
    loaded = time.perf_counter()
    for name in ("transition", "base"):
        variants.activate(name)
    _sync(device)
    return loaded - start, time.perf_counter() - loaded


def run(posegen_dir: Path | None = None, device: str = "auto", dtype: torch.dtype = torch.bfloat16, cache: Path | None = None) -> dict[str, Any]:
    """Load both variants each way; returns seconds and bytes."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if posegen_dir is None:
        posegen_dir = make_tiny_models(Path(tempfile.mkdtemp(prefix="model-load-"))) / "posegen"
    root = cache if cache is not None else Path(tempfile.mkdtemp(prefix="converted-"))
    folders = (posegen_dir / BASE_FOLDER, posegen_dir / TRANSITION_FOLDER)
    start = time.perf_counter()
    converted = [converted_checkpoint(folder, dtype, root=root) for folder in folders]
    convert_s = time.perf_counter() - start
    reads = [_read_once(folder) for folder in converted]
    load_s, switch_s = _load_and_switch(lambda: PoseGenVariants.from_converted(*converted, dtype=dtype, device=dev), dev)
    release_s, release_switch_s = _load_and_switch(lambda: PoseGenVariants.from_release(*folders, dtype=dtype, device=dev), dev)
    read_s = sum(s for s, _ in reads)
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "checkpoints": str(posegen_dir),
        "dtype": str(dtype).removeprefix("torch."),
        "converted_bytes": sum(n for _, n in reads),
        "seconds_first_conversion": convert_s,
        "seconds_read_converted_once": read_s,
        "seconds_load_converted": load_s,
        "load_over_read": load_s / read_s if read_s else None,
        "seconds_switch_round_converted": switch_s,
        "seconds_load_release": release_s,
        "seconds_switch_round_release": release_switch_s,
        "target_load_over_read_max": 2.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posegen-dir", type=Path, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--cache", type=Path, default=None, help="where converted copies go (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.posegen_dir is None:
        print("no --posegen-dir: tiny random checkpoints; the figures only show the harness works", file=sys.stderr)
    result = run(args.posegen_dir, args.device, getattr(torch, args.dtype), args.cache)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""CPU and wall time of `posegen` answering without doing any work: help, version, input errors, doctor.

Each command runs in a fresh interpreter (as a user types it), ``--repeat`` times; the figures are the median
user+system CPU seconds of the child and its wall time. The target (issue 10) is well under a second of CPU for
every line: heavy libraries (torch, cv2, diffusers, transformers, mediapipe) must load only when a stage needs
them. ``doctor`` reports torch's CUDA view, so it is the one line that imports torch.

    python benchmarks/startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES: dict[str, list[str]] = {
    "--help": ["--help"],
    "--version": ["--version"],
    "animate --help": ["animate", "--help"],
    "animate (missing reference)": ["animate", "{tmp}/missing.png", "{tmp}/missing.mp4"],
    "extract-pose (missing video)": ["extract-pose", "{tmp}/missing.mp4"],
    "prompt (empty image)": ["prompt", "{tmp}/empty.png"],
    "doctor --models-dir": ["doctor", "--models-dir", "{tmp}/models"],
}


def run_once(args: list[str]) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, exit code) of one ``python -m posegen_cli.cli args`` run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "posegen_cli.cli", *args], check=False, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (the median is printed)")
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPU(s); median of {args.repeat} runs")
    print(f"{'command':32s} {'CPU s':>7s} {'wall s':>7s} {'exit':>5s}")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "empty.png").touch()
        Path(tmp, "models").mkdir()
        worst = 0.0
        for name, template in CASES.items():
            argv = [part.format(tmp=tmp) for part in template]
            runs = [run_once(argv) for _ in range(args.repeat)]
            cpu, wall = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            worst = max(worst, cpu) if name != "doctor --models-dir" else worst
            print(f"{name:32s} {cpu:7.2f} {wall:7.2f} {runs[-1][2]:5d}")
    print(f"slowest help/error line: {worst:.2f} s of CPU (target: well under 1 s)")


if __name__ == "__main__":
    main()

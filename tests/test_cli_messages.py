"""What the CLI says: fast answers without heavy imports, flags shown as flags, hints that work when followed."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from animate_inputs import make_driving_clip
from typer.testing import CliRunner

from posegen_cli import longvideo
from posegen_cli.cli import app
from posegen_cli.pose import extract
from posegen_cli.pose.keypoints import KeypointTrack, save_npz
from posegen_cli.pose.types import NUM_KEYPOINTS
from posegen_cli.testing import __main__ as testing_cli
from posegen_cli.video import iter_frames, probe_video, write_video

HEAVY = ("torch", "cv2", "diffusers", "transformers", "mediapipe")
runner = CliRunner()

PROBE = """
import json, sys
from posegen_cli.cli import app
try:
    app(sys.argv[2:], prog_name="posegen")
except SystemExit as exc:
    code = exc.code
heavy = [name for name in {heavy!r} if name in sys.modules]
open(sys.argv[1], "w").write(json.dumps({{"code": code, "heavy": heavy}}))
"""


def _imports_after(tmp_path: Path, args: list[str]) -> dict:
    """Run the CLI with ``args`` in a fresh interpreter; its exit code and the heavy libraries it imported."""
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), str(report), *args], check=True, capture_output=True)
    return json.loads(report.read_text())


def test_importing_the_cli_imports_no_heavy_library() -> None:
    code = f"import sys, posegen_cli.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip() == "[]"


@pytest.mark.parametrize(
    "args,code",
    [
        (["--help"], 0),
        (["animate", "--help"], 0),
        (["animate", "{tmp}/missing.png", "{tmp}/missing.mp4"], 2),
        (["extract-pose", "{tmp}/missing.mp4"], 2),
        (["prompt", "{tmp}/missing.png"], 2),
        (["doctor", "--models-dir", "{tmp}"], 1),
    ],
)
def test_help_errors_and_doctor_answer_without_heavy_imports(tmp_path: Path, args: list[str], code: int) -> None:
    result = _imports_after(tmp_path, [a.format(tmp=tmp_path) for a in args])
    assert result == {"code": code, "heavy": []}


@pytest.mark.parametrize("command", ["animate", "extract-pose", "prompt", "download", "convert-checkpoint", "doctor"])
def test_help_shows_flags_as_flags(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "220"})
    assert result.exit_code == 0
    lines = [line for line in result.stdout.splitlines() if "--" in line and "--help" not in line]
    assert any("--quiet" in line for line in lines)
    for line in lines:
        assert "<bool>" not in line, line
    quiet = next(line for line in lines if "--quiet" in line)
    assert re.search(r"--quiet\s+-q\s+Print nothing", quiet), quiet


def test_ctrl_c_messages_promise_only_what_is_done(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, reference_image_path: Path) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    monkeypatch.setattr(extract, "extract_pose", interrupted)
    result = runner.invoke(app, ["extract-pose", str(clip)])
    assert result.exit_code == 130
    assert result.stderr.strip() == (
        "interrupted (nothing was written and nothing is kept; run the same command again to extract from the start)"
    )
    monkeypatch.setattr(longvideo, "animate", interrupted)
    result = runner.invoke(app, ["animate", str(reference_image_path), str(clip), "-o", str(tmp_path / "o.mp4")])
    assert result.exit_code == 130
    assert result.stderr.strip() == "interrupted (finished segments are kept; run the same command again to continue from them)"


def test_doctor_reports_the_cpu_pose_backend(tmp_path: Path) -> None:
    report = json.loads(runner.invoke(app, ["doctor", "--json", "--models-dir", str(tmp_path)]).stdout)
    assert report["mediapipe"] == f"{importlib.metadata.version('mediapipe')} (CPU pose backend)"
    assert report["models_dir"].startswith(f"{tmp_path} (")
    missing = next(problem for problem in report["problems"] if problem.startswith("models not downloaded"))
    assert f"--models-dir {tmp_path}`" in missing


def test_the_tiny_models_hint_is_a_command_that_works(tmp_path: Path, reference_image_path: Path) -> None:
    """Copy-paste what ``make-tiny-models`` prints, with a photo and a video: it must run cleanly to a video."""
    driving_clip = make_driving_clip(reference_image_path, tmp_path / "driving.mp4", 8)
    printed = runner.invoke(testing_cli.app, ["make-tiny-models", str(tmp_path / "tiny")])
    assert printed.exit_code == 0, printed.output
    command = printed.stdout.splitlines()[-1].strip()
    args = shlex.split(command.replace("PHOTO", str(reference_image_path)).replace("VIDEO", str(driving_clip)))
    assert args[:2] == ["posegen", "animate"] and args[-2:] == ["-o", "tiny.mp4"]
    output = tmp_path / "tiny.mp4"
    result = runner.invoke(app, [*args[1:-1], str(output)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr  # 144x256 is 9:16: the 9:16 photo is not cropped
    assert "8 driving frames at 12 fps -> 1 segment of 81 frames at 144x256" in result.stderr and "1 segments" not in result.stderr
    info = probe_video(output)
    assert (info.width, info.height, info.frame_count) == (144, 256, probe_video(driving_clip).frame_count)
    assert len(list(iter_frames(output))) == info.frame_count
    alignment = tmp_path / "tiny_alignment.png"
    assert alignment.is_file() and f"alignment_png: {alignment}" in result.stderr


def test_extract_pose_does_not_ask_to_crop_what_animate_aligns(tmp_path: Path) -> None:
    """A landscape driving video is fine: its skeleton is redrawn on the reference's canvas, so no crop advice."""
    clip = write_video(tmp_path / "wide.mp4", [np.full((64, 112, 3), 30 * i, np.uint8) for i in range(4)], 12)
    rng = np.random.default_rng(1)
    track = KeypointTrack(rng.uniform(5, 60, (4, NUM_KEYPOINTS, 2)), np.ones((4, NUM_KEYPOINTS)), Fraction(12), 112, 64, "test")
    keypoints = save_npz(track, tmp_path / "kp.npz")
    result = runner.invoke(app, ["extract-pose", str(clip), "--from-keypoints", str(keypoints), "-o", str(tmp_path / "pose")])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr and "crop" not in result.stderr
    assert f"pose_video: {tmp_path / 'pose' / 'pose.mp4'}" in result.stderr

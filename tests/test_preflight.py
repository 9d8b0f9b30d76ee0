"""Checks before expensive work: a job that would fail fails in its first second, with the fix in one line."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from typer.testing import CliRunner

from posegen_cli import hub, preflight
from posegen_cli.cli import app
from posegen_cli.errors import InputError, MissingModelsError
from posegen_cli.pose import backends
from posegen_cli.pose import extract as extract_module
from posegen_cli.pose.settings import PoseOptions
from posegen_cli.video import write_video

runner = CliRunner()


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture()
def no_expensive_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pose extraction and model loading must not start: each would fail the test.

    ``animate`` may probe its videos first (a hand video must match its pose video before anything is fetched);
    ``extract-pose`` must not even probe.
    """

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("expensive work started before the job was checked")

    monkeypatch.setattr(extract_module, "probe_video", forbidden)
    monkeypatch.setattr("posegen_cli.longvideo.loading.load_pipeline", forbidden)
    monkeypatch.setattr(extract_module, "extract_pose", forbidden)
    monkeypatch.setattr(backends, "extract_reference_pose", forbidden)
    monkeypatch.setattr(extract_module, "render_outputs", forbidden)


@pytest.fixture()
def clip(tmp_path: Path) -> Path:
    return write_video(tmp_path / "clip.mp4", [np.full((112, 64, 3), 9 * i, np.uint8) for i in range(4)], 12)


def test_an_image_is_not_a_driving_video(tmp_path: Path, reference_image_path: Path, no_expensive_work: None) -> None:
    out = tmp_path / "out.mp4"
    for args in (["animate", str(reference_image_path), str(reference_image_path), "-o", str(out)], ["extract-pose", str(reference_image_path)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert _one_error_line(result) == (
            f"error: driving video {reference_image_path} is a still PNG image, not a video (pass a video file such as an .mp4)"
        )
    assert not out.exists()


def test_empty_files_are_called_empty(tmp_path: Path, clip: Path, no_expensive_work: None) -> None:
    empty = tmp_path / "empty.png"
    empty.touch()
    cases = {
        ("animate", str(empty), str(clip), "-o", str(tmp_path / "o.mp4")): f"reference image {empty} is empty",
        ("extract-pose", str(empty)): f"driving video {empty} is empty",
        ("extract-pose", str(clip), "--align-to", str(empty)): f"reference image to align to {empty} is empty",
        ("prompt", str(empty)): f"reference image {empty} is empty",
    }
    for args, start in cases.items():
        result = runner.invoke(app, list(args))
        assert result.exit_code == 2
        assert _one_error_line(result) == f"error: {start}: the file has 0 bytes (copy or export it again)"


def test_an_unwritable_output_folder_is_found_first(tmp_path: Path, reference_image_path: Path, clip: Path, no_expensive_work: None) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder should be")
    result = runner.invoke(app, ["animate", str(reference_image_path), str(clip), "-o", str(blocker / "out.mp4")])
    assert result.exit_code == 2
    assert _one_error_line(result) == (
        f"error: cannot write the output folder {blocker}: {blocker} is a file, not a folder (choose another folder)"
    )
    result = runner.invoke(app, ["extract-pose", str(clip), "-o", str(blocker / "pose")])
    assert result.exit_code == 2 and f"cannot write the pose output folder {blocker / 'pose'}" in _one_error_line(result)


def test_a_read_only_folder_is_reported_with_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The permission check itself (the tests run as root, whom no mode bit stops): ``os.access`` says no."""
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(InputError) as info:
        preflight.check_writable_folder(locked / "new" / "deeper", "output folder")
    assert str(info.value) == (
        f"cannot write the output folder {locked / 'new' / 'deeper'}: {locked} is not writable (choose another folder, or fix its permissions)"
    )
    assert preflight.check_writable_folder(tmp_path / "fine", "output folder") == tmp_path / "fine"


def test_an_unreadable_align_to_image_fails_before_extraction(tmp_path: Path, clip: Path, reference_image_path: Path, monkeypatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pose extraction started before the reference was read")

    monkeypatch.setattr(extract_module, "render_outputs", forbidden)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(reference_image_path.read_bytes()[:2000])  # a PNG signature, then nothing decodable
    with pytest.raises(InputError, match=re.escape(f"cannot read image {truncated}: not a PNG/JPEG/WebP/BMP/TIFF image")):
        extract_module.extract_pose(clip, tmp_path / "pose", PoseOptions(backend="mediapipe"), align_to=truncated)
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    result = runner.invoke(app, ["extract-pose", str(clip), "--align-to", str(notes), "--backend", "mediapipe"])
    assert result.exit_code == 2
    assert _one_error_line(result) == f"error: cannot read reference image to align to {notes}: not a PNG/JPEG/WebP/BMP/TIFF image (convert it to PNG)"


def test_every_missing_model_in_one_error_with_one_command_that_fetches_them(
    tmp_path: Path, reference_image_path: Path, clip: Path, no_expensive_work: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    args = ["animate", str(reference_image_path), str(clip), "-o", str(tmp_path / "o.mp4"), "--models-dir", str(models),
            "--device", "cpu", "--pose-backend", "sapiens"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 3
    line = _one_error_line(result)
    wanted = ["sapiens-detector", "sapiens-pose-2b", "sapiens-seg-1b", "sapiens-normal-2b", "qwen2.5-vl-7b", "wan-i2v-720p", "posegen"]
    assert line.startswith(f"error: 7 model(s) this job needs are not in {models}: {', '.join(wanted)} (fetch them all with `")
    command = re.search(r"`([^`]+)`", line).group(1)
    assert command == f"posegen download {' '.join(wanted)} --models-dir {models}"

    # the command works as printed: it fetches exactly those, into the folder animate reads
    fetched: list[tuple[str, Path | None]] = []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "fetch", lambda spec, local_dir=None: fetched.append((spec.name, local_dir)) or local_dir)
    result = runner.invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    assert fetched == [(name, models / name) for name in wanted]

    # with --prompt the captioner is not needed, so it is not asked for
    with pytest.raises(MissingModelsError) as info:
        preflight.ensure_models(preflight.animate_models("mediapipe", "none", captioned=False), models, print)
    assert info.value.names == ["wan-i2v-720p", "posegen"] and info.value.models_dir == models


@pytest.mark.parametrize("flags", [["--speed", "turbo"], ["--distill", "lightx2v"]])
def test_a_distilled_job_names_the_distillation_lora_among_the_missing_models(
    tmp_path: Path, reference_image_path: Path, clip: Path, no_expensive_work: None, flags: list[str]
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    args = ["animate", str(reference_image_path), str(clip), "-o", str(tmp_path / "o.mp4"), "--models-dir", str(models),
            "--device", "cpu", "--pose-backend", "mediapipe", "--prompt", "a woman dancing", *flags]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    wanted = ["wan-i2v-720p", "posegen", "lightx2v-wan21-i2v-distill"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # turbo's CPU fallbacks warn first
    assert len(errors) == 1 and errors[0].startswith(f"error: 3 model(s) this job needs are not in {models}: {', '.join(wanted)} ")
    assert f"`posegen download {' '.join(wanted)} --models-dir {models}`" in result.stderr
    plain = runner.invoke(app, args[: -len(flags)])
    assert plain.exit_code == 3 and "lightx2v" not in plain.stderr, "a job without the distillation does not ask for its LoRA"

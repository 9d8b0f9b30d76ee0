"""The command line: help for every command, version, and the one-line error contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from posegen_cli import __version__
from posegen_cli.cli import app

COMMANDS = ["animate", "extract-pose", "prompt", "download", "convert-checkpoint", "doctor"]
runner = CliRunner()


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"posegen {__version__}"


def test_top_level_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout and "--help" in result.stdout


def test_animate_help_describes_the_real_options() -> None:
    result = runner.invoke(app, ["animate", "--help"], env={"COLUMNS": "200"})
    for option in ["--prompt", "--subject", "--seed", "--steps", "--guidance", "--resolution", "--offload", "--preview",
                   "--models-dir", "--device", "--dtype", "--pose-backend", "--no-audio", "--keep-intermediates", "--json", "--quiet"]:
        assert option in result.stdout, option


def test_download_offline_is_one_clear_line() -> None:
    result = runner.invoke(app, ["download", "--quiet", "posegen"])
    assert result.exit_code == 3
    lines = _error_lines(result)
    assert len(lines) == 1 and "Jessie459/PoseGen" in lines[0] and "HF_HUB_OFFLINE" in lines[0] and "posegen download posegen" in lines[0]


def test_download_unknown_name() -> None:
    result = runner.invoke(app, ["download", "no-such-model"])
    assert result.exit_code == 2 and "unknown model 'no-such-model'" in result.stderr


def test_doctor_json_reports_missing_models(tmp_path: Path) -> None:
    result = runner.invoke(app, ["doctor", "--json", "--models-dir", str(tmp_path)])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["models"]["posegen"] == "missing"
    assert any("posegen download" in problem for problem in report["problems"])


def test_doctor_sees_models_in_models_dir(tmp_path: Path) -> None:
    (tmp_path / "posegen" / "720p-81f-base").mkdir(parents=True)
    (tmp_path / "posegen" / "720p-81f-base" / "model_config.json").write_text("{}")
    (tmp_path / "sapiens-detector").mkdir()
    (tmp_path / "sapiens-detector" / "rtmdet_m_8xb32-100e_coco-obj365-person-235e8209.pth").write_bytes(b"x")
    report = json.loads(runner.invoke(app, ["doctor", "--json", "--models-dir", str(tmp_path)]).stdout)
    # the cond folder is missing: a half-finished download is not "present"
    assert report["models"]["posegen"] == "missing" and report["models"]["sapiens-detector"] == "present"
    (tmp_path / "posegen" / "720p-81f-cond").mkdir()
    (tmp_path / "posegen" / "720p-81f-cond" / "model_config.json").write_text("{}")
    report = json.loads(runner.invoke(app, ["doctor", "--json", "--models-dir", str(tmp_path)]).stdout)
    assert report["models"]["posegen"] == "present" and report["models"]["wan-i2v-720p"] == "missing"


def test_a_stage_needs_only_its_parts(tmp_path: Path) -> None:
    from posegen_cli import hub
    from posegen_cli.errors import MissingModelError

    tokenizer = tmp_path / "wan-i2v-720p" / "tokenizer"
    tokenizer.mkdir(parents=True)
    (tokenizer / "tokenizer.json").write_text("{}")
    assert hub.model_path("wan-i2v-720p", tmp_path, parts=("tokenizer/*",)) == tmp_path / "wan-i2v-720p"
    with pytest.raises(MissingModelError, match="wan-i2v-720p not found"):
        hub.model_path("wan-i2v-720p", tmp_path)
    with pytest.raises(ValueError, match="has no part 'transformer/\\*'"):
        hub.model_path("wan-i2v-720p", tmp_path, parts=("transformer/*",))


def test_download_fetches_what_a_partial_cache_lacks(monkeypatch) -> None:
    from posegen_cli import hub

    import huggingface_hub.constants

    fetched = []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "fetch", lambda spec: fetched.append(spec.name) or Path("/cache") / spec.name)
    result = runner.invoke(app, ["download", "--json", "posegen", "sapiens-detector"])
    assert result.exit_code == 0, result.output
    assert fetched == ["posegen", "sapiens-detector"]  # always asked: snapshot_download skips what is complete
    assert json.loads(result.stdout) == {"posegen": "/cache/posegen", "sapiens-detector": "/cache/sapiens-detector"}


@pytest.mark.parametrize(
    "args",
    [
        ["extract-pose", "{tmp}/missing.mp4"],
        ["extract-pose", "{tmp}/notes.mp4"],
        ["animate", "{tmp}/missing.png", "{tmp}/notes.mp4", "-o", "{tmp}/out.mp4"],
        ["animate", "{tmp}/broken.png", "{tmp}/notes.mp4", "-o", "{tmp}/out.mp4"],
        ["prompt", "{tmp}/broken.png"],
    ],
)
def test_bad_inputs_exit_2_with_one_line(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "notes.mp4").write_text("not a video")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert str(tmp_path) in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.mp4").exists()


def test_prompt_command_defaults_match_animate() -> None:
    """`posegen prompt` and `animate` must caption with the same settings, or animate would not reuse the cache."""
    import inspect

    from posegen_cli.cli import prompt
    from posegen_cli.prompting.run import DEFAULT_MAX_NEW_TOKENS

    assert inspect.signature(prompt).parameters["max_new_tokens"].default == DEFAULT_MAX_NEW_TOKENS

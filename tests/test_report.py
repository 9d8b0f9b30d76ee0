"""Human output: markup-safe messages, progress lines in logs, JSON summaries."""

from __future__ import annotations

import io
import json
import time

import pytest
from rich.console import Console

from posegen_cli.report import Reporter


def _reporter(**kwargs) -> tuple[Reporter, io.StringIO]:
    buffer = io.StringIO()
    return Reporter(console=Console(file=buffer, force_terminal=False, width=200), **kwargs), buffer


def test_messages_are_printed_literally() -> None:
    reporter, buffer = _reporter()
    reporter.info("clip [final].mp4 ready")
    reporter.warn("odd [bold]name[/bold]")
    assert buffer.getvalue().splitlines() == ["clip [final].mp4 ready", "warning: odd [bold]name[/bold]"]


def test_progress_logs_lines_when_stderr_is_not_a_terminal() -> None:
    reporter, buffer = _reporter(log_interval=0.05)
    with reporter.progress() as progress:
        task = progress.add_task("segment 0 (anchor)", total=4, unit="steps")
        progress.advance(task)
        time.sleep(0.3)
    lines = [line for line in buffer.getvalue().splitlines() if line.startswith("segment 0 (anchor): 1/4 (25%")]
    assert lines, buffer.getvalue()


def test_quiet_progress_prints_nothing() -> None:
    reporter, buffer = _reporter(quiet=True, log_interval=0.05)
    with reporter.progress() as progress:
        progress.add_task("x", total=2)
        time.sleep(0.2)
    reporter.info("hidden")
    assert buffer.getvalue() == ""


def test_json_summary_goes_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    reporter, buffer = _reporter(json_output=True)
    reporter.summary({"output": "out.mp4", "frames": 3}, title="Done")
    assert json.loads(capsys.readouterr().out) == {"output": "out.mp4", "frames": 3}
    assert buffer.getvalue() == ""

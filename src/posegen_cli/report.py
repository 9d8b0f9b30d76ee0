"""How a command talks to people and scripts: rich on stderr, one JSON summary on stdout."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from posegen_cli.errors import command_line_spelling, phrase

LOG_INTERVAL = 30.0
"""Seconds between progress lines when stderr is a log file rather than a terminal."""


class RateColumn(ProgressColumn):
    """Items per second, with the unit a task names in its ``unit`` field (frames, steps, ...)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        if speed is None:
            return Text(f"? {unit}/s", style="progress.data.speed")
        return Text(f"{speed:.2f} {unit}/s" if speed < 100 else f"{speed:.0f} {unit}/s", style="progress.data.speed")


@dataclass
class Reporter:
    """Human output goes to stderr (silenced by ``quiet``); ``summary`` is printed as JSON when ``json_output``.

    Messages may name settings with ``errors.option``; ``spell`` words them (the CLI passes its flag names).
    """

    quiet: bool = False
    json_output: bool = False
    console: Console = field(default_factory=lambda: Console(stderr=True))
    log_interval: float = LOG_INTERVAL
    spell: Callable[[str], str] = command_line_spelling

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(escape(phrase(message, self.spell)))

    def warn(self, message: str) -> None:
        """Warnings show even when quiet: they change what the user gets."""
        self.console.print(f"[yellow]warning:[/yellow] {escape(phrase(message, self.spell))}")

    @contextlib.contextmanager
    def progress(self) -> Iterator[Progress]:
        """A rich Progress (disabled when quiet); ``progress.add_task(desc, total=n, unit="frames")``."""
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, disable=self.quiet, transient=False) as progress:
            if self.quiet or self.console.is_terminal:
                yield progress
                return
            # rich redraws nothing until the end when stderr is a file: log a line per open task instead.
            stop = threading.Event()
            logger = threading.Thread(target=self._log_progress, args=(progress, stop), daemon=True)
            logger.start()
            try:
                yield progress
            finally:
                stop.set()
                logger.join()

    def _log_progress(self, progress: Progress, stop: threading.Event) -> None:
        while not stop.wait(self.log_interval):
            for task in progress.tasks:
                if task.finished or not task.total:
                    continue
                eta = f", {task.time_remaining:.0f} s left" if task.time_remaining is not None else ""
                self.console.print(
                    f"{escape(task.description)}: {task.completed:g}/{task.total:g} ({task.percentage:.0f}%{eta})", highlight=False
                )

    def summary(self, data: dict[str, Any], title: str | None = None) -> None:
        """The command's result: JSON on stdout for scripts, else a short key/value list for people."""
        if self.json_output:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
            sys.stdout.flush()
            return
        if self.quiet:
            return
        if title:
            self.console.print(f"[bold]{title}[/bold]")
        self._print_items(data, indent=1)

    def _print_items(self, data: dict[str, Any], indent: int) -> None:
        pad = "  " * indent
        for key, value in data.items():
            if isinstance(value, dict) and value:
                self.console.print(f"{pad}{key}:", highlight=False)
                self._print_items(value, indent + 1)
            elif isinstance(value, list) and value:
                self.console.print(f"{pad}{key}:", highlight=False)
                for item in value:
                    self.console.print(f"{pad}  - {item}", highlight=False)
            else:
                self.console.print(f"{pad}{key}: {value}", highlight=False)

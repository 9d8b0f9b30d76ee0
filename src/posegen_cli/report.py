"""How a command talks to people and scripts: rich on stderr, one JSON summary on stdout."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
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
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from posegen_cli.errors import command_line_spelling, phrase

LOG_INTERVAL = 30.0
"""Seconds between progress lines when stderr is a log file rather than a terminal."""


def plural(count: int, noun: str) -> str:
    """``1 segment``, ``5 segments``: a count with its noun in the right number (nouns here take a plain -s)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class RateColumn(ProgressColumn):
    """Items per second, with the unit a task names in its ``unit`` field (frames, steps, ...); blank with ``unit=""``."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        if not unit:
            return Text("")
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"? {unit}/s", style="progress.data.speed")
        return Text(f"{speed:.2f} {unit}/s" if speed < 100 else f"{speed:.0f} {unit}/s", style="progress.data.speed")


def duration_text(seconds: float) -> str:
    """``45 s``, ``12 min 5 s``, ``2 h 3 min``: a duration as people read it."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def set_eta(progress: Progress, task: TaskID, seconds: float | None, lower_bound: bool = False) -> None:
    """Give ``task`` its own estimate of the time left (it then counts down on its own until the next estimate).

    ``lower_bound`` marks an estimate that leaves out work not yet timed (shown as ``≥``).
    """
    progress.update(task, eta=seconds, eta_at=time.monotonic(), eta_lower_bound=lower_bound)


def eta_text(task: Task) -> str:
    """The time left of ``task``: its own estimate (``set_eta``) when it has one, else rich's rate-based one."""
    if task.finished:
        return "done"
    if "eta" in task.fields:
        seconds = task.fields["eta"]
        if seconds is None:
            return "time left: ?"
        left = max(0.0, seconds - (time.monotonic() - task.fields["eta_at"]))
        return f"{'≥ ' if task.fields.get('eta_lower_bound') else ''}{duration_text(left)} left"
    if task.time_remaining is None:
        return "time left: ?"
    return f"{duration_text(task.time_remaining)} left"


class EtaColumn(ProgressColumn):
    """:func:`eta_text` as a column."""

    max_refresh = 0.5

    def render(self, task: Task) -> Text:
        return Text(eta_text(task), style="progress.remaining")


def progress_line(task: Task) -> str:
    """One plain line for a log: description, count, percentage, elapsed and time left."""
    done = f"{task.completed:g}/{task.total:g} ({task.percentage:.0f}%"
    elapsed = f", {duration_text(task.elapsed or 0.0)} elapsed"
    return f"{task.description}: {done}{elapsed}, {eta_text(task)})"


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
        """One message line; never wrapped, so a log keeps it whole (a terminal folds it at its edge)."""
        if not self.quiet:
            self.console.print(escape(phrase(message, self.spell)), soft_wrap=True)

    def warn(self, message: str) -> None:
        """Warnings show even when quiet: they change what the user gets."""
        self.console.print(f"[yellow]warning:[/yellow] {escape(phrase(message, self.spell))}", soft_wrap=True)

    @contextlib.contextmanager
    def progress(self) -> Iterator[Progress]:
        """A rich Progress (disabled when quiet); ``progress.add_task(desc, total=n, unit="frames")``.

        On a terminal it is rich's live display. Anywhere else (a log file, a pipe) nothing is redrawn: every
        ``log_interval`` seconds each unfinished task is printed once, as one full line that never wraps, and at
        the end each task's last line, unless it was already printed as it is.
        """
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            EtaColumn(),
        )
        live = not self.quiet and self.console.is_terminal
        with Progress(*columns, console=self.console, disable=not live, transient=False) as progress:
            if self.quiet or live:
                yield progress
                return
            stop = threading.Event()
            printed: dict[TaskID, str] = {}
            logger = threading.Thread(target=self._log_progress, args=(progress, stop, printed), daemon=True)
            logger.start()
            try:
                yield progress
            finally:
                stop.set()
                logger.join()
                self._log_lines(progress, printed, final=True)

    def _log_progress(self, progress: Progress, stop: threading.Event, printed: dict[TaskID, str]) -> None:
        while not stop.wait(self.log_interval):
            self._log_lines(progress, printed, final=False)

    def _log_lines(self, progress: Progress, printed: dict[TaskID, str], final: bool) -> None:
        for task in progress.tasks:
            if not task.total or (task.finished and not final):
                continue
            line = progress_line(task)
            if printed.get(task.id) != line:
                printed[task.id] = line
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def summary(self, data: dict[str, Any], title: str | None = None) -> None:
        """The command's result: JSON on stdout for scripts, else a short key/value list for people.

        Strings may name settings with ``errors.option``; they are spelled with ``spell`` in both forms.
        """
        if self.json_output:
            sys.stdout.write(phrase(json.dumps(data, indent=2, default=str), self.spell) + "\n")
            sys.stdout.flush()
            return
        if self.quiet:
            return
        if title:
            self.console.print(f"[bold]{title}[/bold]", soft_wrap=True)
        self._print_items(data, indent=1)

    def _print_items(self, data: dict[str, Any], indent: int) -> None:
        pad = "  " * indent
        for key, value in data.items():
            if isinstance(value, dict) and value:
                self._print_line(f"{pad}{key}:")
                self._print_items(value, indent + 1)
            elif isinstance(value, list) and value:
                self._print_line(f"{pad}{key}:")
                for item in value:
                    self._print_line(f"{pad}  - {item}")
            else:
                self._print_line(f"{pad}{key}: {value}")

    def _print_line(self, line: str) -> None:
        self.console.print(phrase(line, self.spell), markup=False, highlight=False, soft_wrap=True)

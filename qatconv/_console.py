"""Consoles: JSON results to stdout, everything human (tables, progress, notes, errors) to stderr.

Human output is plain when stderr is not a TTY and silent under ``--quiet``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from qatconv.errors import first_line

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


class _Stdout:
    """Where results go while `stdout_to_stderr` sends everything else to stderr."""

    stream: TextIO | None = None
    result_written = False


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Run a command body with ``sys.stdout`` pointing at stderr; `Output.result` keeps stdout.

    Model code and the libraries it imports print (version notices, debug prints); under
    ``--json`` stdout must hold the one JSON object and nothing else.
    """
    saved = _Stdout.stream
    _Stdout.stream = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _Stdout.stream = saved


def result_written(*, reset: bool = False) -> bool:
    """Whether the running command has printed its JSON result already (``reset``: forget it)."""
    written = _Stdout.result_written
    if reset:
        _Stdout.result_written = False
    return written


class Output:
    """What one command prints: a JSON object on stdout, or human text on stderr."""

    def __init__(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self._err: Console | None = None
        self.is_tty = sys.stderr.isatty()

    @property
    def err(self) -> Console:
        """The stderr console, made on first use: `--json` runs never import rich."""
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, highlight=False, soft_wrap=True)
        return self._err

    @property
    def human(self) -> bool:
        return not self.quiet and not self.json_mode

    def note(self, text: str) -> None:
        """An informational line (what qatconv did), shown unless quiet."""
        if not self.quiet:
            self.err.print(text, markup=False)

    def warn(self, text: str) -> None:
        """A warning line; shown even with --json, hidden only by --quiet."""
        if not self.quiet:
            self.err.print(f"warning: {text}", markup=False, style="yellow")

    def table(self, table: Table) -> None:
        if self.human:
            self.err.print(table)

    def result(self, obj: dict[str, Any]) -> None:
        """The command's JSON result (stdout, only with --json)."""
        if self.json_mode:
            stream = _Stdout.stream or sys.stdout
            stream.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
            stream.flush()
            _Stdout.result_written = True

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """Yield ``advance(completed, **fields)``; a bar on a TTY, a few plain lines otherwise."""
        if self.quiet or self.json_mode and not self.is_tty:
            yield lambda *a, **k: None
            return
        if self.is_tty:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.err,
                transient=False,
            ) as bar:
                task = bar.add_task(description, total=total, info="")

                def advance(completed: int, info: str = "") -> None:
                    bar.update(task, completed=completed, info=info)

                yield advance
            return
        last = [0.0]

        def advance_plain(completed: int, info: str = "") -> None:
            now = time.monotonic()
            if completed == total or now - last[0] >= 2.0:
                last[0] = now
                self.err.print(f"{description}: {completed}/{total} {info}", markup=False)

        yield advance_plain


def error_line(message: str, hint: str | None) -> str:
    first = first_line(message, "unknown error")
    return f"error: {first}" + (f"\nhint: {first_line(hint)}" if hint else "")


def error_json(message: str, hint: str | None, exit_code: int) -> str:
    """The one JSON object `--json` prints on stdout when a command fails."""
    first = first_line(message, "unknown error")
    hint_line = first_line(hint) if hint and hint.strip() else None
    return json.dumps({"error": first, "hint": hint_line, "exit_code": exit_code}) + "\n"

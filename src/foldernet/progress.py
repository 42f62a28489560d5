"""Progress bars and console output on stderr, so stdout stays clean for results and pipes."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False, soft_wrap=True)  # a message is one line, never wrapped
stdout = Console(highlight=False, markup=False, soft_wrap=True)


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def update(self, **kw) -> None:
        if self.progress is not None:
            self.progress.update(self.task, **kw)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True):
    """A rich progress bar on stderr; silent when disabled or when stderr is not a terminal and
    the job is short."""
    if not enabled or (total < 64 and not sys.stderr.isatty()):
        yield _Bar(None, None)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(desc, total=total, info="")
        yield _Bar(progress, task)

"""Progress bars for the long stages outside a Lightning Trainer: ``edit.py``'s capture, refinement, scoring,
general check and save, the sequential runner's turns, and the benchmarks.

Library code marks its loops with :func:`track` (or :func:`task` where one bar spans several loops) and runs
unchanged, without output, unless a caller shows progress with :func:`shown`. The bars are rich's, on stderr, the
style Lightning's own rich progress bar uses; :func:`shown` shows nothing when ``CI`` is set to a true value or
stderr is not a terminal, unless asked to.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
_shown: ContextVar[Progress | None] = ContextVar("horse_pl_progress", default=None)
_depth: ContextVar[int] = ContextVar("horse_pl_progress_depth", default=0)  # bars open around the current one


def wanted() -> bool:
    """Whether bars help here: stderr is a terminal and ``CI`` is not set to a true value."""
    return sys.stderr.isatty() and os.environ.get("CI", "").strip().lower() not in ("1", "true", "yes")


@contextmanager
def shown(enabled: bool | None = None, console: Console | None = None) -> Iterator[None]:
    """Show the bars of every stage run inside (``enabled``: default :func:`wanted`; ``console``: default stderr).
    Nested, the outer one keeps showing."""
    if _shown.get() is not None or not (wanted() if enabled is None else enabled):
        yield
        return
    progress = Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("•"), TimeRemainingColumn(), console=console or Console(stderr=True))
    token = _shown.set(progress)
    try:
        with progress:
            yield
    finally:
        _shown.reset(token)


@contextmanager
def task(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """One bar of ``total`` units (``None``: no known total); yields ``advance(units=1)``. Without :func:`shown`,
    ``advance`` does nothing. A bar opened inside another (a turn's capture inside the turns' bar) goes away when
    its stage ends; an outermost bar stays, complete, so the stages' bars read as a log of the run."""
    progress = _shown.get()
    if progress is None:
        yield lambda units=1: None
        return
    depth = _depth.get()
    bar = progress.add_task(description, total=total)
    token = _depth.set(depth + 1)
    try:
        yield lambda units=1: progress.advance(bar, units)
    finally:
        _depth.reset(token)
    if depth:
        progress.remove_task(bar)
    elif total is None:  # a finished stage shows as complete; one left by an error stays where it stopped
        progress.update(bar, total=1, completed=1)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """``items`` one by one, advancing a bar per item (``total``: default ``len(items)`` when it has one)."""
    if _shown.get() is None:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with task(description, total) as advance:
        for item in items:
            yield item
            advance()

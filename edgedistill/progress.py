"""Progress bars for long work (rich). Silenced by EDGEDISTILL_QUIET=1, as the tests do."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
console = Console(stderr=True)


def enabled() -> bool:
    # under accelerate launch / torchrun only the first process draws bars
    return os.environ.get("EDGEDISTILL_QUIET", "") not in ("1", "true") and os.environ.get("RANK", "0") == "0"


def new_progress() -> Progress:
    """Return a rich Progress with count, elapsed time, ETA and a free-text status field."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not enabled(),
    )


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Yield from `items` while showing a progress bar of `total` steps."""
    with new_progress() as progress:
        task = progress.add_task(description, total=total, status="")
        for item in items:
            yield item
            progress.advance(task)

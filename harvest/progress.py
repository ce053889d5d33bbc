"""The one progress bar of every long loop (rich): a label, a bar, done/total, live fields, a rate, times.

    with progress_bar("train", total=steps, unit="steps", rate_unit="tok/s", fields={"loss": ".4f"}) as bar:
        bar.advance(1, rate_amount=batch_tokens, loss=0.12)

The rate counts from the first `advance` of this session (resumed work and one-off start-up costs are
not part of it), in `rate_unit` per second.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class Bar:
    """A handle on one task of a rich Progress."""

    def __init__(self, progress: Progress, task: Any):
        self._progress, self._task = progress, task
        self._t0: float | None = None
        self._amount = 0.0

    @property
    def completed(self) -> float:
        return self._progress.tasks[0].completed

    @property
    def rate(self) -> float:
        """rate_amount per second since the first advance (0 before the second)."""
        if self._t0 is None:
            return 0.0
        return self._amount / max(time.perf_counter() - self._t0, 1e-9)

    def advance(self, n: float = 1, rate_amount: float | None = None, **fields: Any) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()  # the first unit's cost is start-up, not the rate
        else:
            self._amount += n if rate_amount is None else rate_amount
        self._progress.update(self._task, advance=n, rate=self.rate, **fields)

    def update(self, completed: float | None = None, total: float | None = None, **fields: Any) -> None:
        self._progress.update(self._task, completed=completed, total=total, **fields)


@contextmanager
def progress_bar(
    label: str,
    total: float | None,
    unit: str = "",
    *,
    enabled: bool = True,
    completed: float = 0,
    fields: Mapping[str, str] | None = None,
    rate_unit: str | None = None,
    bytes_: bool = False,
    transient: bool = False,
    console: Console | None = None,
) -> Iterator[Bar]:
    """A progress bar; `fields` maps live field names to their format spec (e.g. {"loss": ".4f"})."""
    fields = dict(fields or {})
    columns: list[Any] = [TextColumn(label), BarColumn()]
    if bytes_:
        columns += [DownloadColumn(), TransferSpeedColumn()]
    else:
        columns += [MofNCompleteColumn()] + ([TextColumn(unit)] if unit else [])
    columns += [TextColumn(f"{name} {{task.fields[{name}]:{spec}}}") for name, spec in fields.items()]
    if rate_unit:
        columns.append(TextColumn(f"{{task.fields[rate]:>8,.0f}} {rate_unit}"))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    initial = {name: float("nan") if spec.endswith(("f", "e", "g", "%")) else "" for name, spec in fields.items()}
    kwargs = {"console": console} if console is not None else {}
    with Progress(*columns, disable=not enabled, transient=transient, **kwargs) as progress:
        task = progress.add_task("", total=total, completed=completed, rate=0.0, **initial)
        yield Bar(progress, task)

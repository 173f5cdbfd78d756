"""Progress bars: one rich-based bar for every long job (training, sharding, inference, evaluation).

A bar is drawn on stderr only when stderr is a terminal and the bar is enabled (rank 0): logs, CI and
pipes stay clean. ``bar.live`` says whether it is drawn, so that a caller can log a line instead of
updating the bar's info text (the trainer logs its step records that way).
"""

from __future__ import annotations

from types import TracebackType


class ProgressBar:
    """``with ProgressBar("sharding train", total=n) as bar: ... bar.advance()``.

    ``total`` None draws a bar without an end (a count and the elapsed time). ``completed`` starts the
    count part way (a resumed run). ``info=True`` adds a text column on the right that
    :meth:`update` fills (it wraps in narrow terminals instead of being cut off). ``transient``
    removes the bar when it closes.
    """

    def __init__(
        self,
        description: str,
        total: int | None,
        *,
        completed: int = 0,
        enabled: bool = True,
        info: bool = False,
        transient: bool = False,
    ):
        self._progress = None
        self._task = None
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.table import Column

        columns = [TextColumn("{task.description}"), BarColumn(bar_width=20 if info else None), MofNCompleteColumn()]
        columns += [TimeElapsedColumn(), TimeRemainingColumn()]
        if info:
            columns.append(
                TextColumn("{task.fields[info]}", table_column=Column(no_wrap=False, overflow="fold", ratio=1))
            )
        self._progress = Progress(*columns, console=console, transient=transient, expand=info)
        self._task = self._progress.add_task(description, total=total, completed=completed, info="")
        self._progress.start()

    @property
    def live(self) -> bool:
        """True when the bar is drawn (enabled, and stderr is a terminal)."""
        return self._progress is not None

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, completed: int | None = None, *, info: str | None = None, description: str | None = None) -> None:
        if self._progress is None:
            return
        fields = {}
        if completed is not None:
            fields["completed"] = completed
        if info is not None:
            fields["info"] = info
        if description is not None:
            fields["description"] = description
        self._progress.update(self._task, **fields)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

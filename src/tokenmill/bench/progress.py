"""Rich progress bar for a run, on stderr so stdout stays clean for the run id."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RunProgress:
    """Counts finished requests against --num-prompts (or shows elapsed time for --duration)."""

    def __init__(self, num_prompts: int | None, duration_s: float | None, enabled: bool = True) -> None:
        self._enabled = enabled
        self._num_ok = self._num_bad = 0
        self._duration_s = duration_s
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task("requests", total=num_prompts, status="")

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def sent(self, elapsed_s: float) -> None:
        """A request went out at elapsed_s (drives the bar's label in --duration runs)."""
        if self._duration_s and self._enabled:
            self._progress.update(self._task, description=f"{elapsed_s:5.0f}/{self._duration_s:g} s")

    def advance(self, status: str) -> None:
        """A request finished with this status."""
        if status == "ok":
            self._num_ok += 1
        else:
            self._num_bad += 1
        bad = f" [red]{self._num_bad} failed" if self._num_bad else ""
        self._progress.update(self._task, advance=1, status=f"[green]{self._num_ok} ok{bad}")

"""Sweep progress: a live display on a terminal, one log line per finished run otherwise.

Both show runs done out of the total, how many are running and failed, and an ETA. The
running count is ``min(slots, runs left)``: executors report finished runs, not starts.
"""

from __future__ import annotations

import datetime as dt
import time
from contextlib import AbstractContextManager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ntklens.schema import RunResult, RunSpec


def describe_run(spec: RunSpec) -> str:
    """The swept coordinates of a run, e.g. ``width=64 n_train=1000 seed=0 standard``."""
    return (
        f"width={spec.width} n_train={spec.n_train} seed={spec.seed} "
        f"{spec.parameterization} lr={spec.lr:.3g}"
    )


class SweepProgress(AbstractContextManager["SweepProgress"]):
    """Counts finished runs; subclasses decide how to show them."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.total = 0
        self.done = 0
        self.failed = 0
        self.slots = 1
        self._started = 0.0

    def begin(self, total: int, *, skipped: int, slots: int) -> None:
        """``total`` runs are to be executed (``skipped`` more are already stored)."""
        self.total, self.slots = total, slots
        self._started = time.perf_counter()

    def finished(self, result: RunResult) -> None:
        """One run is stored."""
        self.done += 1
        self.failed += result.status == "failed"

    def end(self) -> None:
        """The sweep is over (or interrupted)."""

    @property
    def running(self) -> int:
        return min(self.slots, self.total - self.done)

    def eta_s(self) -> float | None:
        """Seconds left at the mean pace so far; None before the first run finishes."""
        if self.done == 0:
            return None
        return (time.perf_counter() - self._started) / self.done * (self.total - self.done)

    def __exit__(self, *_: object) -> None:
        self.end()


class LogProgress(SweepProgress):
    """One plain line per finished run: for --quiet, logs and non-terminal output."""

    def begin(self, total: int, *, skipped: int, slots: int) -> None:
        super().begin(total, skipped=skipped, slots=slots)
        self.console.print(
            f"sweep: {total} runs to do, {skipped} already stored, {slots} at a time",
            markup=False,
            highlight=False,
        )

    def finished(self, result: RunResult) -> None:
        super().finished(result)
        eta = self.eta_s()
        eta_text = "-" if eta is None else str(dt.timedelta(seconds=round(eta)))
        outcome = "ok" if result.status == "ok" else f"FAILED ({result.error})"
        self.console.print(
            f"[{self.done}/{self.total}] {result.run_id} {describe_run(result.spec)} "
            f"{result.wall_time_s:.1f}s {outcome} | running {self.running} "
            f"failed {self.failed} eta {eta_text}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


class LiveProgress(SweepProgress):
    """A rich progress bar: done/total, running, failed, elapsed and ETA."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__(console)
        self._bar = Progress(
            TextColumn("sweep"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[running]} running, {task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._task: TaskID | None = None

    def begin(self, total: int, *, skipped: int, slots: int) -> None:
        super().begin(total, skipped=skipped, slots=slots)
        if skipped:
            self.console.print(f"skipping {skipped} runs already in the store", highlight=False)
        self._task = self._bar.add_task("sweep", total=total, running=self.running, failed=0)
        self._bar.start()

    def finished(self, result: RunResult) -> None:
        super().finished(result)
        if result.status == "failed":
            self.console.print(
                f"failed {result.run_id} {describe_run(result.spec)}: {result.error}",
                markup=False,
                highlight=False,
            )
        assert self._task is not None
        self._bar.update(self._task, advance=1, running=self.running, failed=self.failed)

    def end(self) -> None:
        self._bar.stop()


def make_progress(*, quiet: bool = False, console: Console | None = None) -> SweepProgress:
    """Live display on a terminal; log lines when ``quiet`` or when output is not a terminal."""
    console = console or Console(stderr=True)
    if quiet or not console.is_terminal:
        return LogProgress(console)
    return LiveProgress(console)

"""The sweep driver: plan, skip what the store already has, execute, store each result.

Only the driver writes the store, one finished run at a time, under the store's writer
lock; a sweep killed at any moment leaves whole runs or nothing, and running it again
picks up where it stopped. Before it skips stored runs it checks them against their
manifests: a damaged run is moved aside (with a warning naming where) and run again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ntklens.data import SOURCES, download_dataset, load_dataset
from ntklens.data.registry import locate
from ntklens.errors import ConfigError
from ntklens.schema import RunSpec
from ntklens.store import Store
from ntklens.store import open as open_store
from ntklens.sweep.config import StudyConfig
from ntklens.sweep.executors import Executor, make_executor
from ntklens.sweep.planning import check_runs, plan
from ntklens.sweep.progress import LogProgress, SweepProgress


@dataclass(frozen=True)
class SweepSummary:
    """How a sweep went: planned runs, runs skipped as already stored, and outcomes."""

    n_total: int
    n_skipped: int
    n_ok: int
    n_failed: int


def runs_to_do(
    specs: Sequence[RunSpec], store: Store, *, force: bool = False, retry_failed: bool = True
) -> list[RunSpec]:
    """The specs to execute: all with ``force``; else those not stored with status ok
    (and, unless ``retry_failed`` is false, not stored as failed either)."""
    if force:
        return list(specs)
    statuses = store.statuses()
    keep = {"ok"} if retry_failed else {"ok", "failed"}
    return [spec for spec in specs if statuses.get(spec.run_id) not in keep]


def check_data_available(specs: Sequence[RunSpec], *, download: bool = False) -> None:
    """Raise the data module's one-line error if a dataset's files are not on this machine;
    with ``download``, fetch them into the user cache instead."""
    for dataset, path in sorted({(s.dataset, s.data_path) for s in specs}, key=str):
        if dataset in SOURCES and locate(SOURCES[dataset], path) is None:
            if download:
                download_dataset(dataset)
            else:
                load_dataset(dataset, path=path)  # raises DataNotFoundError, where to look


def run_sweep(
    study: StudyConfig | Sequence[RunSpec],
    store: str | Path | Store,
    *,
    executor: str | Executor = "local",
    workers: int | None = None,
    address: str | None = None,
    force: bool = False,
    retry_failed: bool = True,
    progress: SweepProgress | None = None,
    download: bool = False,
) -> SweepSummary:
    """Execute every planned run not yet in ``store`` and store each result as it finishes.

    ``study`` is a config (expanded with :func:`~ntklens.sweep.planning.plan`) or the specs
    themselves. ``executor`` is "local" (``workers`` processes) or "ray" (``address``), or
    an :class:`Executor`. Runs stored as ok are skipped unless ``force``; runs stored as
    failed are run again unless ``retry_failed`` is false (a crash or a missing file may
    have been fixed since; a diverging run will just fail again). Failed runs are stored
    with their reason, and the sweep goes on. ``download`` fetches missing datasets first
    (local executors). Damaged stored runs are moved to the store's
    ``damaged/`` folder and run again.
    """
    study_name = study.name if isinstance(study, StudyConfig) else None
    specs = plan(study) if isinstance(study, StudyConfig) else list(study)
    specs = list({spec.run_id: spec for spec in specs}.values())
    if not specs:
        raise ConfigError("the sweep has no runs; give at least one value on every axis")
    if isinstance(executor, str):
        executor = make_executor(executor, workers=workers, address=address)
    elif workers is not None or address is not None:
        raise ConfigError("workers and address configure a named executor; set them on it")
    if executor.local_files:  # the runs use this machine's files, memory and devices
        check_data_available(specs, download=download)
        check_runs(specs, label=study_name or "sweep")
    store = store if isinstance(store, Store) else open_store(store, create=True)
    progress = progress or LogProgress()
    n_ok = n_failed = 0
    with store.writer():
        store.set_aside_damaged()
        todo = runs_to_do(specs, store, force=force, retry_failed=retry_failed)
        if todo:
            with executor, progress:
                progress.begin(len(todo), skipped=len(specs) - len(todo), slots=executor.slots)
                for result in executor.results(todo):
                    store.write(result)
                    n_ok += result.status == "ok"
                    n_failed += result.status == "failed"
                    progress.finished(result)
    return SweepSummary(
        n_total=len(specs), n_skipped=len(specs) - len(todo), n_ok=n_ok, n_failed=n_failed
    )

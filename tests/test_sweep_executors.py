"""Executors and the driver with stand-in tasks: threads, failures, lost workers, resume."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

import ntklens.store
from ntklens.errors import ConfigError, NtkLensError
from ntklens.schema import RunResult, RunSpec
from ntklens.store import StoreWarning
from ntklens.sweep import Executor, LocalExecutor, SweepSummary, run_sweep, validate_config
from ntklens.sweep.executors import execute_run, make_executor
from ntklens.sweep.progress import LiveProgress, LogProgress, make_progress

CRASHING_WIDTH = 13
RAISING_WIDTH = 7


def thread_reporting_task(spec: RunSpec) -> RunResult:
    """Records the torch and BLAS thread counts it ran with and the worker's pid."""
    import torch
    from threadpoolctl import threadpool_info

    if spec.width == RAISING_WIDTH:
        raise ValueError("width 7 is unlucky\nsecond line")
    if spec.width == CRASHING_WIDTH:
        os._exit(3)  # a worker that dies, as if killed or out of memory
    records = pd.DataFrame(
        {
            "step": [0, 0, 0, 0],
            "quantity": ["threads", "blas_threads", "pid", "width_squared"],
            "value": [
                float(torch.get_num_threads()),
                float(max(pool["num_threads"] for pool in threadpool_info())),
                float(os.getpid()),
                float(spec.width**2),
            ],
        }
    )
    return RunResult(spec=spec, run_id=spec.run_id, status="ok", records=records)


def specs(*widths: int) -> list[RunSpec]:
    return [RunSpec(dataset="digits", n_train=50, width=w, steps=5) for w in widths]


def values(store: ntklens.store.Store, quantity: str) -> dict[int, float]:
    frame = store.query(
        f"SELECT width, value FROM records JOIN runs USING (run_id) WHERE quantity = '{quantity}'"
    )
    return dict(zip(frame["width"], frame["value"], strict=True))


class InProcessExecutor(Executor):
    """Runs specs one by one in this process: the driver's tests need no worker processes."""

    def results(self, specs: Sequence[RunSpec]) -> Iterator[RunResult]:
        for spec in specs:
            yield execute_run(spec, thread_reporting_task, threads=1)


def test_local_executor_runs_each_spec_once_on_the_given_threads(tmp_path: Path) -> None:
    executor = LocalExecutor(2, threads_per_worker=1, task=thread_reporting_task)
    summary = run_sweep(specs(1, 2, RAISING_WIDTH, 4, 5), tmp_path, executor=executor)
    assert (summary.n_total, summary.n_ok, summary.n_failed, summary.n_skipped) == (5, 4, 1, 0)
    store = ntklens.store.open(tmp_path)
    assert values(store, "width_squared") == {w: float(w**2) for w in (1, 2, 4, 5)}
    assert set(values(store, "threads").values()) == {1.0}
    assert set(values(store, "blas_threads").values()) == {1.0}  # numpy/scipy pools too
    pids = set(values(store, "pid").values())
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids
    runs = store.runs().set_index("width")
    assert runs.loc[RAISING_WIDTH, "status"] == "failed"
    assert runs.loc[RAISING_WIDTH, "error"] == "ValueError: width 7 is unlucky"


def test_only_the_run_whose_worker_died_is_charged(tmp_path: Path) -> None:
    # One worker: the run queued behind the crashing one must not be charged for it.
    executor = LocalExecutor(1, task=thread_reporting_task, max_attempts=1)
    summary = run_sweep(specs(1, CRASHING_WIDTH, 3, 4), tmp_path, executor=executor)
    assert (summary.n_ok, summary.n_failed) == (3, 1)
    runs = ntklens.store.open(tmp_path).runs().set_index("width")
    assert runs.loc[CRASHING_WIDTH, "status"] == "failed"
    assert "worker process died 1 times" in runs.loc[CRASHING_WIDTH, "error"]
    assert set(runs.loc[[1, 3, 4], "status"]) == {"ok"}


def test_rerun_skips_stored_runs_retries_failed_and_force_reruns_all(tmp_path: Path) -> None:
    def sweep(*widths: int, **options: bool) -> SweepSummary:
        return run_sweep(specs(*widths), tmp_path, executor=InProcessExecutor(), **options)

    first = sweep(1, RAISING_WIDTH)
    store = ntklens.store.open(tmp_path)
    first_written = store.runs().set_index("width")["finished_at"]
    assert (first.n_ok, first.n_failed) == (1, 1)

    kept = sweep(1, RAISING_WIDTH, 2, retry_failed=False)
    assert (kept.n_skipped, kept.n_ok, kept.n_failed) == (2, 1, 0)
    retried = sweep(1, RAISING_WIDTH, 2)
    assert (retried.n_skipped, retried.n_ok, retried.n_failed) == (2, 0, 1)
    written = store.runs().set_index("width")["finished_at"]
    assert written[1] == first_written[1]  # never rerun
    assert written[RAISING_WIDTH] > first_written[RAISING_WIDTH]

    forced = sweep(1, 2, force=True)
    assert (forced.n_skipped, forced.n_ok) == (0, 2)
    assert store.runs().set_index("width")["finished_at"][1] > first_written[1]
    assert len(store.runs()) == 3


def test_log_progress_prints_one_line_per_run(tmp_path: Path, capsys) -> None:
    executor = InProcessExecutor()
    run_sweep(specs(1, RAISING_WIDTH), tmp_path, executor=executor, progress=LogProgress())
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("sweep: 2 runs to do, 0 already stored")
    assert len(lines) == 3 and [line.split()[0] for line in lines[1:]] == ["[1/2]", "[2/2]"]
    assert "FAILED (ValueError: width 7 is unlucky)" in lines[2]
    assert lines[2].endswith("failed 1 eta 0:00:00")


def test_executor_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="--workers"):
        LocalExecutor(0)
    with pytest.raises(ConfigError, match="--address only applies"):
        make_executor("local", address="auto")
    with pytest.raises(ConfigError, match="--workers only applies"):
        make_executor("ray", workers=2)


def test_a_second_sweep_on_a_busy_store_is_refused(tmp_path: Path) -> None:
    store = ntklens.store.open(tmp_path, create=True)
    executor = InProcessExecutor()
    with store.writer(), pytest.raises(NtkLensError, match="being written by a running sweep"):
        run_sweep(specs(1), tmp_path, executor=executor)


def test_live_progress_shows_done_running_failed_and_eta() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    progress = make_progress(console=console)
    assert isinstance(progress, LiveProgress)
    ok = execute_run(specs(1)[0], thread_reporting_task, threads=1)
    failed = execute_run(specs(RAISING_WIDTH)[0], thread_reporting_task, threads=1)
    with progress:
        progress.begin(3, skipped=2, slots=2)
        progress.finished(ok)
        progress.finished(failed)
    text = screen.getvalue()
    assert "skipping 2 runs already in the store" in text
    assert "2/3" in text and "1 running, 1 failed" in text and "ETA" in text
    assert "width 7 is unlucky" in text


def test_quiet_or_piped_output_gets_log_lines() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True)
    piped = Console(file=io.StringIO(), force_terminal=False)
    assert isinstance(make_progress(quiet=True, console=terminal), LogProgress)
    assert isinstance(make_progress(console=piped), LogProgress)


def run_in_worker(spec: RunSpec) -> RunResult:
    """A real training run that also records its worker's pid and, after the run, the most
    threads any BLAS or OpenMP pool of the process had (scipy's included)."""
    from threadpoolctl import threadpool_info

    from ntklens.train.run import run

    result = run(spec)
    extra = pd.DataFrame(
        {
            "step": [-1, -1],
            "quantity": ["pid", "blas_threads"],
            "value": [
                float(os.getpid()),
                float(max(pool["num_threads"] for pool in threadpool_info())),
            ],
        }
    )
    result.records = pd.concat([result.records, extra], ignore_index=True)
    return result


def test_a_worker_gives_the_same_records_on_its_first_run_and_a_later_one() -> None:
    # The first run of a fresh worker loads scipy's BLAS; its thread limit must hold anyway.
    spec = RunSpec(
        dataset="digits", n_train=1000, n_test=300, n_probe=20, width=8, steps=4,
        probe_points_per_decade=0, spectral_position_batch=16,
    )  # fmt: skip
    other = spec.model_copy(update={"width": 9})
    with LocalExecutor(1, threads_per_worker=1, task=run_in_worker) as executor:
        (first,) = executor.results([spec])
        later = {result.spec.width: result for result in executor.results([other, spec])}[8]
    assert first.status == later.status == "ok", (first.error, later.error)
    pids = {float(r.records.query("quantity == 'pid'")["value"].item()) for r in (first, later)}
    assert len(pids) == 1  # one worker process ran both
    assert "kernel0_test_loss" in set(first.records["quantity"])
    for result in (first, later):
        assert result.records.query("quantity == 'blas_threads'")["value"].item() == 1.0
    pd.testing.assert_frame_equal(first.records, later.records, check_exact=True)
    for a, b in zip(first.spectra, later.spectra, strict=True):
        assert (a.step, a.kind) == (b.step, b.kind)
        assert a.values.tobytes() == b.values.tobytes()


def test_a_resumed_sweep_moves_damaged_runs_aside_and_redoes_them(tmp_path: Path) -> None:
    study = validate_config(
        {
            "name": "repair-study",
            "data": {"dataset": "digits", "n_test": 100},
            "probe": {"n": 10},
            "train": {"steps": 5},
            "sweep": {"widths": [1, 2, 3, 4], "n_train": [50]},
        }
    )
    first = run_sweep(study, tmp_path, executor=InProcessExecutor())
    assert (first.n_ok, first.n_skipped) == (4, 0)
    store = ntklens.store.open(tmp_path)
    before = store.records()
    by_width = store.runs().set_index("width")["run_id"]
    records = tmp_path / "runs" / by_width[1] / "records.parquet"
    records.write_bytes(records.read_bytes()[:100])
    spectra = tmp_path / "runs" / by_width[3] / "spectra.parquet"
    spectra.write_bytes(bytes(spectra.stat().st_size))

    with pytest.warns(StoreWarning) as caught:
        resumed = run_sweep(study, tmp_path, executor=InProcessExecutor())
    assert (resumed.n_skipped, resumed.n_ok, resumed.n_failed) == (2, 2, 0)
    aside = sorted((tmp_path / "damaged").iterdir())
    assert sorted(p.name[:16] for p in aside) == sorted([by_width[1], by_width[3]])
    messages = " ".join(str(w.message) for w in caught)
    assert all(str(p) in messages for p in aside)
    assert store.damaged() == {}
    pd.testing.assert_frame_equal(store.records(), before)
    assert set(store.runs()["study"]) == {"repair-study"}


def test_baselines_switched_off_are_not_computed() -> None:
    from ntklens.train.run import run

    spec = RunSpec(
        dataset="digits", n_train=60, n_test=50, n_probe=10, width=8, steps=3,
        probe_points_per_decade=0, spectral_position_batch=16, parameterization="ntk",
    )  # fmt: skip
    with_baselines = set(run(spec).records["quantity"])
    off = spec.model_copy(update={"kernel0_baseline": False, "infinite_baseline": False})
    without = set(run(off).records["quantity"])
    assert {"kernel0_test_loss", "infinite_test_loss"} <= with_baselines
    assert not any(q.startswith(("kernel0_", "infinite_")) for q in without)
    assert without == {q for q in with_baselines if not q.startswith(("kernel0_", "infinite_"))}


def test_the_worker_initializer_module_loads_no_numerical_library() -> None:
    # A spawned worker imports this module to run its initializer, which must set the
    # thread variables before numpy, scipy or torch load.
    script = (
        "import sys, ntklens.sweep.executors; "
        "print(sorted(m for m in ('numpy', 'scipy', 'torch', 'pandas') if m in sys.modules))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert completed.stdout.strip() == "[]"

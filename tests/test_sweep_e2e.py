"""Real sweeps on the digits dataset: the CLI with two workers, reads while a sweep writes,
SIGKILL and resume, and the Ray executor against the local one."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from typer.testing import CliRunner

import ntklens.store
from ntklens.cli import app
from ntklens.schema import RunResult, RunSpec
from ntklens.sweep import LocalExecutor, RayExecutor, load_config, plan, run_sweep
from ntklens.sweep.executors import available_cores
from ntklens.train.run import run

CONSOLE_SCRIPT = Path(sys.executable).parent / "ntklens"

TINY = """
name = "tiny-digits"
[data]
dataset = "digits"
n_test = 100
[probe]
n = 20
points_per_decade = 1
spectral_position_batch = 32
[train]
steps = 20
batch_size = 50
[sweep]
widths = {widths}
n_train = [100, 200]
"""


def write_config(tmp_path: Path, widths: str = "[16, 32]") -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(widths=widths))
    return path


def start_sweep(config: Path, store: Path, workers: int) -> subprocess.Popen[str]:
    """``ntklens sweep`` in its own session, so that killpg reaches its workers too."""
    return subprocess.Popen(
        [
            str(CONSOLE_SCRIPT),
            "sweep",
            str(config),
            "--store",
            str(store),
            "-w",
            str(workers),
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stored_runs(store: Path) -> list[str]:
    runs = store / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


@pytest.mark.slow
def test_local_sweep_through_the_cli_with_two_workers(tmp_path: Path) -> None:
    config, store = write_config(tmp_path), tmp_path / "store"
    completed = subprocess.run(
        [str(CONSOLE_SCRIPT), "sweep", str(config), "--store", str(store), "-w", "2", "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    assert "4 runs, 0 already stored, 4 ok, 0 failed" in completed.stdout
    assert completed.stderr.count("] ") == 4  # one log line per run

    specs = plan(load_config(config))
    results = ntklens.store.open(store)
    assert sorted(results.runs()["run_id"]) == sorted(s.run_id for s in specs)
    assert set(results.runs()["status"]) == {"ok"}

    # The stored records are exactly what the run gives in this process on the same threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, available_cores() // 2))
    try:
        expected = run(specs[0]).records
    finally:
        torch.set_num_threads(threads)
    stored = results.query(
        f"SELECT step, quantity, value FROM records WHERE run_id = '{specs[0].run_id}'"
    )
    merged = expected.merge(stored, on=["step", "quantity"], suffixes=("", "_stored"))
    assert len(merged) == len(expected) == len(stored)
    np.testing.assert_array_equal(merged["value_stored"], merged["value"])

    runner = CliRunner()
    status = runner.invoke(app, ["status", str(store), "--config", str(config)])
    assert status.exit_code == 0
    assert "4 runs stored, 4 ok, 0 failed" in status.stdout
    assert "4 planned, 4 done, 0 to do" in status.stdout
    sql = (
        "SELECT width, n_train, value FROM records JOIN runs USING (run_id) "
        "WHERE quantity = 'test_acc' AND step = 20 ORDER BY width, n_train"
    )
    query = runner.invoke(app, ["query", str(store), sql, "--format", "csv"])
    assert query.exit_code == 0
    printed = pd.read_csv(io.StringIO(query.stdout))
    direct = results.query(sql)
    assert list(printed["width"]) == [16, 16, 32, 32]
    np.testing.assert_allclose(printed["value"], direct["value"], rtol=1e-12)
    assert ((printed["value"] >= 0) & (printed["value"] <= 1)).all()


@pytest.mark.slow
def test_reads_during_a_sweep_then_sigkill_and_resume(tmp_path: Path) -> None:
    # 12 runs of 200 steps: enough that the kill lands while runs remain, even on a loaded
    # machine where one round of the reads below outlasts several tiny runs
    config, store = write_config(tmp_path, widths="[16, 24, 32, 40, 48, 56]"), tmp_path / "store"
    config.write_text(config.read_text().replace("steps = 20", "steps = 200"))
    planned = {spec.run_id for spec in plan(load_config(config))}
    sweep = start_sweep(config, store, workers=2)
    runner = CliRunner()
    mid_sweep_reads = 0
    try:
        deadline = time.monotonic() + 600
        while len(stored_runs(store)) < 2:
            assert sweep.poll() is None, sweep.communicate()
            assert time.monotonic() < deadline
            if not (store / "runs").is_dir():
                time.sleep(0.2)
                continue
            # While the sweep writes: the CLI's status, a query through the store, and
            # DuckDB straight over the Parquet files all answer, with whole runs only.
            status = runner.invoke(app, ["status", str(store)])
            assert status.exit_code == 0, status.output
            counts = ntklens.store.open(store).query(
                "SELECT run_id, count(*) AS n FROM records GROUP BY run_id"
            )
            assert counts["n"].nunique() <= 1
            if stored_runs(store):
                raw = duckdb.sql(
                    "SELECT run_id, count(*) AS n FROM "
                    f"read_parquet('{store}/runs/*/records.parquet') GROUP BY run_id"
                ).df()
                assert set(raw["run_id"]) <= planned and raw["n"].nunique() == 1
            mid_sweep_reads += 1
            time.sleep(0.2)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()
    assert mid_sweep_reads > 0

    before = {
        run_id: (store / "runs" / run_id / "run.json").stat().st_mtime_ns
        for run_id in stored_runs(store)
    }
    assert 2 <= len(before) < len(planned), "kill the sweep while it still has runs to do"

    resumed = subprocess.run(
        [str(CONSOLE_SCRIPT), "sweep", str(config), "--store", str(store), "-w", "2", "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(planned)} runs, {len(before)} already stored" in resumed.stdout

    assert set(stored_runs(store)) == planned
    assert list((store / ".tmp").iterdir()) == []
    for run_id, mtime in before.items():  # finished runs were skipped, not rerun
        assert (store / "runs" / run_id / "run.json").stat().st_mtime_ns == mtime
    results = ntklens.store.open(store)
    runs = results.runs()
    assert sorted(runs["run_id"]) == sorted(planned) and set(runs["status"]) == {"ok"}
    counts = results.query("SELECT run_id, count(*) AS n FROM records GROUP BY run_id")
    assert len(counts) == len(planned) and counts["n"].nunique() == 1
    assert len(results.spectra()) > 0

    # Every record and spectrum is exactly what an uninterrupted sweep stores, whichever
    # worker (fresh or warm, before the kill or after) ran each run.
    whole = tmp_path / "uninterrupted"
    uninterrupted = subprocess.run(
        [str(CONSOLE_SCRIPT), "sweep", str(config), "--store", str(whole), "-w", "2", "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    expected = ntklens.store.open(whole)
    pd.testing.assert_frame_equal(results.records(), expected.records(), check_exact=True)
    resumed_spectra, expected_spectra = results.spectra(), expected.spectra()
    pd.testing.assert_frame_equal(
        resumed_spectra.drop(columns="values"), expected_spectra.drop(columns="values")
    )
    for a, b in zip(resumed_spectra["values"], expected_spectra["values"], strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_sweep_leaves_no_worker_running(tmp_path: Path, stop: signal.Signals) -> None:
    """The signal goes to the sweep's process alone, while its workers are in runs that
    would take minutes: on SIGTERM the sweep stops them, says how to resume and exits 130;
    killed outright, its workers notice within seconds and exit."""
    config = tmp_path / "long.toml"
    config.write_text(TINY.format(widths="[16, 32]").replace("steps = 20", "steps = 200000"))
    sweep = start_sweep(config, tmp_path / "store", workers=2)
    parent = psutil.Process(sweep.pid)
    deadline = time.monotonic() + 120
    while len(parent.children(recursive=True)) < 2:  # the two workers (and a helper or so)
        assert sweep.poll() is None, sweep.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(3)  # let the workers start their runs
    children = parent.children(recursive=True)
    try:
        os.kill(sweep.pid, stop)
        _, stderr = sweep.communicate(timeout=60)
        if stop == signal.SIGTERM:
            lines = stderr.strip().splitlines()
            assert sweep.returncode == 130, stderr
            assert lines[-1] == (
                "interrupted: finished runs are stored; run the same command to resume"
            ), stderr
            assert not any("Traceback" in line for line in lines), stderr
        _, alive = psutil.wait_procs(children, timeout=15)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        for child in children:
            if child.is_running():
                child.kill()
    assert not list((tmp_path / "store" / "runs").glob("*/run.json"))  # none was finished


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A local Ray instance with two CPUs; its workers see MARKERS_ENV."""
    ray = pytest.importorskip("ray")
    markers = tmp_path_factory.mktemp("ray-markers")
    os.environ[MARKERS_ENV] = str(markers)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        del os.environ[MARKERS_ENV]


MARKERS_ENV = "NTKLENS_TEST_MARKERS"


def dies_on_first_attempt(spec: RunSpec) -> RunResult:
    """Kills its worker process the first time it sees a spec, succeeds the second time."""
    marker = Path(os.environ[MARKERS_ENV]) / spec.run_id
    if not marker.exists():
        marker.touch()
        os._exit(1)
    records = pd.DataFrame({"step": [0], "quantity": ["width"], "value": [float(spec.width)]})
    return RunResult(spec=spec, run_id=spec.run_id, status="ok", records=records)


@pytest.mark.slow
def test_ray_executor_gives_the_same_records_as_the_local_one(
    tmp_path: Path, ray_session: Any
) -> None:
    specs = plan(load_config(write_config(tmp_path)))
    local_summary = run_sweep(
        specs, tmp_path / "local", executor=LocalExecutor(2, threads_per_worker=1)
    )
    ray_summary = run_sweep(specs, tmp_path / "ray", executor=RayExecutor(threads_per_task=1))
    assert local_summary.n_ok == ray_summary.n_ok == len(specs)

    def records(store: str) -> pd.DataFrame:
        frame = ntklens.store.open(tmp_path / store).records()
        return frame.sort_values(["run_id", "step", "quantity"]).reset_index(drop=True)

    local, on_ray = records("local"), records("ray")
    assert len(local) > 0
    pd.testing.assert_frame_equal(local, on_ray, check_exact=False, rtol=1e-6, atol=0)
    spectra_local = ntklens.store.open(tmp_path / "local").spectra()
    spectra_ray = ntklens.store.open(tmp_path / "ray").spectra()
    for a, b in zip(spectra_local["values"], spectra_ray["values"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.slow
def test_ray_retries_a_task_whose_worker_died(tmp_path: Path, ray_session: Any) -> None:
    specs = [RunSpec(dataset="digits", n_train=50, width=w, steps=5) for w in (3, 5)]
    executor = RayExecutor(threads_per_task=1, task=dies_on_first_attempt)
    summary = run_sweep(specs, tmp_path / "store", executor=executor)
    assert (summary.n_ok, summary.n_failed) == (2, 0)
    widths = ntklens.store.open(tmp_path / "store").records().set_index("run_id")["value"]
    assert {widths[s.run_id] for s in specs} == {3.0, 5.0}
    assert all((Path(os.environ[MARKERS_ENV]) / s.run_id).exists() for s in specs)

"""The results store: atomic writes, complete-runs-only reads, failures, locking, queries."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import ntklens.store
from ntklens.errors import NtkLensError
from ntklens.schema import RunResult, RunSpec, Spectrum


def make_result(
    width: int = 8, *, seed: int = 0, status: str = "ok", n_steps: int = 3
) -> RunResult:
    """A run result with distinct, seed-dependent values, built by hand."""
    spec = RunSpec(dataset="digits", n_train=100, width=width, seed=seed, steps=10)
    rng = np.random.default_rng(1000 * width + seed)
    steps = np.repeat(np.arange(n_steps), 2)
    records = pd.DataFrame(
        {
            "step": steps,
            "quantity": ["train_loss", "ntk_trace"] * n_steps,
            "value": rng.standard_normal(2 * n_steps),
        }
    )
    spectra = [
        Spectrum(step, "entk", np.sort(rng.random(5 + step))[::-1]) for step in range(n_steps)
    ]
    return RunResult(
        spec=spec,
        run_id=spec.run_id,
        status=status,
        records=records,
        spectra=spectra,
        error="diverged at step 2; lower lr" if status == "failed" else None,
        failed_step=2 if status == "failed" else None,
        wall_time_s=1.25,
    )


@pytest.fixture
def store(tmp_path: Path) -> ntklens.store.Store:
    return ntklens.store.open(tmp_path / "store", create=True)


def test_written_run_reads_back_exactly(store: ntklens.store.Store) -> None:
    result = make_result()
    with store.writer():
        store.write(result)

    runs = store.runs()
    assert list(runs["run_id"]) == [result.run_id]
    row = runs.iloc[0]
    for name, value in result.spec.model_dump().items():
        stored = row[name]
        assert pd.isna(stored) if value is None else stored == value, name
    assert row["status"] == "ok" and pd.isna(row["error"]) and row["wall_time_s"] == 1.25

    records = store.records()
    expected = result.records.assign(run_id=result.run_id)
    pd.testing.assert_frame_equal(
        records.sort_values(["step", "quantity"]).reset_index(drop=True),
        expected[list(records.columns)].sort_values(["step", "quantity"]).reset_index(drop=True),
        check_dtype=False,
    )
    spectra = store.spectra()
    assert len(spectra) == len(result.spectra)
    for row, spectrum in zip(spectra.itertuples(), result.spectra, strict=True):
        assert (row.step, row.kind) == (spectrum.step, spectrum.kind)
        np.testing.assert_array_equal(row.values, spectrum.values)


def test_run_json_round_trips_to_the_same_spec(store: ntklens.store.Store) -> None:
    result = make_result()
    with store.writer():
        store.write(result)
    document = json.loads((store.runs_dir / result.run_id / "run.json").read_text())
    assert RunSpec(**document["spec"]).run_id == result.run_id


def test_spectra_are_a_list_column_in_parquet(store: ntklens.store.Store) -> None:
    result = make_result()
    with store.writer():
        store.write(result)
    schema = pq.read_schema(store.runs_dir / result.run_id / "spectra.parquet")
    assert str(schema.field("values").type) == "list<element: double>"


def test_empty_store_answers_with_typed_columns(store: ntklens.store.Store) -> None:
    assert store.runs().empty and "width" in store.runs().columns
    assert list(store.records().columns) == ["run_id", "step", "quantity", "value"]
    assert list(store.spectra().columns) == ["run_id", "step", "kind", "values"]
    counted = store.query("SELECT count(*) AS n FROM records JOIN runs USING (run_id)")
    assert counted["n"].item() == 0


def test_failed_run_is_kept_with_its_reason(store: ntklens.store.Store) -> None:
    failed, ok = make_result(8, status="failed", n_steps=2), make_result(16)
    with store.writer():
        store.write(failed)
        store.write(ok)
    assert store.statuses() == {failed.run_id: "failed", ok.run_id: "ok"}
    row = store.query(f"SELECT * FROM runs WHERE run_id = '{failed.run_id}'").iloc[0]
    assert row["error"] == "diverged at step 2; lower lr" and row["failed_step"] == 2
    partial = store.query(f"SELECT * FROM records WHERE run_id = '{failed.run_id}'")
    assert len(partial) == len(failed.records) == 4


def test_rewriting_a_run_replaces_it(store: ntklens.store.Store) -> None:
    first = make_result(8, status="failed")
    second = make_result(8)
    assert first.run_id == second.run_id
    with store.writer():
        store.write(first)
        store.write(second)
    assert store.statuses() == {second.run_id: "ok"}
    assert len(store.records()) == len(second.records)
    assert list(store.staging_dir.iterdir()) == []


def test_staged_runs_are_invisible_and_cleared_by_the_next_writer(
    store: ntklens.store.Store,
) -> None:
    complete = make_result(8)
    with store.writer():
        store.write(complete)
    # What a writer killed mid-write leaves: a half-staged run with only its spec.
    half = store.staging_dir / f"new-{make_result(16).run_id}-deadbeef"
    half.mkdir()
    (half / "run.json").write_text("{")
    assert set(store.statuses()) == {complete.run_id}
    assert set(store.records()["run_id"]) == {complete.run_id}
    with store.writer():
        assert list(store.staging_dir.iterdir()) == []


def test_a_replaced_run_whose_successor_never_arrived_is_restored(
    store: ntklens.store.Store,
) -> None:
    result = make_result(8)
    with store.writer():
        store.write(result)
    # A writer killed between its two renames: old record moved aside, new one not in.
    os.rename(store.runs_dir / result.run_id, store.staging_dir / f"old-{result.run_id}-cafe")
    assert store.statuses() == {}
    with store.writer():
        assert store.statuses() == {result.run_id: "ok"}
    assert len(store.records()) == len(result.records)


def test_one_writer_at_a_time_while_readers_go_on(store: ntklens.store.Store) -> None:
    with store.writer():
        store.write(make_result(8))
        other = ntklens.store.open(store.path)
        with pytest.raises(NtkLensError, match=f"pid {os.getpid()}"), other.writer():
            pass
        assert len(other.runs()) == 1


def test_open_rejects_missing_paths_and_non_stores(tmp_path: Path) -> None:
    with pytest.raises(NtkLensError, match="no such store"):
        ntklens.store.open(tmp_path / "missing")
    with pytest.raises(NtkLensError, match="not an ntklens store"):
        ntklens.store.open(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NtkLensError, match="not a directory"):
        ntklens.store.open(tmp_path / "file", create=True)


def test_bad_sql_is_a_one_line_user_error(store: ntklens.store.Store) -> None:
    with pytest.raises(NtkLensError) as caught:
        store.query("SELEC width FROM runs")
    assert "\n" not in str(caught.value) and "runs, records and spectra" in str(caught.value)
    with pytest.raises(NtkLensError, match="nonexistent"):
        store.query("SELECT nonexistent FROM runs")


def test_readers_see_only_whole_runs_while_a_writer_writes(store: ntklens.store.Store) -> None:
    results = [make_result(width, seed=seed) for width in (4, 8, 16) for seed in range(8)]
    errors: list[BaseException] = []

    def write_all() -> None:
        try:
            with store.writer():
                for result in results:
                    store.write(result)
                    store.write(result)  # replacing too: the old copy moves aside
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    writer = threading.Thread(target=write_all)
    writer.start()
    reader = ntklens.store.open(store.path)
    seen = []
    while writer.is_alive() or not seen:
        counts = reader.query(
            "SELECT runs.run_id, count(records.step) AS n FROM runs "
            "LEFT JOIN records USING (run_id) GROUP BY runs.run_id"
        )
        assert (counts["n"] == 6).all()  # every visible run has all of its records
        seen.append(len(counts))
    writer.join()
    assert not errors
    assert len(reader.runs()) == len(results)


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from test_store import make_result
    import ntklens.store
    store = ntklens.store.open(sys.argv[1], create=True)
    with store.writer():
        print("ready", flush=True)
        while True:
            for width in range(1, 40):
                store.write(make_result(width, n_steps=200))
    """
)


def test_sigkill_mid_write_leaves_only_whole_runs(tmp_path: Path) -> None:
    path = tmp_path / "store"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(path), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    store = ntklens.store.open(path)
    with store.writer():  # recovery after the crash
        pass
    statuses = store.statuses()
    assert statuses, "the writer should have stored some runs in 1.5 s"
    records = store.query("SELECT run_id, count(*) AS n FROM records GROUP BY run_id")
    assert set(records["run_id"]) == set(statuses)
    assert (records["n"] == 400).all()
    assert list(store.staging_dir.iterdir()) == []


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def overwrite_same_size(path: Path) -> None:
    path.write_bytes(bytes(len(path.read_bytes())))


DAMAGE = {
    "truncated records": ("records.parquet", truncate, "bytes"),
    "overwritten spectra": ("spectra.parquet", overwrite_same_size, "checksum"),
    "deleted records": ("records.parquet", Path.unlink, "missing"),
    "deleted run.json": ("run.json", Path.unlink, "missing"),
    "garbled manifest": ("manifest.json", overwrite_same_size, "manifest"),
}


def written(store: ntklens.store.Store, *widths: int) -> list[RunResult]:
    results = [make_result(width) for width in widths]
    with store.writer():
        for result in results:
            store.write(result)
    return results


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_run_is_left_out_with_a_warning_naming_it(
    store: ntklens.store.Store, damage: str
) -> None:
    name, spoil, problem = DAMAGE[damage]
    whole, broken = written(store, 8, 16)
    spoil(store.runs_dir / broken.run_id / name)
    path = str(store.runs_dir / broken.run_id)
    with pytest.warns(ntklens.store.StoreWarning, match=path) as caught:
        runs = store.runs()
    assert problem in str(caught[0].message)
    assert list(runs["run_id"]) == [whole.run_id]
    assert set(store.records()["run_id"]) == {whole.run_id}
    assert set(store.spectra()["run_id"]) == {whole.run_id}
    assert store.statuses() == {whole.run_id: "ok"}
    assert list(store.damaged()) == [path]


def test_set_aside_moves_damaged_runs_and_a_rewrite_restores_them(
    store: ntklens.store.Store,
) -> None:
    results = written(store, 4, 8, 16)
    truncate(store.runs_dir / results[0].run_id / "records.parquet")
    overwrite_same_size(store.runs_dir / results[1].run_id / "spectra.parquet")
    with store.writer():
        with pytest.warns(ntklens.store.StoreWarning, match="moved it to") as caught:
            moved = store.set_aside_damaged()
        assert sorted(run_id for run_id, _, _ in moved) == sorted(r.run_id for r in results[:2])
        for (run_id, aside, _), warning in zip(moved, caught, strict=True):
            assert aside.parent == store.path / "damaged" and aside.name.startswith(run_id)
            assert (aside / "records.parquet").exists() and str(aside) in str(warning.message)
        assert store.statuses() == {results[2].run_id: "ok"}
        for result in results[:2]:
            store.write(result)
    assert store.damaged() == {}
    assert len(store.records()) == sum(len(r.records) for r in results)


def test_old_runs_without_a_manifest_are_read_if_their_files_parse(
    store: ntklens.store.Store,
) -> None:
    readable, unreadable = written(store, 8, 16)
    for result in (readable, unreadable):
        (store.runs_dir / result.run_id / "manifest.json").unlink()
    truncate(store.runs_dir / unreadable.run_id / "spectra.parquet")
    with pytest.warns(ntklens.store.StoreWarning) as caught:
        assert list(store.runs()["run_id"]) == [readable.run_id]
    messages = " ".join(str(w.message) for w in caught)
    assert "no manifest" in messages and "not readable Parquet" in messages
    with store.writer(), pytest.warns(ntklens.store.StoreWarning):
        store.set_aside_damaged()  # gives the readable one a manifest
    manifest = json.loads((store.runs_dir / readable.run_id / "manifest.json").read_text())
    records = store.runs_dir / readable.run_id / "records.parquet"
    assert manifest["files"]["records.parquet"]["size"] == records.stat().st_size
    truncate(records)
    with pytest.warns(ntklens.store.StoreWarning, match="records.parquet has"):
        assert store.runs().empty


def test_the_manifest_lists_sizes_and_sha256(store: ntklens.store.Store) -> None:
    (result,) = written(store, 8)
    directory = store.runs_dir / result.run_id
    manifest = json.loads((directory / "manifest.json").read_text())["files"]
    assert set(manifest) == {"run.json", "records.parquet", "spectra.parquet"}
    for name, entry in manifest.items():
        data = (directory / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_the_study_name_is_stored_without_changing_the_run_id(
    store: ntklens.store.Store,
) -> None:
    result = make_result(8)
    spec = result.spec.model_copy(update={"study": "named-study"})
    assert spec.run_id == result.run_id
    with store.writer():
        store.write(RunResult(spec=spec, run_id=spec.run_id, status="ok", records=result.records))
    document = json.loads((store.runs_dir / result.run_id / "run.json").read_text())
    assert document["spec"]["study"] == "named-study"
    assert list(store.runs()["study"]) == ["named-study"]


def test_an_unwritable_store_is_one_line_up_front(tmp_path: Path, monkeypatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ntklens.store.store.tempfile, "TemporaryFile", refuse)
    with pytest.raises(NtkLensError, match=r"cannot write there \(Permission denied\)"):
        ntklens.store.open(tmp_path / "new", create=True)

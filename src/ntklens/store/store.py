"""The results store: one directory per finished run, written atomically, read with DuckDB.

Layout (see docs/architecture.md)::

    STORE/runs/<run_id>/run.json          spec, status, error, failed_step, wall_time_s
    STORE/runs/<run_id>/records.parquet   run_id, step, quantity, value
    STORE/runs/<run_id>/spectra.parquet   run_id, step, kind, values (list<double>)
    STORE/runs/<run_id>/manifest.json     size and SHA-256 of each of the three files above
    STORE/.tmp/                           staging; a run directory appears by one rename
    STORE/damaged/<run_id>-<UTC time>/    damaged runs a sweep moved aside before redoing them
    STORE/.lock                           held (flock) by the one sweep that writes

A run is staged complete in ``.tmp/``, its manifest last, and moved into ``runs/`` by a
single ``os.rename``, so readers, which never lock, only ever see whole runs. Only one
writer (a sweep driver) holds the store at a time; when it takes the lock it clears what a
killed writer left in ``.tmp/``.

Every read checks each run directory against its manifest (cached by file stamps) and
leaves out a damaged run (a file missing, truncated or changed) with a
:class:`StoreWarning` naming its path; :meth:`Store.set_aside_damaged`, which a sweep calls,
moves such runs to ``damaged/`` so that they are run again. A run written before manifests
existed is read if its files parse (JSON and Parquet), with a warning; a sweep then adds
its manifest.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import types
import typing
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ntklens.errors import NtkLensError
from ntklens.schema import VERSION, RunResult, RunSpec

RUN_FILE = "run.json"
RECORDS_FILE = "records.parquet"
SPECTRA_FILE = "spectra.parquet"
MANIFEST_FILE = "manifest.json"
DATA_FILES = (RUN_FILE, RECORDS_FILE, SPECTRA_FILE)
DAMAGED_DIR = "damaged"

RECORDS_SCHEMA = pa.schema(
    [("run_id", pa.string()), ("step", pa.int64()), ("quantity", pa.string()),
     ("value", pa.float64())]
)  # fmt: skip
SPECTRA_SCHEMA = pa.schema(
    [("run_id", pa.string()), ("step", pa.int64()), ("kind", pa.string()),
     ("values", pa.list_(pa.float64()))]
)  # fmt: skip
_OUTCOME_FIELDS = [
    ("status", pa.string()),
    ("error", pa.string()),
    ("failed_step", pa.int64()),
    ("wall_time_s", pa.float64()),
    ("finished_at", pa.timestamp("us", tz="UTC")),
    ("ntklens_version", pa.string()),
]
_READ_ATTEMPTS = 5


class StoreWarning(UserWarning):
    """A stored run that is left out (damaged) or read without a manifest."""


def _arrow_type(annotation: Any) -> pa.DataType:
    """The Arrow type of a RunSpec field: int, float, str, bool or a Literal of str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _arrow_type(args[0])
    if typing.get_origin(annotation) is typing.Literal:
        return _arrow_type(type(args[0]))
    return {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}[annotation]


RUNS_SCHEMA = pa.schema(
    [("run_id", pa.string())]
    + [(name, _arrow_type(field.annotation)) for name, field in RunSpec.model_fields.items()]
    + _OUTCOME_FIELDS
)


class Store:
    """A results store directory. Reading needs no lock; writing is for one sweep at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs_dir = path / "runs"
        self.staging_dir = path / ".tmp"
        self.damaged_dir = path / DAMAGED_DIR
        # run directory name -> (stamps of its files, run.json or None, problem or None)
        self._checked: dict[str, tuple[Any, dict[str, Any] | None, str | None]] = {}
        self._warned: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # ---- writing -------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self) -> Iterator[Store]:
        """Hold the store's writer lock; on entry clear what a killed writer left in .tmp."""
        check_writable(self.path)
        with (self.path / ".lock").open("a+") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock_file.seek(0)
                holder = lock_file.read().strip() or "another process"
                raise NtkLensError(
                    f"{self.path}: store is being written by a running sweep (pid {holder}); "
                    "wait for it to finish or give another --store"
                ) from None
            lock_file.truncate(0)
            lock_file.write(str(os.getpid()))
            lock_file.flush()
            self._recover_staging()
            try:
                yield self
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def write(self, result: RunResult) -> None:
        """Store one run atomically, replacing an earlier record of the same run id."""
        self.staging_dir.mkdir(exist_ok=True)
        staged = self.staging_dir / f"new-{result.run_id}-{uuid.uuid4().hex[:8]}"
        staged.mkdir()
        _write_json(staged / RUN_FILE, _run_document(result))
        _write_parquet(staged / RECORDS_FILE, _records_table(result))
        _write_parquet(staged / SPECTRA_FILE, _spectra_table(result))
        _write_json(staged / MANIFEST_FILE, _manifest(staged))
        _fsync_dir(staged)
        target = self.runs_dir / result.run_id
        aside = None
        if target.exists():
            aside = self.staging_dir / f"old-{result.run_id}-{uuid.uuid4().hex[:8]}"
            os.rename(target, aside)
        os.rename(staged, target)
        _fsync_dir(self.runs_dir)
        if aside is not None:
            shutil.rmtree(aside)

    def _recover_staging(self) -> None:
        """Drop half-staged runs; put back a replaced run whose successor never arrived."""
        self.staging_dir.mkdir(exist_ok=True)
        for entry in sorted(self.staging_dir.iterdir()):
            kind, _, rest = entry.name.partition("-")
            run_id = rest.rsplit("-", 1)[0]
            target = self.runs_dir / run_id
            if kind == "old" and run_id and not target.exists():
                os.rename(entry, target)
            elif entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def set_aside_damaged(self) -> list[tuple[str, Path, str]]:
        """Move every damaged run to ``damaged/<run_id>-<UTC time>`` (so a sweep redoes it)
        and give manifests to old runs that have none but read; needs :meth:`writer`.

        Returns ``(run_id, new path, problem)`` per run moved, each also a warning.
        """
        moved = []
        for name in self._run_names():
            document, problem = self._check(name)
            directory = self.runs_dir / name
            if problem is None and document is not None:
                if not (directory / MANIFEST_FILE).exists():
                    _write_json_atomically(directory / MANIFEST_FILE, _manifest(directory))
                continue
            if problem is None:
                continue  # vanished while listing
            self.damaged_dir.mkdir(exist_ok=True)
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            aside = self.damaged_dir / f"{name}-{stamp}"
            if aside.exists():
                aside = aside.with_name(f"{aside.name}-{uuid.uuid4().hex[:6]}")
            os.rename(directory, aside)
            self._checked.pop(name, None)
            warnings.warn(
                f"run {name} is damaged ({problem}); moved it to {aside}, it will be run again",
                StoreWarning,
                stacklevel=2,
            )
            moved.append((name, aside, problem))
        if moved:
            _fsync_dir(self.runs_dir)
        return moved

    # ---- reading -------------------------------------------------------------------

    def statuses(self) -> dict[str, str]:
        """run_id -> "ok" | "failed" for every stored run."""
        return {doc["run_id"]: doc["status"] for doc in self._run_documents()}

    def runs(self) -> pd.DataFrame:
        """One row per run: run_id, every RunSpec field, status, error, failed_step, ..."""
        return self.query("SELECT * FROM runs ORDER BY run_id")

    def records(self) -> pd.DataFrame:
        """Tidy records of all runs: run_id, step, quantity, value."""
        return self.query("SELECT * FROM records ORDER BY run_id, step, quantity")

    def final(self) -> pd.DataFrame:
        """One row per run: its ``runs()`` columns, ``final_step`` (its last recorded step)
        and, one column each, every quantity's value at the last step it was recorded."""
        runs = self.runs()
        last = self.query(
            "SELECT run_id, quantity, arg_max(value, step) AS value FROM records "
            "GROUP BY run_id, quantity"
        )
        steps = self.query("SELECT run_id, max(step) AS final_step FROM records GROUP BY run_id")
        wide = last.pivot(index="run_id", columns="quantity", values="value")
        wide.columns.name = None
        final = runs.merge(steps, on="run_id", how="left")
        return final.merge(wide, left_on="run_id", right_index=True, how="left")

    def spectra(self) -> pd.DataFrame:
        """Kernel spectra of all runs: run_id, step, kind, values (float64 arrays)."""
        frame = self.query("SELECT * FROM spectra ORDER BY run_id, step, kind")
        frame["values"] = [np.asarray(v, dtype=np.float64) for v in frame["values"]]
        return frame

    def query(self, sql: str) -> pd.DataFrame:
        """Run DuckDB SQL over the views ``runs``, ``records`` and ``spectra``."""
        for attempt in range(_READ_ATTEMPTS):
            connection = duckdb.connect()
            try:
                self._register_views(connection)
                relation = connection.sql(sql)
                return relation.df() if relation is not None else pd.DataFrame()
            except duckdb.IOException as error:
                # A run directory was replaced between listing and reading it: list again.
                if attempt == _READ_ATTEMPTS - 1:
                    raise NtkLensError(f"query: {_first_line(error)}; try again") from None
            except duckdb.Error as error:
                raise NtkLensError(
                    f"query: {_first_line(error)}; the tables are runs, records and spectra"
                ) from None
            finally:
                connection.close()
        raise AssertionError("unreachable")

    def _register_views(self, connection: duckdb.DuckDBPyConnection) -> None:
        """Views over one snapshot of the finished runs, so the three tables agree."""
        documents = self._run_documents()
        connection.register("runs", _runs_table(documents))
        for view, filename, schema in (
            ("records", RECORDS_FILE, RECORDS_SCHEMA),
            ("spectra", SPECTRA_FILE, SPECTRA_SCHEMA),
        ):
            files = [str(self.runs_dir / doc["run_id"] / filename) for doc in documents]
            if files:
                connection.read_parquet(files).create_view(view)
            else:
                connection.register(view, schema.empty_table())

    def damaged(self) -> dict[str, str]:
        """run directory -> what is wrong with it, for every damaged run in ``runs/``."""
        problems = {}
        for name in self._run_names():
            _, problem = self._check(name)
            if problem is not None:
                problems[str(self.runs_dir / name)] = problem
        return problems

    def _run_names(self) -> list[str]:
        with os.scandir(self.runs_dir) as entries:
            return sorted(entry.name for entry in entries if entry.is_dir())

    def _run_documents(self) -> list[dict[str, Any]]:
        """run.json of every whole run directory; damaged ones are left out with a warning."""
        documents = []
        for name in self._run_names():
            document, problem = self._check(name)
            if problem is not None:
                self._warn(
                    name,
                    f"{self.runs_dir / name}: damaged run left out ({problem}); "
                    "a sweep of its study moves it aside and runs it again",
                )
            elif document is not None:
                if not (self.runs_dir / name / MANIFEST_FILE).exists():
                    self._warn(
                        name,
                        f"{self.runs_dir / name}: no manifest (written by an older ntklens); "
                        "read because its files parse, a sweep adds the manifest",
                    )
                documents.append(document)
        return documents

    def _warn(self, name: str, message: str) -> None:
        if (name, message) not in self._warned:
            self._warned.add((name, message))
            warnings.warn(message, StoreWarning, stacklevel=4)

    def _check(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        """(run.json, None) for a whole run, (None, problem) for a damaged one, (None, None)
        for one that vanished (being replaced); cached while its files keep their stamps."""
        directory = self.runs_dir / name
        for _ in range(_READ_ATTEMPTS):
            before = _stamps(directory)
            if before is None:
                return None, None
            cached = self._checked.get(name)
            if cached is not None and cached[0] == before:
                return cached[1], cached[2]
            try:
                document, problem = _verify(directory)
            except FileNotFoundError:
                continue  # a file went away while it was read: look again
            if _stamps(directory) == before:  # not replaced while it was being read
                self._checked[name] = (before, document, problem)
                return document, problem
        return None, None  # replaced again and again: the next listing has it


def check_writable(directory: Path, option: str = "--store") -> None:
    """Make ``directory`` if needed and check that a file can be written in it; else one
    :class:`NtkLensError` line (up front, instead of a PermissionError mid-sweep)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise NtkLensError(
            f"{directory}: cannot write there ({reason}); give another {option} or make it writable"
        ) from None


def open(path: str | os.PathLike[str], *, create: bool = False) -> Store:
    """Open the results store at ``path`` (``create=True`` makes it if missing and checks
    that it can be written)."""
    root = Path(path).expanduser()
    if create:
        if root.exists() and not root.is_dir():
            raise NtkLensError(f"{root}: exists and is not a directory; give another --store")
        check_writable(root)
        check_writable(root / "runs")
        (root / ".tmp").mkdir(exist_ok=True)
    elif not root.exists():
        raise NtkLensError(f"{root}: no such store; check the path or run a sweep into it")
    elif not (root / "runs").is_dir():
        raise NtkLensError(f"{root}: not an ntklens store (no runs/ folder); check the path")
    return Store(root)


def _run_document(result: RunResult) -> dict[str, Any]:
    return {
        "run_id": result.run_id,
        "spec": result.spec.model_dump(mode="json"),
        "status": result.status,
        "error": result.error,
        "failed_step": result.failed_step,
        "wall_time_s": float(result.wall_time_s),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "ntklens_version": VERSION,
    }


def _runs_table(documents: list[dict[str, Any]]) -> pa.Table:
    rows = [
        {
            "run_id": doc["run_id"],
            **doc["spec"],
            **{name: doc.get(name) for name, _ in _OUTCOME_FIELDS},
            "finished_at": dt.datetime.fromisoformat(doc["finished_at"]),
        }
        for doc in documents
    ]
    return pa.Table.from_pylist(rows, schema=RUNS_SCHEMA)


def _records_table(result: RunResult) -> pa.Table:
    records = result.records
    return pa.table(
        {
            "run_id": [result.run_id] * len(records),
            "step": records["step"].to_numpy(dtype=np.int64),
            "quantity": records["quantity"].astype(str).tolist(),
            "value": records["value"].to_numpy(dtype=np.float64),
        },
        schema=RECORDS_SCHEMA,
    )


def _spectra_table(result: RunResult) -> pa.Table:
    spectra = result.spectra
    return pa.table(
        {
            "run_id": [result.run_id] * len(spectra),
            "step": [int(s.step) for s in spectra],
            "kind": [s.kind for s in spectra],
            "values": [np.asarray(s.values, dtype=np.float64) for s in spectra],
        },
        schema=SPECTRA_SCHEMA,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, Any]:
    """Size and SHA-256 of each data file of a run directory."""
    return {
        "files": {
            name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
            for name in DATA_FILES
        }
    }


def _stamps(directory: Path) -> tuple[Any, ...] | None:
    """(inode, size, mtime) of a run directory and its files; None if it is gone."""
    try:
        with os.scandir(directory) as entries:
            files = [(e.name, e.inode(), e.stat().st_size, e.stat().st_mtime_ns) for e in entries]
        return (directory.stat().st_ino, *sorted(files))
    except FileNotFoundError:
        return None


def _verify(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(run.json, None) if the run directory is whole, else (None, what is wrong)."""
    manifest_path = directory / MANIFEST_FILE
    if manifest_path.exists():
        try:
            listed = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError):
            return None, f"{MANIFEST_FILE} is unreadable"
        for name in DATA_FILES:
            path = directory / name
            entry = listed.get(name) if isinstance(listed, dict) else None
            if not isinstance(entry, dict):
                return None, f"{MANIFEST_FILE} does not list {name}"
            if not path.exists():
                return None, f"{name} is missing"
            size = path.stat().st_size
            if size != entry.get("size"):
                return None, f"{name} has {size} bytes, its manifest says {entry.get('size')}"
            if _sha256(path) != entry.get("sha256"):
                return None, f"{name} does not match its checksum"
    else:
        for name in (RECORDS_FILE, SPECTRA_FILE):
            if not (directory / name).exists():
                return None, f"{name} is missing"
            try:
                pq.read_table(directory / name)
            except (pa.ArrowException, OSError) as error:
                return None, f"{name} is not readable Parquet ({_first_line(error)})"
    if not (directory / RUN_FILE).exists():
        return None, f"{RUN_FILE} is missing"
    try:
        document = json.loads((directory / RUN_FILE).read_text(encoding="utf-8"))
    except ValueError:
        return None, f"{RUN_FILE} is not valid JSON"
    if not isinstance(document, dict) or document.get("run_id") != directory.name:
        return None, f"{RUN_FILE} is not the record of run {directory.name}"
    return document, None


def _write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    staged = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    _write_json(staged, document)
    os.rename(staged, path)


def _write_parquet(path: Path, table: pa.Table) -> None:
    with path.open("wb") as file:
        pq.write_table(table, file)
        file.flush()
        os.fsync(file.fileno())


def _write_json(path: Path, document: dict[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as file:
        json.dump(document, file, indent=2, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]

"""The results store: atomic per-run directories of Parquet files, queried with DuckDB."""

from ntklens.store.store import (
    RECORDS_SCHEMA,
    RUNS_SCHEMA,
    SPECTRA_SCHEMA,
    Store,
    StoreWarning,
    check_writable,
    open,
)

__all__ = [
    "RECORDS_SCHEMA",
    "RUNS_SCHEMA",
    "SPECTRA_SCHEMA",
    "Store",
    "StoreWarning",
    "check_writable",
    "open",
]

"""A disk cache of decoded datasets: float32 inputs and int64 labels as ``.npy`` files,
opened memory-mapped, so that each run of a sweep (each worker process) starts without
decoding, scaling or copying the dataset.

Entries live in ``<user cache>/ntklens-decoded/<name>-<key>/`` (beside the downloads in
``<user cache>/ntklens/``, so deleting it only costs a decode); the key hashes the source files'
resolved paths, sizes and modification times (and :data:`CACHE_VERSION`), so changed or
replaced files get a new entry. An entry is written to a temporary directory and renamed
into place, so readers see whole entries only. Arrays are opened copy-on-write: every load
returns fresh arrays, writable, whose changes never reach the file or other loads. Where
the cache cannot be written or read, the dataset is decoded as if there were none; set
``NTKLENS_DECODED_CACHE=0`` to turn the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ntklens.data.download import user_cache_dir

CACHE_VERSION = 1
CACHE_ENV = "NTKLENS_DECODED_CACHE"
ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")
INDEX_FILE = "index.json"

Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...] | None]


def decoded_cache_dir() -> Path:
    """Where decoded datasets are cached: ``$XDG_CACHE_HOME/ntklens-decoded`` (default
    ``~/.cache/ntklens-decoded``)."""
    return user_cache_dir().with_name("ntklens-decoded")


def cache_key(name: str, sources: Sequence[Path]) -> str:
    """16 hex characters of the SHA-256 of the sources' paths, sizes and mtimes."""
    stamps = []
    for source in sources:
        stat = source.stat()
        stamps.append([str(source.resolve()), stat.st_size, stat.st_mtime_ns])
    text = json.dumps([CACHE_VERSION, name, stamps])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_decode(name: str, sources: Sequence[Path], decode: Callable[[], Decoded]) -> Decoded:
    """The decoded arrays of dataset ``name`` built from ``sources``: from the cache when it
    has them, else from ``decode()`` (then stored for the next load)."""
    if os.environ.get(CACHE_ENV, "1") == "0" or not sources:
        return decode()
    directory = decoded_cache_dir() / f"{name}-{cache_key(name, sources)}"
    cached = _read(directory)
    if cached is not None:
        return cached
    decoded = decode()
    _write(directory, decoded)
    return decoded


def _read(directory: Path) -> Decoded | None:
    """The entry in ``directory``, memory-mapped copy-on-write; None if absent or unusable."""
    try:
        index = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
        arrays = [np.load(directory / f"{n}.npy", mmap_mode="c") for n in ARRAY_NAMES]
    except (OSError, ValueError):
        return None
    shapes = [list(array.shape) for array in arrays]
    dtypes = [str(array.dtype) for array in arrays]
    if shapes != index.get("shapes") or dtypes != index.get("dtypes"):
        return None
    names = index.get("class_names")
    x_train, y_train, x_test, y_test = arrays
    return x_train, y_train, x_test, y_test, tuple(names) if names is not None else None


def _write(directory: Path, decoded: Decoded) -> None:
    """Store an entry atomically; a cache that cannot be written is skipped silently."""
    *arrays, class_names = decoded
    staged = directory.with_name(f".{directory.name}-{uuid.uuid4().hex[:8]}")
    try:
        staged.mkdir(parents=True)
        for name, array in zip(ARRAY_NAMES, arrays, strict=True):
            np.save(staged / f"{name}.npy", np.ascontiguousarray(array))
        index = {
            "shapes": [list(array.shape) for array in arrays],
            "dtypes": [str(array.dtype) for array in arrays],
            "class_names": list(class_names) if class_names is not None else None,
        }
        (staged / INDEX_FILE).write_text(json.dumps(index), encoding="utf-8")
        os.rename(staged, directory)
    except OSError:
        pass  # read-only cache, a full disk, or another process renamed its entry first
    finally:
        shutil.rmtree(staged, ignore_errors=True)

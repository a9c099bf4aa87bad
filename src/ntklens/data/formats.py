"""Readers for the standard on-disk dataset formats: IDX (MNIST family) and CIFAR pickles.

Both readers validate what they parse and raise :class:`~ntklens.errors.DataError` naming
the file when it is truncated, corrupt or not in the expected format.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ntklens.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"

# IDX type code (third byte of the magic number) -> big-endian element type.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

CIFAR_IMAGE_SHAPE = (3, 32, 32)


def read_bytes(path: Path) -> bytes:
    """The contents of ``path``, gunzipped when the file starts with the gzip magic."""
    raw = Path(path).read_bytes()
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"{path}: corrupt or truncated gzip data ({exc}); delete the file and fetch it again"
        ) from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into a read-only array of native byte order.

    The header gives the element type and the number and sizes of the dimensions
    (big-endian uint32), so no shape is assumed.
    """
    path = Path(path)
    data = read_bytes(path)
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file (bad magic number); check the file name")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX element type 0x{type_code:02x}; file is corrupt")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{path}: IDX header truncated; delete the file and fetch it again")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = IDX_DTYPES[type_code]
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path}: IDX payload has {len(data)} bytes but header {shape} needs {expected}; "
            "the file is truncated or corrupt, delete it and fetch it again"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
        array.flags.writeable = False
    return array


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and builtins but refuses any other global.

    CIFAR batches are pickles; refusing arbitrary globals keeps a tampered file from
    running code while still reading the official files.
    """

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def read_pickle(path: str | Path) -> dict:
    """Load a CIFAR-style pickle (``encoding="bytes"``) as a dict with bytes keys."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            content = _ArrayUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{path}: not a valid CIFAR pickle ({exc}); delete it and fetch it again"
        ) from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: CIFAR pickle holds {type(content).__name__}, expected a dict")
    return content


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch: uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``."""
    content = read_pickle(path)
    if b"data" not in content or b"labels" not in content:
        raise DataError(f"{path}: CIFAR batch lacks b'data' or b'labels'; file is corrupt")
    data = np.asarray(content[b"data"], dtype=np.uint8)
    labels = np.asarray(content[b"labels"], dtype=np.int64)
    pixels = int(np.prod(CIFAR_IMAGE_SHAPE))
    if data.ndim != 2 or data.shape[1] != pixels or data.shape[0] != labels.shape[0]:
        raise DataError(
            f"{path}: CIFAR batch data {data.shape} with {labels.shape[0]} labels, expected "
            f"(N, {pixels}) with N labels; file is corrupt"
        )
    return data.reshape(-1, *CIFAR_IMAGE_SHAPE), labels


def read_cifar_label_names(path: str | Path) -> tuple[str, ...]:
    """Class names from a CIFAR ``batches.meta`` pickle."""
    content = read_pickle(path)
    names = content.get(b"label_names")
    if not isinstance(names, list):
        raise DataError(f"{path}: CIFAR meta lacks b'label_names'; file is corrupt")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


NPZ_KEYS = ("x", "y", "x_test", "y_test")


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays ``x``, ``y`` and, if present, ``x_test``, ``y_test`` of a ``.npz`` file.

    Other keys are refused (a typo would otherwise drop the test split silently); pickled
    object arrays are never loaded.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such .npz file; check [data] path")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: holds one array, not an .npz archive; save it with np.savez")
        with archive:
            keys = set(archive.files)
            missing = [key for key in ("x", "y") if key not in keys]
            unknown = sorted(keys - set(NPZ_KEYS))
            if missing or unknown:
                problem = f"lacks {', '.join(missing)}" if missing else f"has keys {unknown}"
                raise DataError(
                    f"{path}: the archive {problem}; save it with np.savez(path, x=..., y=..., "
                    "x_test=..., y_test=...) (the test pair is optional)"
                )
            return {key: archive[key] for key in NPZ_KEYS if key in keys}
    except DataError:
        raise
    except ValueError as error:  # object arrays (allow_pickle=False) or a bad member
        raise DataError(
            f"{path}: cannot read an array ({error}); save plain numeric arrays"
        ) from None
    except (OSError, EOFError, zlib.error, KeyError) as error:
        raise DataError(
            f"{path}: not a readable .npz archive ({error}); save it with np.savez"
        ) from None

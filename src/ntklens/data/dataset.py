"""The in-memory dataset every run trains on, and its preprocessing.

A :class:`Dataset` holds the full train and test splits as torch tensors; subsets and probe
sets are index arrays into it (see :mod:`ntklens.data.subsets`), so one loaded dataset serves
every run of a sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ntklens.data.subsets import stratified_permutation
from ntklens.errors import DataError


@dataclass(frozen=True)
class Dataset:
    """Train and test splits of one classification task.

    ``x_train``/``x_test`` are float32 tensors: images as ``(N, C, H, W)`` scaled to [0, 1],
    vector data as ``(N, d)``. ``y_train``/``y_test`` are int64 class indices in
    ``[0, n_classes)``. Every :func:`~ntklens.data.load_dataset` call returns fresh tensors,
    so changing them in place never alters later loads.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        splits = (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test))
        for split, x, y in splits:
            if x.shape[0] != y.shape[0]:
                raise DataError(
                    f"dataset {self.name!r}: {split} split has {x.shape[0]} inputs but "
                    f"{y.shape[0]} labels; the files are inconsistent, fetch them again"
                )
        if len(self.class_names) != self.n_classes:
            raise DataError(
                f"dataset {self.name!r}: {len(self.class_names)} class names for "
                f"{self.n_classes} classes"
            )


def preprocess(ds: Dataset, *, standardize: bool = True, flatten: bool = False) -> Dataset:
    """Standardize and/or flatten the inputs of ``ds``, returning a new :class:`Dataset`.

    Standardization subtracts the mean and divides by the standard deviation *per channel*
    (axis 1 of ``(N, C, H, W)`` images; a single global channel for ``(N, d)`` vectors),
    with both statistics taken from the training split only, so the test split never
    leaks into training. ``flatten`` reshapes inputs to ``(N, features)`` for MLPs.
    """
    x_train, x_test = ds.x_train, ds.x_test
    if standardize:
        stat_dims = (0, 2, 3) if x_train.ndim == 4 else tuple(range(x_train.ndim))
        train64 = x_train.to(torch.float64)
        mean = train64.mean(dim=stat_dims, keepdim=True)
        std = train64.std(dim=stat_dims, keepdim=True)
        if bool((std == 0).any()):
            raise DataError(
                f"dataset {ds.name!r}: a channel of the training inputs is constant, so it "
                "cannot be standardized; use preprocess(..., standardize=False)"
            )
        x_train = ((train64 - mean) / std).to(x_train.dtype)
        x_test = ((x_test.to(torch.float64) - mean) / std).to(ds.x_test.dtype)
    if flatten:
        x_train = x_train.reshape(x_train.shape[0], -1)
        x_test = x_test.reshape(x_test.shape[0], -1)
    return replace(ds, x_train=x_train, x_test=x_test)


HELD_OUT_FRACTION = 0.2  # of x, y held out as the test split when none is given
HELD_OUT_SEED = 0


def _as_array(value: Any, name: str, source: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:
        raise DataError(
            f"{source}: {name} is not an array ({error}); give numeric arrays"
        ) from None


def dataset_from_arrays(
    name: str,
    x: Any,
    y: Any,
    x_test: Any = None,
    y_test: Any = None,
    *,
    source: str | None = None,
) -> Dataset:
    """A :class:`Dataset` from your arrays (numpy or torch): inputs ``(N, ...)``, integer
    labels ``(N,)`` in ``[0, K)``.

    Inputs become float32 as they are (no rescaling; runs standardize them with training
    statistics). Without ``x_test``/``y_test``, a fixed stratified 20 % of ``x, y`` is held
    out as the test split. ``source`` names the origin in error messages (default ``name``).
    """
    source = source or repr(name)
    if (x_test is None) != (y_test is None):
        raise DataError(f"{source}: give both x_test and y_test or neither")
    arrays = {"x": x, "y": y} | ({} if x_test is None else {"x_test": x_test, "y_test": y_test})
    arrays = {key: _as_array(value, key, source) for key, value in arrays.items()}
    for key, array in arrays.items():
        if key.startswith("x"):
            numeric = np.issubdtype(array.dtype, np.floating) or np.issubdtype(
                array.dtype, np.integer
            )
            if not numeric or array.dtype == np.bool_ or array.ndim < 2:
                raise DataError(
                    f"{source}: {key} has dtype {array.dtype} and shape {array.shape}; inputs "
                    "must be a real-valued array of shape (N, features...)"
                )
        elif array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise DataError(
                f"{source}: {key} has dtype {array.dtype} and shape {array.shape}; labels must "
                "be a 1-D integer array of class indices 0..K-1"
            )
    for split in ("", "_test"):
        if f"x{split}" in arrays and len(arrays[f"x{split}"]) != len(arrays[f"y{split}"]):
            raise DataError(
                f"{source}: x{split} has {len(arrays[f'x{split}'])} rows but y{split} has "
                f"{len(arrays[f'y{split}'])}; give one label per input"
            )
    if "x_test" in arrays and arrays["x_test"].shape[1:] != arrays["x"].shape[1:]:
        raise DataError(
            f"{source}: x_test examples have shape {arrays['x_test'].shape[1:]} but x has "
            f"{arrays['x'].shape[1:]}; both splits need the same example shape"
        )
    labels = np.concatenate([arrays["y"], arrays.get("y_test", arrays["y"][:0])])
    if labels.size == 0 or labels.min() < 0:
        raise DataError(f"{source}: labels must be class indices >= 0 and there must be some")
    for key, array in arrays.items():
        if key.startswith("x") and not np.isfinite(array.astype(np.float64)).all():
            raise DataError(f"{source}: {key} holds NaN or infinite values; clean the inputs")
    n_classes = int(labels.max()) + 1
    if n_classes < 2:
        raise DataError(f"{source}: all labels are 0; a classification task needs >= 2 classes")
    x_all = torch.from_numpy(np.array(arrays["x"], dtype=np.float32))
    y_all = torch.from_numpy(np.array(arrays["y"], dtype=np.int64))
    if "x_test" in arrays:
        x_train, y_train = x_all, y_all
        x_test_t = torch.from_numpy(np.array(arrays["x_test"], dtype=np.float32))
        y_test_t = torch.from_numpy(np.array(arrays["y_test"], dtype=np.int64))
    else:
        n_held = int(len(y_all) * HELD_OUT_FRACTION)
        if n_held < 1 or n_held == len(y_all):
            raise DataError(
                f"{source}: {len(y_all)} examples are too few to hold out a test split; "
                "give x_test and y_test"
            )
        order = stratified_permutation(y_all.numpy(), HELD_OUT_SEED)
        test = torch.from_numpy(np.sort(order[:n_held]))
        train = torch.from_numpy(np.sort(order[n_held:]))
        x_train, y_train, x_test_t, y_test_t = x_all[train], y_all[train], x_all[test], y_all[test]
    class_names = tuple(str(c) for c in range(n_classes))
    return Dataset(name, x_train, y_train, x_test_t, y_test_t, n_classes, class_names)

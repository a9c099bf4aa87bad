"""The in-memory dataset every run trains on, and its preprocessing.

A :class:`Dataset` holds the full train and test splits as torch tensors; subsets and probe
sets are index arrays into it (see :mod:`ntklens.data.subsets`), so one loaded dataset serves
every run of a sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

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

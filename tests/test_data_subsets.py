"""Nested stratified subsets for data scaling, evaluation subsets and probe sets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ntklens.data import (
    evaluation_subset_indices,
    nested_subset_indices,
    probe_indices,
    stratified_permutation,
)
from ntklens.errors import DataError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def shuffled_labels(counts: list[int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


def max_prefix_deviation(order: np.ndarray, labels: np.ndarray) -> float:
    """Largest |count of class c in order[:n] - n·p_c| over all n and c, by brute force."""
    classes, inverse = np.unique(labels, return_inverse=True)
    one_hot = np.eye(classes.size)[inverse[order]]
    n = np.arange(1, order.size + 1)[:, None]
    shares = np.bincount(inverse, minlength=classes.size) / labels.size
    return float(np.abs(one_hot.cumsum(axis=0) - n * shares).max())


@pytest.mark.parametrize(
    "counts",
    [
        [50] * 10,
        [1000, 40, 7, 300],  # strongly skewed
        [3200, 49, 25, 189, 75, 13, 130, 175, 66, 134],
        [1, 1, 97],
    ],
)
def test_every_prefix_is_stratified(counts: list[int]) -> None:
    labels = shuffled_labels(counts, seed=1)
    for seed in (0, 1, 2):
        order = stratified_permutation(labels, seed)
        np.testing.assert_array_equal(np.sort(order), np.arange(labels.size))
        assert max_prefix_deviation(order, labels) < 1.0


def test_mnist_sized_labels_are_stratified_at_every_size() -> None:
    labels = shuffled_labels(MNIST_TRAIN_COUNTS, seed=0)
    assert max_prefix_deviation(stratified_permutation(labels, 3), labels) < 1.0


def test_subsets_are_nested_prefixes() -> None:
    labels = shuffled_labels([120, 80, 200], seed=4)
    sizes = [5, 17, 64, 250, 400]
    subsets = [nested_subset_indices(labels, n, seed=7) for n in sizes]
    for small, large in itertools.pairwise(subsets):
        np.testing.assert_array_equal(large[: small.size], small)
        assert set(small) <= set(large)
    assert all(s.size == n and np.unique(s).size == n for s, n in zip(subsets, sizes, strict=True))


def test_subsets_depend_on_seed_only() -> None:
    labels = shuffled_labels([30, 30, 30], seed=0)
    np.testing.assert_array_equal(
        nested_subset_indices(labels, 20, seed=5), nested_subset_indices(labels, 20, seed=5)
    )
    np.testing.assert_array_equal(
        nested_subset_indices(torch.from_numpy(labels), 20, seed=5),
        nested_subset_indices(labels, 20, seed=5),
    )
    assert set(nested_subset_indices(labels, 20, seed=5)) != set(
        nested_subset_indices(labels, 20, seed=6)
    )


def test_subset_larger_than_dataset_is_one_line_error() -> None:
    labels = shuffled_labels([10, 10], seed=0)
    with pytest.raises(DataError, match=r"n=21 is larger than the 20 examples available") as info:
        nested_subset_indices(labels, 21, seed=0)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="n_test=50"):
        evaluation_subset_indices(labels, 50)
    with pytest.raises(DataError, match="positive integer"):
        nested_subset_indices(labels, 0, seed=0)
    with pytest.raises(DataError, match="seed=-1"):
        nested_subset_indices(labels, 5, seed=-1)
    with pytest.raises(DataError, match="1-D integer"):
        nested_subset_indices(np.zeros((4, 2), dtype=int), 2, seed=0)


def test_evaluation_subset_is_stratified_and_fixed() -> None:
    labels = shuffled_labels([600, 300, 100], seed=2)
    chosen = evaluation_subset_indices(labels, 100, seed=0)
    np.testing.assert_array_equal(chosen, evaluation_subset_indices(labels, 100, seed=0))
    np.testing.assert_array_equal(np.bincount(labels[chosen]), [60, 30, 10])


@pytest.mark.parametrize(("n_probe", "expected"), [(30, [10, 10, 10]), (32, [11, 11, 10])])
def test_probe_set_is_class_balanced(n_probe: int, expected: list[int]) -> None:
    labels = shuffled_labels([500, 40, 90], seed=3)
    probe = probe_indices(labels, n_probe, seed=0)
    assert probe.size == n_probe and np.unique(probe).size == n_probe
    np.testing.assert_array_equal(np.bincount(labels[probe]), expected)
    assert np.all(np.diff(labels[probe]) >= 0)  # grouped by class


def test_probe_set_is_fixed_by_seed() -> None:
    labels = shuffled_labels([50, 50, 50, 50], seed=0)
    np.testing.assert_array_equal(probe_indices(labels, 20, 3), probe_indices(labels, 20, 3))
    assert set(probe_indices(labels, 20, 3)) != set(probe_indices(labels, 20, 4))


def test_probe_set_too_large_for_a_class() -> None:
    labels = shuffled_labels([50, 4, 50], seed=0)
    with pytest.raises(DataError, match="needs 10 examples of class 1, which has only 4"):
        probe_indices(labels, 30, seed=0)

"""Nested, class-stratified subsets for data scaling, and class-balanced probe sets.

The size-``n`` training subset is the first ``n`` entries of one seeded stratified
permutation, so for a fixed seed every smaller subset lies inside every larger one and a
data-scaling curve adds examples instead of redrawing them. The permutation interleaves the
classes so that *every* prefix is stratified: class ``c`` appears within one of
``n · n_c / N`` times (strictly less than one away), whatever the class sizes.
"""

from __future__ import annotations

import heapq
from functools import lru_cache

import numpy as np
import torch

from ntklens.errors import DataError

PROBE_STREAM = 1  # keeps probe draws independent of the subset permutation of the same seed


def _as_labels(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    array = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"labels must be a non-empty 1-D integer array, got shape {array.shape} of "
            f"{array.dtype}; pass the dataset's y_train or y_test"
        )
    return array


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"seed={seed!r} must be a non-negative integer")
    return int(seed)


@lru_cache(maxsize=16)
def _interleaved_classes(counts: tuple[int, ...], priority: tuple[int, ...]) -> np.ndarray:
    """The class of each position of a sequence whose every prefix is stratified.

    Every prefix count stays strictly within one of its quota ``p · n_c / N`` exactly when
    the j-th item (1-based) of class c sits at a 1-based position p inside the window
    ``floor((j-1)·N/n_c) + 1 <= p <= ceil(j·N/n_c)``. Such a sequence exists (Tijdeman's
    chairman assignment theorem), and filling each position with the released item of
    earliest deadline finds one, since that rule is optimal for unit jobs. Ties go to
    the class with the lower ``priority``.
    """
    total = sum(counts)
    placed = [0] * len(counts)
    waiting = [(0, c) for c in range(len(counts))]  # (release - 1, class), a heap
    ready: list[tuple[int, int, int]] = []  # (deadline, priority, class)
    sequence = np.empty(total, dtype=np.int64)
    for position in range(1, total + 1):
        while waiting and waiting[0][0] < position:
            _, c = heapq.heappop(waiting)
            deadline = -(-(placed[c] + 1) * total // counts[c])
            heapq.heappush(ready, (deadline, priority[c], c))
        _, _, c = heapq.heappop(ready)
        sequence[position - 1] = c
        placed[c] += 1
        if placed[c] < counts[c]:
            heapq.heappush(waiting, (placed[c] * total // counts[c], c))
    sequence.flags.writeable = False
    return sequence


def _grouped_shuffle(inverse: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices shuffled by ``rng``, then stably grouped by class (class 0 first)."""
    order = rng.permutation(inverse.size)
    return order[np.argsort(inverse[order], kind="stable")]


def stratified_permutation(labels: np.ndarray | torch.Tensor, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(len(labels))`` whose every prefix is stratified.

    Within each class the order is a seeded shuffle; across classes, positions follow
    :func:`_interleaved_classes`, so each prefix of length n holds each class within one
    of its share ``n · n_c / N``.
    """
    labels = _as_labels(labels)
    rng = np.random.default_rng(_check_seed(seed))
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    priority = tuple(int(p) for p in rng.permutation(counts.size))
    sequence = _interleaved_classes(tuple(int(n) for n in counts), priority)
    grouped = _grouped_shuffle(inverse, rng)
    class_starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    by_class_positions = np.argsort(sequence, kind="stable")
    rank_in_class = np.empty_like(sequence)
    rank_in_class[by_class_positions] = (
        np.arange(sequence.size) - class_starts[sequence[by_class_positions]]
    )
    return grouped[class_starts[sequence] + rank_in_class]


def _stratified_prefix(
    labels: np.ndarray | torch.Tensor, n: int, seed: int, argument: str
) -> np.ndarray:
    available = _as_labels(labels).size
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise DataError(f"{argument}={n!r} must be a positive integer")
    if n > available:
        raise DataError(
            f"{argument}={n} is larger than the {available} examples available; "
            f"choose {argument} <= {available}"
        )
    return stratified_permutation(labels, seed)[:n]


def nested_subset_indices(labels: np.ndarray | torch.Tensor, n: int, seed: int) -> np.ndarray:
    """Indices of the size-``n`` training subset: a prefix of the seed's stratified permutation.

    For one seed, the subset of size n is contained in that of every larger size.
    """
    return _stratified_prefix(labels, n, seed, "n")


def evaluation_subset_indices(
    labels: np.ndarray | torch.Tensor, n_test: int, seed: int = 0
) -> np.ndarray:
    """A fixed, seeded, stratified subset of ``n_test`` test examples (same construction)."""
    return _stratified_prefix(labels, n_test, seed, "n_test")


def probe_indices(labels: np.ndarray | torch.Tensor, n_probe: int, seed: int) -> np.ndarray:
    """A class-balanced probe set of ``n_probe`` indices, fixed by ``seed``.

    Each class gets ``n_probe // K`` examples; the remainder goes one each to the classes
    with the smallest labels. Indices are grouped by class (smallest label first) so the
    kernel on the probe set shows its class blocks. The draw uses a stream independent of
    :func:`stratified_permutation` for the same seed.
    """
    labels = _as_labels(labels)
    if isinstance(n_probe, bool) or not isinstance(n_probe, int | np.integer) or n_probe < 1:
        raise DataError(f"n_probe={n_probe!r} must be a positive integer")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    base, extra = divmod(int(n_probe), classes.size)
    wanted = base + (np.arange(classes.size) < extra)
    short = np.flatnonzero(wanted > counts)
    if short.size:
        c = short[0]
        raise DataError(
            f"n_probe={n_probe} needs {wanted[c]} examples of class {classes[c]}, which has "
            f"only {counts[c]}; lower n_probe or take the probes from the other split"
        )
    rng = np.random.default_rng([_check_seed(seed), PROBE_STREAM])
    grouped = _grouped_shuffle(inverse, rng)
    class_starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return np.concatenate(
        [grouped[start : start + m] for start, m in zip(class_starts, wanted, strict=True)]
    )

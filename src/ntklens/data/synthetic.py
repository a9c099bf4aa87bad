"""A synthetic teacher-student classification task with tunable difficulty.

Inputs are standard Gaussian vectors ``x ∈ R^d``; the label is the argmax of a fixed random
one-hidden-layer teacher ``f(x) = W₂ tanh(difficulty · W₁ x / √d) − b``. For small
``difficulty`` the tanh is nearly linear and the classes are separated by hyperplanes; as
it grows the hidden units saturate and the boundaries bend, so the task gets harder for a
student. The offsets ``b`` are tuned on a calibration sample so the classes are nearly
balanced. Everything is a deterministic function of the options.
"""

from __future__ import annotations

import numpy as np
import torch

from ntklens.data.dataset import Dataset
from ntklens.errors import DataError

TEACHER_HIDDEN = 64
CALIBRATION_SIZE = 8_192
BALANCE_STEPS = 100


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DataError(f"teacher option {name}={value!r} must be an integer >= {minimum}")
    return int(value)


def _balancing_offsets(logits: np.ndarray) -> np.ndarray:
    """Per-class offsets that make ``argmax(logits - offsets)`` close to uniform."""
    n_classes = logits.shape[1]
    offsets = np.zeros(n_classes)
    step = logits.std()
    for _ in range(BALANCE_STEPS):
        counts = np.bincount((logits - offsets).argmax(axis=1), minlength=n_classes)
        offsets += step * (counts / logits.shape[0] - 1.0 / n_classes)
        step *= 0.95
    return offsets


def teacher_task(
    *,
    input_dim: int = 16,
    n_classes: int = 4,
    difficulty: float = 1.0,
    n_train: int = 10_000,
    n_test: int = 2_000,
    seed: int = 0,
) -> Dataset:
    """The teacher-student dataset: x float32 ``(N, input_dim)``, labels in ``[0, n_classes)``.

    Teacher, calibration, train and test inputs come from separate streams of ``seed``, so
    the teacher and test set do not depend on ``n_train``, and a larger ``n_train`` extends
    a smaller one.
    """
    input_dim = _check_int("input_dim", input_dim, 1)
    n_classes = _check_int("n_classes", n_classes, 2)
    n_train = _check_int("n_train", n_train, 1)
    n_test = _check_int("n_test", n_test, 1)
    seed = _check_int("seed", seed, 0)
    if isinstance(difficulty, bool) or not isinstance(difficulty, int | float) or difficulty <= 0:
        raise DataError(f"teacher option difficulty={difficulty!r} must be a positive number")

    teacher_rng, calibration_rng, train_rng, test_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    w1 = teacher_rng.standard_normal((TEACHER_HIDDEN, input_dim))
    w2 = teacher_rng.standard_normal((n_classes, TEACHER_HIDDEN)) / np.sqrt(TEACHER_HIDDEN)

    def logits(x: np.ndarray) -> np.ndarray:
        return np.tanh(difficulty * x @ w1.T / np.sqrt(input_dim)) @ w2.T / difficulty

    calibration = calibration_rng.standard_normal((CALIBRATION_SIZE, input_dim))
    offsets = _balancing_offsets(logits(calibration))
    x_train = train_rng.standard_normal((n_train, input_dim))
    x_test = test_rng.standard_normal((n_test, input_dim))
    return Dataset(
        name="teacher",
        x_train=torch.from_numpy(x_train.astype(np.float32)),
        y_train=torch.from_numpy((logits(x_train) - offsets).argmax(axis=1).astype(np.int64)),
        x_test=torch.from_numpy(x_test.astype(np.float32)),
        y_test=torch.from_numpy((logits(x_test) - offsets).argmax(axis=1).astype(np.int64)),
        n_classes=n_classes,
        class_names=tuple(f"class {c}" for c in range(n_classes)),
    )

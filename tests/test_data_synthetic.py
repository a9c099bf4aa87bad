"""The teacher-student task, scikit-learn digits, preprocessing and the Dataset checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from ntklens.data import Dataset, load_dataset, preprocess, teacher_task
from ntklens.errors import DataError


def linear_test_accuracy(ds: Dataset) -> float:
    """How well a linear classifier (an independent yardstick) solves the task."""
    model = LogisticRegression(max_iter=2000).fit(ds.x_train.numpy(), ds.y_train.numpy())
    return model.score(ds.x_test.numpy(), ds.y_test.numpy())


def test_teacher_is_deterministic_and_seeded() -> None:
    a = teacher_task(n_train=300, n_test=100, seed=3)
    b = load_dataset("teacher", n_train=300, n_test=100, seed=3)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    c = teacher_task(n_train=300, n_test=100, seed=4)
    assert not torch.equal(a.x_train, c.x_train) and not torch.equal(a.y_train, c.y_train)
    assert a.x_train.shape == (300, 16) and a.x_train.dtype == torch.float32
    assert a.y_train.dtype == torch.int64 and a.n_classes == 4


def test_teacher_larger_train_set_extends_smaller() -> None:
    small = teacher_task(input_dim=5, n_train=50, n_test=40, seed=1)
    large = teacher_task(input_dim=5, n_train=120, n_test=40, seed=1)
    assert torch.equal(large.x_train[:50], small.x_train)
    assert torch.equal(large.y_train[:50], small.y_train)
    assert torch.equal(large.y_test, small.y_test)


@pytest.mark.parametrize("n_classes", [2, 5])
def test_teacher_classes_are_balanced(n_classes: int) -> None:
    ds = teacher_task(n_classes=n_classes, n_train=5000, n_test=10, difficulty=2.0, seed=0)
    shares = np.bincount(ds.y_train.numpy(), minlength=n_classes) / 5000
    np.testing.assert_allclose(shares, 1 / n_classes, atol=0.03)


def test_teacher_difficulty_bends_the_boundary() -> None:
    options = {"input_dim": 8, "n_classes": 3, "n_train": 3000, "n_test": 1000, "seed": 2}
    easy = linear_test_accuracy(teacher_task(difficulty=0.05, **options))
    hard = linear_test_accuracy(teacher_task(difficulty=8.0, **options))
    assert easy > 0.95
    assert hard < easy - 0.1


def test_teacher_option_errors() -> None:
    with pytest.raises(DataError, match="unknown teacher option"):
        load_dataset("teacher", width=3)
    with pytest.raises(DataError, match="difficulty=0"):
        teacher_task(difficulty=0)
    with pytest.raises(DataError, match="n_classes=1"):
        teacher_task(n_classes=1)


def test_digits_split_and_scale() -> None:
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1497, 1, 8, 8) and ds.x_test.shape == (300, 1, 8, 8)
    reference = load_digits()
    shares = np.bincount(reference.target) / reference.target.size
    assert np.all(np.abs(np.bincount(ds.y_test.numpy()) - 300 * shares) < 1)
    # together the splits are exactly sklearn's images / 16, with their labels
    ours = np.concatenate([ds.x_train.numpy(), ds.x_test.numpy()]).reshape(1797, 64)
    ours_labels = np.concatenate([ds.y_train.numpy(), ds.y_test.numpy()])
    theirs = (reference.images / 16.0).reshape(1797, 64).astype(np.float32)
    ours_rows = sorted(zip(map(bytes, ours), ours_labels, strict=True))
    theirs_rows = sorted(zip(map(bytes, theirs), reference.target, strict=True))
    assert ours_rows == theirs_rows
    assert float(ds.x_train.max()) == 1.0 and float(ds.x_train.min()) == 0.0


def toy_images(seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    scales = np.array([1.0, 3.0, 0.5])[None, :, None, None]
    offsets = np.array([0.2, -1.0, 4.0])[None, :, None, None]
    x_train = rng.standard_normal((40, 3, 4, 4)) * scales + offsets
    x_test = rng.standard_normal((10, 3, 4, 4)) * scales + offsets
    return Dataset(
        name="toy",
        x_train=torch.from_numpy(x_train),
        y_train=torch.zeros(40, dtype=torch.int64),
        x_test=torch.from_numpy(x_test),
        y_test=torch.zeros(10, dtype=torch.int64),
        n_classes=1,
        class_names=("only",),
    )


def test_preprocess_standardizes_per_channel_with_train_statistics() -> None:
    ds = toy_images(0)
    out = preprocess(ds)
    train = ds.x_train.numpy()
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True, ddof=1)
    np.testing.assert_allclose(out.x_train.numpy(), (train - mean) / std, atol=1e-12)
    np.testing.assert_allclose(out.x_test.numpy(), (ds.x_test.numpy() - mean) / std, atol=1e-12)
    assert out.x_test.numpy().mean() != pytest.approx(0.0, abs=1e-9)  # test stats unused


def test_preprocess_flattens_and_treats_vectors_as_one_channel() -> None:
    flat = preprocess(toy_images(1), standardize=False, flatten=True)
    assert flat.x_train.shape == (40, 48) and flat.x_test.shape == (10, 48)
    vectors = preprocess(flat)
    assert float(vectors.x_train.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(vectors.x_train.std()) == pytest.approx(1.0, abs=1e-12)


def test_preprocess_rejects_constant_channel() -> None:
    ds = toy_images(2)
    ds.x_train[:, 1] = 0.5
    with pytest.raises(DataError, match="constant"):
        preprocess(ds)


def test_dataset_rejects_mismatched_split() -> None:
    with pytest.raises(DataError, match="train split has 3 inputs but 2 labels"):
        Dataset(
            "bad", torch.zeros(3, 2), torch.zeros(2), torch.zeros(1, 2), torch.zeros(1), 1, ("a",)
        )

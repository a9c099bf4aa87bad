"""Kernel-regression baselines: what the network would reach if its kernel never moved.

Both baselines regress one-hot targets with the MSE of :mod:`ntklens.train.losses` on the
run's training subset, with the scalar kernel ``k`` of ``eNTK ≈ k ⊗ I_K``:

* ``kernel0``: the run's step-0 eNTK, ``k = Tr_K Θ₀ / K``, including the initial function,
  ``f_lin(x) = f₀(x) + k(x, X) (k(X, X) + λ I)⁻¹ (Y − f₀(X))``: the linearized network
  trained to convergence by gradient flow on MSE.
* ``infinite``: the closed-form infinite-width NTK of :mod:`ntklens.infinite` (a mean
  predictor, ``f₀ = 0``), where the model has one.

The ridge is relative: ``λ = ridge · mean(diag k(X, X))``, so one ``ridge`` means the same
regularization for any kernel scale (and any width or parameterization).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import scipy.linalg
import torch
from torch import nn

from ntklens.kernel import ntk
from ntklens.observables import kernel_observables_and_spectrum
from ntklens.schema import Spectrum
from ntklens.train.losses import mse_loss, one_hot
from ntklens.train.probes import Split

KernelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ridge_solve(k_train: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    """``(k + ridge · mean(diag k) · I)⁻¹ rhs`` in float64.

    A Cholesky solve; if the regularized kernel is not numerically positive definite (the
    factorization fails, or its pivots span more than 1/(n·ε), the condition number past
    which the solve is noise), a least-squares (SVD) solve, the minimum-norm solution.
    One copy of ``k`` is made and factored in place: at n = 16,000 each copy is 2 GB.
    """
    k = np.asarray(k_train, dtype=np.float64)

    def regularized() -> np.ndarray:
        copy = np.array(k, dtype=np.float64, order="F")
        copy.flat[:: len(copy) + 1] += ridge * float(np.mean(np.diag(k)))
        return copy

    size = k.shape[0]
    try:
        factor, lower = scipy.linalg.cho_factor(regularized(), lower=True, overwrite_a=True)
    except np.linalg.LinAlgError:
        return scipy.linalg.lstsq(regularized(), rhs, overwrite_a=True)[0]
    pivots = np.abs(np.diag(factor))
    if (pivots.min() / pivots.max()) ** 2 < size * np.finfo(np.float64).eps:
        del factor
        return scipy.linalg.lstsq(regularized(), rhs, overwrite_a=True)[0]
    return scipy.linalg.cho_solve((factor, lower), rhs)


def kernel_regression(
    k_train: np.ndarray,
    k_test_train: np.ndarray,
    y_train: np.ndarray,
    *,
    ridge: float,
    f0_train: np.ndarray | None = None,
    f0_test: np.ndarray | None = None,
) -> np.ndarray:
    """Test predictions ``f₀(X*) + k(X*, X)(k(X, X) + λI)⁻¹(Y − f₀(X))`` (f₀ = 0 if None)."""
    residual = y_train if f0_train is None else y_train - f0_train
    predictions = np.asarray(k_test_train, dtype=np.float64) @ ridge_solve(k_train, residual, ridge)
    return predictions if f0_test is None else predictions + f0_test


def _score(prefix: str, predictions: np.ndarray, test: Split, n_classes: int) -> dict[str, float]:
    """MSE against one-hot targets and accuracy, as ``<prefix>_test_loss``/``_test_acc``."""
    outputs = torch.from_numpy(predictions)
    labels = test.labels.cpu()
    loss = mse_loss(outputs, one_hot(labels, n_classes, torch.float64))
    accuracy = (outputs.argmax(dim=1) == labels).double().mean()
    return {f"{prefix}_test_loss": float(loss), f"{prefix}_test_acc": float(accuracy)}


#: Working memory of the step-0 kernel beyond its own output: room to keep every sample's
#: layer-wise features (3 GB at n = 16000 for a width-1024 MLP in float64). Under ntk's
#: default 2 GiB, which counts the output, a 2 GB kernel left tiles of 50 samples whose
#: features were recomputed for every pair of tiles: hours instead of minutes.
KERNEL_WORK_BYTES = 4 * 2**30


def kernel_budget(n_train: int, n_test: int) -> int:
    """The memory budget of the baseline's ntk calls: its float64 kernels plus working room."""
    return 8 * n_train * (n_train + n_test) + KERNEL_WORK_BYTES


def kernel0_baseline(
    initial_model: nn.Module, train: Split, test: Split, n_classes: int, ridge: float
) -> dict[str, float]:
    """Test loss and accuracy of the linearized initial network, trained to convergence.

    Kernels and outputs are computed in float64 from a copy of ``initial_model``.
    """
    model = copy.deepcopy(initial_model).to(torch.float64)
    x_train, x_test = train.x.to(torch.float64), test.x.to(torch.float64)
    budget = kernel_budget(len(x_train), len(x_test))
    k_train = ntk(model, x_train, output="trace", memory_budget=budget).div_(n_classes)
    k_test_train = ntk(model, x_test, x_train, output="trace", memory_budget=budget)
    k_test_train.div_(n_classes)
    model.eval()
    with torch.no_grad():
        f0_train, f0_test = model(x_train), model(x_test)
    predictions = kernel_regression(
        k_train.cpu().numpy(),
        k_test_train.cpu().numpy(),
        one_hot(train.labels, n_classes, torch.float64).cpu().numpy(),
        ridge=ridge,
        f0_train=f0_train.cpu().numpy(),
        f0_test=f0_test.cpu().numpy(),
    )
    return _score("kernel0", predictions, test, n_classes)


def infinite_baseline(
    kernel_fn: KernelFn, train: Split, test: Split, n_classes: int, ridge: float
) -> dict[str, float]:
    """Test loss and accuracy of kernel regression with the infinite-width NTK."""
    k_train = kernel_fn(train.x, train.x)
    k_test_train = kernel_fn(test.x, train.x)
    predictions = kernel_regression(
        k_train.cpu().numpy(),
        k_test_train.cpu().numpy(),
        one_hot(train.labels, n_classes, torch.float64).cpu().numpy(),
        ridge=ridge,
    )
    return _score("infinite", predictions, test, n_classes)


def infinite_probe(
    kernel_fn: KernelFn,
    probe_x: torch.Tensor,
    n_classes: int,
    *,
    kernel_output: str,
    targets: torch.Tensor,
    reference: torch.Tensor | None,
) -> tuple[dict[str, float], Spectrum]:
    """``infinite_ntk_<key>`` observables and the spectrum of the infinite-width NTK on the
    probe set, in the eNTK's layout (``K · Θ∞`` for a trace kernel, ``Θ∞ ⊗ I_K`` for a full
    one), with change keys against the step-0 eNTK ``reference``."""
    per_output = kernel_fn(probe_x, probe_x).to(torch.float64).cpu()
    if kernel_output == "full":
        kernel = torch.kron(per_output, torch.eye(n_classes, dtype=torch.float64))
    else:
        kernel = n_classes * per_output
    observables, spectrum = kernel_observables_and_spectrum(kernel, targets, reference)
    values = {f"infinite_ntk_{key}": value for key, value in observables.items()}
    return values, Spectrum(step=0, kind="infinite", values=spectrum)

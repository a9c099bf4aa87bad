"""How a kernel lines up with the targets and how far it has moved from a reference kernel.

Kernels follow :mod:`ntklens.observables.spectrum`: square 2-D (a trace kernel or a flattened
full kernel with row index ``i*K + a``) or 4-D (N, K, N, K). All inner products and norms
are Frobenius. A ratio with a zero norm in its denominator is undefined and comes back NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ntklens.errors import NtkLensError
from ntklens.observables.spectrum import KernelLike, as_kernel_matrix


def _target_matrix(
    targets: torch.Tensor | np.ndarray, size: int, device: torch.device
) -> torch.Tensor:
    """Targets as a float64 (n, c) matrix with one row per kernel row.

    Accepts (n,) and (n, c); for a flattened full kernel (n = N*K) also (N, K) targets, which
    are flattened row-major to match the kernel's row index ``i*K + a``. Integer (N,) targets
    are class labels and become one-hot rows (see :func:`_one_hot_labels`).
    """
    y = torch.as_tensor(targets, device=device)
    if y.ndim == 1 and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
        y = _one_hot_labels(y, size)
    y = y.to(torch.float64)
    if y.ndim == 1 and y.shape[0] == size:
        return y[:, None]
    if y.ndim == 2 and y.shape[0] == size:
        return y
    if y.ndim == 2 and y.numel() == size:
        return y.reshape(size, 1)
    raise NtkLensError(
        f"targets must have shape (n,) or (n, c) with n = {size} kernel rows, or (N, K) with "
        f"N*K = {size} for a flattened full kernel; got shape {tuple(y.shape)}"
    )


def _one_hot_labels(labels: torch.Tensor, size: int) -> torch.Tensor:
    """Integer class labels (N,) as one-hot targets: (N, C) rows with C = max label + 1 for a
    trace kernel (N = n; the label count does not change YYᵀ), or the flattened (N*K,)
    one-hot vector with index ``i*K + a`` for a flattened full kernel (n = N*K)."""
    if len(labels) == 0 or int(labels.min()) < 0:
        raise NtkLensError(
            "integer targets are class labels and must be >= 0; pass float targets to regress"
        )
    if len(labels) == size:
        return torch.nn.functional.one_hot(labels.long(), int(labels.max()) + 1)
    n_outputs = size // len(labels)
    if n_outputs * len(labels) != size or int(labels.max()) >= n_outputs:
        raise NtkLensError(
            f"integer class labels of length {len(labels)} fit neither a trace kernel with "
            f"{size} rows nor a full one with {size} = N*K rows and labels < K; pass labels "
            "for the kernel's inputs"
        )
    return torch.nn.functional.one_hot(labels.long(), n_outputs).reshape(-1)


def _centered(matrix: torch.Tensor) -> torch.Tensor:
    """H Θ H with H = I − 11ᵀ/n: the kernel with row, column and grand means removed."""
    return matrix - matrix.mean(0, keepdim=True) - matrix.mean(1, keepdim=True) + matrix.mean()


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def kernel_target_alignment(
    k: KernelLike, targets: torch.Tensor | np.ndarray, *, centered: bool = False
) -> float:
    """⟨Θ, YYᵀ⟩ / (‖Θ‖ ‖YYᵀ‖); centered applies H = I − 11ᵀ/n to both (Cortes et al. 2012).

    ``targets`` are float values (n,) or (n, c), or integer class labels (N,), which become
    one-hot targets (never one regression target 0, 1, 2, ...); a full kernel's labels are
    one-hot over its K outputs.
    """
    matrix = as_kernel_matrix(k)
    y = _target_matrix(targets, matrix.shape[0], matrix.device)
    if not bool(torch.isfinite(y).all()):
        raise NtkLensError("targets has NaN or infinite entries; pass finite target values")
    if centered:
        matrix = _centered(matrix)
        y = y - y.mean(0, keepdim=True)
    inner = float(((matrix @ y) * y).sum())
    target_norm = float(torch.linalg.matrix_norm(y.mT @ y))
    return _ratio(inner, float(torch.linalg.matrix_norm(matrix)) * target_norm)


def _matched_pair(k: KernelLike, reference: KernelLike) -> tuple[torch.Tensor, torch.Tensor]:
    matrix = as_kernel_matrix(k)
    reference_matrix = as_kernel_matrix(reference, "reference").to(matrix.device)
    if reference_matrix.shape != matrix.shape:
        raise NtkLensError(
            f"reference must have the same shape as k, {tuple(matrix.shape)}; got "
            f"{tuple(reference_matrix.shape)} (measure both on the same probe set)"
        )
    return matrix, reference_matrix


def kernel_change(k: KernelLike, reference: KernelLike) -> float:
    """‖Θ − Θ₀‖ / ‖Θ₀‖: the relative distance moved from the reference kernel Θ₀."""
    matrix, reference_matrix = _matched_pair(k, reference)
    distance = float(torch.linalg.matrix_norm(matrix - reference_matrix))
    return _ratio(distance, float(torch.linalg.matrix_norm(reference_matrix)))


def kernel_cosine_change(k: KernelLike, reference: KernelLike) -> float:
    """1 − ⟨Θ₀, Θ⟩ / (‖Θ₀‖ ‖Θ‖): the change in direction only, blind to rescaling."""
    matrix, reference_matrix = _matched_pair(k, reference)
    norms = float(torch.linalg.matrix_norm(matrix)) * float(
        torch.linalg.matrix_norm(reference_matrix)
    )
    return 1.0 - _ratio(float((matrix * reference_matrix).sum()), norms)

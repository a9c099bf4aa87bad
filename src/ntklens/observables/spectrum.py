"""Spectral observables of a kernel: trace, eigenvalues, entropies and effective ranks.

A kernel is a square 2-D tensor or array: a trace kernel (N, N) or a flattened full kernel
(N*K, N*K) with row index ``i*K + a``. A 4-D full kernel (N, K, N, K) is flattened first.
Results are Python floats or float64 numpy arrays. Quantities that a zero kernel leaves
undefined (entropies, ranks) come back as NaN instead of raising, so that a probe of a dead
network is recorded rather than aborting its run.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
import torch

from ntklens.errors import NtkLensError

KernelLike = torch.Tensor | np.ndarray


def as_kernel_matrix(k: KernelLike, name: str = "k") -> torch.Tensor:
    """``k`` as a finite float64 square matrix; a 4-D (N, K, N, K) kernel becomes (N*K, N*K)."""
    matrix = torch.as_tensor(k)
    if matrix.ndim == 4:
        n1, k1, n2, k2 = matrix.shape
        if (n1, k1) != (n2, k2):
            raise NtkLensError(
                f"{name} must be a full kernel (N, K, N, K) over one input set; "
                f"got shape {tuple(matrix.shape)}"
            )
        matrix = matrix.reshape(n1 * k1, n2 * k2)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise NtkLensError(
            f"{name} must be a non-empty square 2-D kernel or a 4-D (N, K, N, K) full kernel; "
            f"got shape {tuple(matrix.shape)}"
        )
    if matrix.is_complex():
        raise NtkLensError(f"{name} must be a real kernel; got dtype {matrix.dtype}")
    matrix = matrix.to(torch.float64)
    # One reduction instead of an elementwise mask: any NaN or inf entry makes the sum so.
    if not math.isfinite(float(matrix.sum())):
        raise NtkLensError(
            f"{name} has NaN or infinite entries; check the run that produced it for divergence"
        )
    return matrix


def trace(k: KernelLike) -> float:
    """Tr Θ, the sum of the diagonal."""
    return float(as_kernel_matrix(k).diagonal().sum())


def trace_per_size(k: KernelLike) -> float:
    """Tr Θ / n for an n×n kernel: the mean diagonal entry, comparable across probe sizes."""
    matrix = as_kernel_matrix(k)
    return float(matrix.diagonal().sum()) / matrix.shape[0]


def eigenvalues(k: KernelLike) -> np.ndarray:
    """Eigenvalues of the symmetric part of ``k``: float64, clipped at 0, descending."""
    matrix = as_kernel_matrix(k)
    symmetric = (matrix + matrix.mT) / 2
    values = torch.linalg.eigvalsh(symmetric).clamp_min(0.0).flip(0)
    return values.cpu().numpy()


def cosine_normalized(k: KernelLike) -> torch.Tensor:
    """Θ_ij / √(Θ_ii Θ_jj): the kernel with unit diagonal (rows with Θ_ii = 0 become zero)."""
    matrix = as_kernel_matrix(k)
    root_diagonal = matrix.diagonal().clamp_min(0.0).sqrt()
    inverse = torch.where(root_diagonal > 0, 1.0 / root_diagonal, 0.0)
    return matrix * inverse[:, None] * inverse[None, :]


def shannon_entropy(weights: np.ndarray) -> float:
    """−Σ p ln p with p = w / Σw (0·ln 0 = 0), e.g. of a spectrum; NaN if all w are zero."""
    clipped = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    if clipped.sum() <= 0:
        return math.nan
    return float(scipy.stats.entropy(clipped))


def normalized_entropy(entropy: float, size: int) -> float:
    """An entropy divided by its maximum ln n, so that 1 means a flat spectrum."""
    return entropy / math.log(size) if size > 1 else math.nan


def participation_ratio_of_spectrum(values: np.ndarray) -> float:
    """(Σλ)² / Σλ²; NaN for an all-zero spectrum."""
    clipped = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    squares = float(np.sum(clipped**2))
    return float(clipped.sum()) ** 2 / squares if squares > 0 else math.nan


def von_neumann_entropy(
    k: KernelLike, *, cosine_normalize: bool = False, normalize: bool = False
) -> float:
    """Entropy of the spectrum p = λ/Σλ, optionally of the cosine-normalized kernel, or / ln n."""
    matrix = cosine_normalized(k) if cosine_normalize else as_kernel_matrix(k)
    entropy = shannon_entropy(eigenvalues(matrix))
    return normalized_entropy(entropy, matrix.shape[0]) if normalize else entropy


def diagonal_entropy(k: KernelLike) -> float:
    """Entropy of m_i = √Θ_ii / Σ_j √Θ_jj: how evenly the kernel weighs the inputs."""
    root_diagonal = as_kernel_matrix(k).diagonal().clamp_min(0.0).sqrt()
    return shannon_entropy(root_diagonal.cpu().numpy())


def effective_rank(k: KernelLike) -> float:
    """exp(S), the number of equally weighted modes with the kernel's spectral entropy S."""
    return math.exp(von_neumann_entropy(k))


def participation_ratio(k: KernelLike) -> float:
    """(Σλ)² / Σλ², an effective rank that weighs the large eigenvalues most."""
    return participation_ratio_of_spectrum(eigenvalues(k))

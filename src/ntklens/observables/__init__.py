"""Observables of a kernel: spectrum, entropies, alignment, change, spectral position.

Pure functions of a kernel (or, for the matrix-free ones, of a model and a batch). A kernel
is a square 2-D tensor or array, a trace kernel (N, N) or a flattened full kernel
(N*K, N*K) with row index ``i*K + a``; a 4-D (N, K, N, K) kernel is flattened first.
:func:`kernel_observables` collects the per-probe scalars with two eigendecompositions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ntklens.observables.alignment import (
    kernel_change,
    kernel_cosine_change,
    kernel_target_alignment,
)
from ntklens.observables.estimators import (
    EigenvalueEstimate,
    Estimate,
    hutchinson_trace,
    lanczos_top_eigenvalues,
    slq_entropy,
)
from ntklens.observables.spectral_position import (
    SpectralPosition,
    spectral_position,
    spectral_position_matrix_free,
)
from ntklens.observables.spectrum import (
    KernelLike,
    as_kernel_matrix,
    cosine_normalized,
    diagonal_entropy,
    effective_rank,
    eigenvalues,
    normalized_entropy,
    participation_ratio,
    participation_ratio_of_spectrum,
    shannon_entropy,
    trace,
    trace_per_size,
    von_neumann_entropy,
)

SPECTRUM_KEYS = (
    "trace",
    "trace_per_size",
    "entropy",
    "entropy_cosine",
    "entropy_normalized",
    "diagonal_entropy",
    "effective_rank",
    "participation_ratio",
)
ALIGNMENT_KEYS = ("alignment", "alignment_centered")
CHANGE_KEYS = ("change", "cosine_change")
OBSERVABLE_KEYS = SPECTRUM_KEYS + ALIGNMENT_KEYS + CHANGE_KEYS

__all__ = [
    "ALIGNMENT_KEYS",
    "CHANGE_KEYS",
    "OBSERVABLE_KEYS",
    "SPECTRUM_KEYS",
    "EigenvalueEstimate",
    "Estimate",
    "SpectralPosition",
    "as_kernel_matrix",
    "cosine_normalized",
    "diagonal_entropy",
    "effective_rank",
    "eigenvalues",
    "hutchinson_trace",
    "kernel_change",
    "kernel_cosine_change",
    "kernel_observables",
    "kernel_observables_and_spectrum",
    "kernel_target_alignment",
    "lanczos_top_eigenvalues",
    "normalized_entropy",
    "participation_ratio",
    "participation_ratio_of_spectrum",
    "shannon_entropy",
    "slq_entropy",
    "spectral_position",
    "spectral_position_matrix_free",
    "trace",
    "trace_per_size",
    "von_neumann_entropy",
]


def kernel_observables_and_spectrum(
    k: KernelLike,
    targets: torch.Tensor | np.ndarray | None = None,
    reference: KernelLike | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """The scalars of :func:`kernel_observables` and the eigenvalues (float64, descending).

    One eigendecomposition of Θ serves entropy, effective rank and participation ratio; a
    second one, of the cosine-normalized Θ, serves ``entropy_cosine``.
    """
    matrix = as_kernel_matrix(k)
    size = matrix.shape[0]
    spectrum = eigenvalues(matrix)
    entropy = shannon_entropy(spectrum)
    total = trace(matrix)
    observables = {
        "trace": total,
        "trace_per_size": total / size,
        "entropy": entropy,
        "entropy_cosine": shannon_entropy(eigenvalues(cosine_normalized(matrix))),
        "entropy_normalized": normalized_entropy(entropy, size),
        "diagonal_entropy": diagonal_entropy(matrix),
        "effective_rank": math.exp(entropy),
        "participation_ratio": participation_ratio_of_spectrum(spectrum),
    }
    if targets is not None:
        observables["alignment"] = kernel_target_alignment(matrix, targets)
        observables["alignment_centered"] = kernel_target_alignment(matrix, targets, centered=True)
    if reference is not None:
        observables["change"] = kernel_change(matrix, reference)
        observables["cosine_change"] = kernel_cosine_change(matrix, reference)
    return observables, spectrum


def kernel_observables(
    k: KernelLike,
    targets: torch.Tensor | np.ndarray | None = None,
    reference: KernelLike | None = None,
) -> dict[str, float]:
    """Per-probe scalars: trace, trace_per_size, entropy, entropy_cosine, entropy_normalized,
    diagonal_entropy, effective_rank, participation_ratio; with ``targets`` also alignment and
    alignment_centered; with a ``reference`` kernel Θ₀ also change and cosine_change.

    Integer class labels (N,) as ``targets`` are converted to one-hot targets (see
    :func:`~ntklens.observables.alignment.kernel_target_alignment`)."""
    return kernel_observables_and_spectrum(k, targets, reference)[0]

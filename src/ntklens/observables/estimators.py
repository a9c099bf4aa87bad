"""Matrix-free estimators for kernels too large to build: trace, top eigenvalues, entropy.

An estimator sees the kernel Θ only through ``matvec``, a function that maps a tensor of
``shape`` to Θ times it, e.g. :func:`ntklens.kernel.products.ntk_matvec` with shape (N, K)
for the full kernel (flat index ``i*K + a``). Θ must be symmetric positive semi-definite.
The estimators do their arithmetic in float64 on ``device`` and cast each vector to ``dtype``
before handing it to ``matvec``. Each returns its value together with an error estimate, and
draws its random vectors from a ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ntklens.errors import NtkLensError

Matvec = Callable[[torch.Tensor], torch.Tensor]

# A Lanczos residual this small relative to the operator's scale means an invariant subspace.
_BREAKDOWN_TOLERANCE = 1e-10


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate and its standard error."""

    value: float
    stderr: float

    @classmethod
    def from_samples(cls, samples: torch.Tensor) -> Estimate:
        """The mean of independent samples, with standard error std / √n."""
        return cls(float(samples.mean()), _standard_error(samples))


@dataclass(frozen=True)
class EigenvalueEstimate:
    """Ritz values, descending, each within its error bound of an eigenvalue of the operator."""

    values: np.ndarray
    error_bounds: np.ndarray


def rademacher(
    shape: Sequence[int],
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Independent ±1 entries drawn from a CPU ``generator``."""
    signs = torch.randint(0, 2, tuple(shape), generator=generator) * 2 - 1
    return signs.to(dtype=dtype, device=device)


def _standard_error(samples: torch.Tensor) -> float:
    return float(samples.to(torch.float64).std() / math.sqrt(samples.numel()))


def _vector_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    if not dims or any(d < 1 for d in dims):
        raise NtkLensError(
            f"shape must be the positive vector shape that matvec takes, e.g. (N, K); got {shape!r}"
        )
    return dims


def _require(name: str, value: int, minimum: int, why: str) -> None:
    if value < minimum:
        raise NtkLensError(f"{name} must be at least {minimum} {why}; got {value}")


def _flat_operator(matvec: Matvec, shape: tuple[int, ...], dtype: torch.dtype) -> Matvec:
    """``matvec`` as a map between flat float64 vectors, checking the shape it returns."""

    def apply(vector: torch.Tensor) -> torch.Tensor:
        product = matvec(vector.reshape(shape).to(dtype))
        if tuple(product.shape) != shape:
            raise NtkLensError(
                f"matvec must return a tensor of its input's shape {shape}; "
                f"got {tuple(product.shape)}"
            )
        return product.reshape(-1).to(dtype=torch.float64, device=vector.device)

    return apply


def _lanczos(
    operator: Matvec,
    start: torch.Tensor,
    n_iter: int,
    restart_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos with full reorthogonalization, from the direction of the float64 ``start``.

    Returns the diagonal α (m,) and off-diagonal β (m,) of the tridiagonal T_m in
    A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ; β[-1] = β_m is the final residual norm. On breakdown
    (an invariant subspace) it stops early, or, given ``restart_generator``, goes on from a
    random vector orthogonal to the basis with β = 0 there, so that repeated eigenvalues are
    found too and the relation above stays exact.
    """
    basis = start.new_zeros(n_iter, start.numel())
    alphas = start.new_zeros(n_iter)
    betas = start.new_zeros(n_iter)
    vector = start / start.norm()
    scale = 0.0
    for step in range(n_iter):
        basis[step] = vector
        residual = operator(vector)
        alphas[step] = vector @ residual
        span = basis[: step + 1]
        for _ in range(2):  # classical Gram-Schmidt twice keeps the basis orthonormal
            residual = residual - span.T @ (span @ residual)
        beta = float(residual.norm())
        scale = max(scale, abs(float(alphas[step])) + beta)
        if beta > _BREAKDOWN_TOLERANCE * scale:
            betas[step] = beta
            vector = residual / beta
        elif restart_generator is None or step + 1 == n_iter:
            return alphas[: step + 1], betas[: step + 1]
        else:
            fresh = torch.randn(start.numel(), generator=restart_generator, dtype=torch.float64)
            fresh = fresh.to(start.device)
            for _ in range(2):
                fresh = fresh - span.T @ (span @ fresh)
            vector = fresh / fresh.norm()
    return alphas, betas


def _ritz_pairs(alphas: torch.Tensor, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the Lanczos tridiagonal matrix."""
    off_diagonal = betas[:-1]
    tridiagonal = torch.diag(alphas) + torch.diag(off_diagonal, 1) + torch.diag(off_diagonal, -1)
    return torch.linalg.eigh(tridiagonal)


def hutchinson_trace(
    matvec: Matvec,
    shape: int | Sequence[int],
    n_probes: int,
    seed: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Estimate:
    """Tr Θ ≈ mean of zᵀΘz over Rademacher probes z; stderr = sample std / √n_probes."""
    dims = _vector_shape(shape)
    _require("n_probes", n_probes, 2, "to estimate an error")
    operator = _flat_operator(matvec, dims, dtype)
    generator = torch.Generator().manual_seed(seed)
    samples = torch.empty(n_probes, dtype=torch.float64)
    for probe in range(n_probes):
        z = rademacher((math.prod(dims),), generator, device=device)
        samples[probe] = z @ operator(z)
    return Estimate.from_samples(samples)


def lanczos_top_eigenvalues(
    matvec: Matvec,
    shape: int | Sequence[int],
    k: int,
    n_iter: int,
    seed: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> EigenvalueEstimate:
    """The k largest eigenvalues by Lanczos with full reorthogonalization (float64).

    Runs min(n_iter, size) steps from a seeded Gaussian start. The error bound of Ritz value
    θ_i is the residual norm |β_m s_{m,i}|: some eigenvalue of Θ lies within it (with too few
    steps, not necessarily the i-th largest; large bounds say so). Values are clipped at 0,
    as for a positive semi-definite kernel.
    """
    dims = _vector_shape(shape)
    size = math.prod(dims)
    _require("k", k, 1, "eigenvalue")
    if k > size:
        raise NtkLensError(f"k must be at most the operator size {size}; got {k}")
    _require("n_iter", n_iter, k, "(k) Lanczos steps")
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(size, generator=generator, dtype=torch.float64).to(device)
    alphas, betas = _lanczos(
        _flat_operator(matvec, dims, dtype), start, min(n_iter, size), generator
    )
    ritz_values, ritz_vectors = _ritz_pairs(alphas, betas)
    bounds = (betas[-1] * ritz_vectors[-1]).abs()
    top = torch.argsort(ritz_values, descending=True)[:k]
    return EigenvalueEstimate(
        values=ritz_values[top].clamp_min(0.0).cpu().numpy(),
        error_bounds=bounds[top].cpu().numpy(),
    )


def slq_entropy(
    matvec: Matvec,
    shape: int | Sequence[int],
    n_probes: int,
    n_iter: int,
    seed: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Estimate:
    """Von Neumann entropy −Σ p ln p, p = λ / Tr Θ, by stochastic Lanczos quadrature.

    Each Rademacher probe z gives, from n_iter Lanczos steps started at z, Gauss quadratures
    a = zᵀ(Θ ln Θ)z and t = zᵀΘz. With T and A the probe means of t and a (T is the Hutchinson
    trace from the same probes), S = tr f(Θ), f(λ) = −(λ/T) ln(λ/T), is estimated by
    ln T − A/T. Sharing the probes lets the fluctuations of A and T cancel; the stderr (delta
    method) comes from the spread over probes. It leaves out the quadrature bias, which falls
    quickly as n_iter grows and vanishes at n_iter = size. NaN for a zero operator.
    """
    dims = _vector_shape(shape)
    size = math.prod(dims)
    _require("n_probes", n_probes, 2, "to estimate an error")
    _require("n_iter", n_iter, 1, "Lanczos step")
    operator = _flat_operator(matvec, dims, dtype)
    generator = torch.Generator().manual_seed(seed)
    quadratic = torch.empty(n_probes, dtype=torch.float64)
    entropic = torch.empty(n_probes, dtype=torch.float64)
    for probe in range(n_probes):
        z = rademacher((size,), generator, device=device)
        ritz_values, ritz_vectors = _ritz_pairs(*_lanczos(operator, z, min(n_iter, size)))
        ritz_values = ritz_values.clamp_min(0.0)
        weights = size * ritz_vectors[0] ** 2  # ‖z‖² times the Gauss quadrature weights
        quadratic[probe] = weights @ ritz_values
        entropic[probe] = weights @ torch.special.xlogy(ritz_values, ritz_values)
    total, mean_entropic = float(quadratic.mean()), float(entropic.mean())
    if total <= 0:
        return Estimate(math.nan, math.nan)
    # Each probe's influence on ln T − A/T, to first order in the deviations from the means.
    influence = -entropic / total + (1 + mean_entropic / total) / total * quadratic
    return Estimate(math.log(total) - mean_entropic / total, _standard_error(influence))

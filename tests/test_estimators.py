"""Matrix-free estimators against exact values: explicit matrices with known spectra, and
the eNTK of a small MLP through ntk_matvec against its hand-built Jacobian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from ntklens.errors import NtkLensError
from ntklens.kernel.products import ntk_matvec
from ntklens.observables import (
    eigenvalues,
    hutchinson_trace,
    lanczos_top_eigenvalues,
    slq_entropy,
    von_neumann_entropy,
)

N_SAMPLES, N_INPUTS, N_OUTPUTS = 24, 5, 3


def kernel_with_spectrum(values: torch.Tensor, seed: int) -> torch.Tensor:
    gaussian = torch.randn(len(values), len(values), generator=torch.Generator().manual_seed(seed))
    q, _ = torch.linalg.qr(gaussian.to(torch.float64))
    return q @ torch.diag(values.to(torch.float64)) @ q.T


def matrix_operator(matrix: torch.Tensor, shape: tuple[int, ...]):
    return lambda v: (matrix @ v.reshape(-1)).reshape(shape)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These operators are tiny; on a shared 2-core machine extra threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mlp_kernel() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 tanh MLP, its inputs and its exact full eNTK (N*K, N*K) from J Jᵀ."""
    model = torch.nn.Sequential(
        torch.nn.Linear(N_INPUTS, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, N_OUTPUTS),
    ).double()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) / 2)
    x = torch.randn(N_SAMPLES, N_INPUTS, generator=generator, dtype=torch.float64)
    params = {name: p.detach() for name, p in model.named_parameters()}
    jacobian = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    flat = torch.cat([j.reshape(N_SAMPLES * N_OUTPUTS, -1) for j in jacobian.values()], dim=1)
    return model, x, flat @ flat.T


# --- Hutchinson -------------------------------------------------------------------------


def test_hutchinson_is_exact_on_a_diagonal_matrix() -> None:
    diagonal = torch.tensor([3.0, 0.5, 2.0, 7.0, 0.0], dtype=torch.float64)
    estimate = hutchinson_trace(lambda v: diagonal * v, (5,), n_probes=8, seed=0)
    assert estimate.value == pytest.approx(3.0 + 0.5 + 2.0 + 7.0, rel=1e-14)
    assert estimate.stderr == pytest.approx(0.0, abs=1e-14)


def test_hutchinson_value_and_error_on_a_dense_matrix() -> None:
    kernel = kernel_with_spectrum(torch.linspace(0.1, 3.0, 40), seed=1)
    n_probes = 400
    estimate = hutchinson_trace(matrix_operator(kernel, (40,)), 40, n_probes, seed=2)
    exact = float(kernel.trace())
    assert abs(estimate.value - exact) <= 3 * estimate.stderr
    # Rademacher closed form: Var(zᵀAz) = 2 (‖A‖²_F − Σ A_ii²).
    variance = 2 * (float(kernel.square().sum()) - float(kernel.diagonal().square().sum()))
    assert estimate.stderr == pytest.approx(math.sqrt(variance / n_probes), rel=0.2)


def test_hutchinson_is_reproducible_by_seed() -> None:
    kernel = kernel_with_spectrum(torch.linspace(0.1, 3.0, 20), seed=3)
    operator = matrix_operator(kernel, (4, 5))
    first = hutchinson_trace(operator, (4, 5), 10, seed=4)
    assert hutchinson_trace(operator, (4, 5), 10, seed=4) == first
    assert hutchinson_trace(operator, (4, 5), 10, seed=5) != first


# --- Lanczos ----------------------------------------------------------------------------


def test_lanczos_recovers_a_known_spectrum_within_its_bounds() -> None:
    values = torch.logspace(1, -3, 60)
    kernel = kernel_with_spectrum(values, seed=6)
    short = lanczos_top_eigenvalues(matrix_operator(kernel, (60,)), 60, k=4, n_iter=15, seed=0)
    assert short.values.dtype == np.float64
    assert np.all(np.diff(short.values) <= 0)
    assert np.all(np.abs(short.values - values[:4].numpy()) <= short.error_bounds + 1e-12)
    assert short.error_bounds.max() > 1e-8  # 15 steps do not converge all four
    full = lanczos_top_eigenvalues(matrix_operator(kernel, (60,)), 60, k=4, n_iter=60, seed=0)
    np.testing.assert_allclose(full.values, values[:4].numpy(), rtol=1e-10)


def test_lanczos_finds_repeated_eigenvalues() -> None:
    values = torch.tensor([5.0, 5.0, 5.0, 2.0, 1.0, 1.0, 0.5, 0.0])
    kernel = kernel_with_spectrum(values, seed=7)
    estimate = lanczos_top_eigenvalues(matrix_operator(kernel, (8,)), 8, k=5, n_iter=8, seed=1)
    np.testing.assert_allclose(estimate.values, [5.0, 5.0, 5.0, 2.0, 1.0], rtol=1e-10)
    assert np.all(estimate.error_bounds <= 1e-8)


# --- stochastic Lanczos quadrature ------------------------------------------------------


def test_slq_entropy_of_the_identity_is_exact() -> None:
    estimate = slq_entropy(lambda v: v, (6, 5), n_probes=4, n_iter=10, seed=0)
    assert estimate.value == pytest.approx(math.log(30), rel=1e-14)
    assert estimate.stderr == pytest.approx(0.0, abs=1e-14)


def test_slq_entropy_of_a_diagonal_matrix_is_exact() -> None:
    diagonal = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.0], dtype=torch.float64)
    estimate = slq_entropy(lambda v: diagonal * v, 6, n_probes=5, n_iter=6, seed=1)
    assert estimate.value == pytest.approx(von_neumann_entropy(torch.diag(diagonal)), rel=1e-12)
    assert estimate.stderr == pytest.approx(0.0, abs=1e-12)


def test_slq_entropy_of_a_known_spectrum_is_within_its_error() -> None:
    values = torch.logspace(0, -4, 50)
    kernel = kernel_with_spectrum(values, seed=8)
    estimate = slq_entropy(matrix_operator(kernel, (50,)), 50, n_probes=30, n_iter=25, seed=2)
    p = values.double() / values.double().sum()
    exact = float(-(p * p.log()).sum())
    assert 0 < estimate.stderr < 0.1
    assert abs(estimate.value - exact) <= 3 * estimate.stderr


# --- the eNTK of a small MLP through ntk_matvec -----------------------------------------


def test_estimators_match_the_exact_ntk_of_a_small_mlp(mlp_kernel) -> None:
    model, x, kernel = mlp_kernel
    matvec = ntk_matvec(model, x)
    shape = (N_SAMPLES, N_OUTPUTS)

    trace = hutchinson_trace(matvec, shape, n_probes=200, seed=0)
    assert abs(trace.value - float(kernel.trace())) <= 3 * trace.stderr

    top = lanczos_top_eigenvalues(matvec, shape, k=5, n_iter=15, seed=0)
    exact_top = eigenvalues(kernel)[:5]
    assert np.all(np.abs(top.values - exact_top) <= top.error_bounds + 1e-9 * exact_top[0])
    assert top.error_bounds.max() > 1e-6 * exact_top[0]  # not converged: the bounds matter

    entropy = slq_entropy(matvec, shape, n_probes=10, n_iter=20, seed=0)
    assert abs(entropy.value - von_neumann_entropy(kernel)) <= 3 * entropy.stderr + 1e-6


def test_slq_stderr_matches_the_spread_over_seeds(mlp_kernel) -> None:
    _, _, kernel = mlp_kernel
    operator = matrix_operator(kernel, (len(kernel),))
    estimates = [slq_entropy(operator, len(kernel), 8, 20, seed) for seed in range(24)]
    spread = float(np.std([e.value for e in estimates], ddof=1))
    reported = float(np.mean([e.stderr for e in estimates]))
    assert 0.6 < spread / reported < 1.6


# --- argument checks --------------------------------------------------------------------


def test_matvec_returning_another_shape_is_rejected() -> None:
    with pytest.raises(NtkLensError, match=r"^matvec must return a tensor of its input's shape"):
        hutchinson_trace(lambda v: v.reshape(-1), (3, 2), n_probes=2, seed=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: hutchinson_trace(lambda v: v, 4, n_probes=1, seed=0), "^n_probes must be"),
        (lambda: hutchinson_trace(lambda v: v, (0, 3), n_probes=2, seed=0), "^shape must be"),
        (lambda: lanczos_top_eigenvalues(lambda v: v, 4, k=5, n_iter=9, seed=0), "^k must be"),
        (lambda: lanczos_top_eigenvalues(lambda v: v, 9, k=5, n_iter=3, seed=0), "^n_iter must"),
        (lambda: slq_entropy(lambda v: v, 4, n_probes=3, n_iter=0, seed=0), "^n_iter must"),
    ],
)
def test_bad_arguments_are_rejected(call, message: str) -> None:
    with pytest.raises(NtkLensError, match=message):
        call()

"""Kernel observables against closed forms on constructed kernels, and spectral position
against an explicit Jacobian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from ntklens.errors import NtkLensError
from ntklens.observables import (
    diagonal_entropy,
    effective_rank,
    eigenvalues,
    kernel_change,
    kernel_cosine_change,
    kernel_observables,
    kernel_observables_and_spectrum,
    kernel_target_alignment,
    participation_ratio,
    spectral_position,
    spectral_position_matrix_free,
    trace,
    trace_per_size,
    von_neumann_entropy,
)

BASE_KEYS = {
    "trace",
    "trace_per_size",
    "entropy",
    "entropy_cosine",
    "entropy_normalized",
    "diagonal_entropy",
    "effective_rank",
    "participation_ratio",
}


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    gaussian = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)
    return q


def kernel_with_spectrum(values: list[float], seed: int = 0) -> torch.Tensor:
    q = random_orthogonal(len(values), seed)
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T


def hand_entropy(values: list[float]) -> float:
    total = sum(values)
    return -sum(v / total * math.log(v / total) for v in values if v > 0)


# --- spectrum -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 30])
def test_identity_closed_forms(n: int) -> None:
    identity = torch.eye(n, dtype=torch.float64)
    assert trace(identity) == n
    assert trace_per_size(identity) == 1.0
    np.testing.assert_allclose(eigenvalues(identity), np.ones(n))
    assert von_neumann_entropy(identity) == pytest.approx(math.log(n), abs=1e-12)
    assert effective_rank(identity) == pytest.approx(n)
    assert participation_ratio(identity) == pytest.approx(n)
    assert diagonal_entropy(identity) == pytest.approx(math.log(n), abs=1e-12)
    if n > 1:
        assert von_neumann_entropy(identity, normalize=True) == pytest.approx(1.0)
    else:
        assert math.isnan(von_neumann_entropy(identity, normalize=True))


def test_rank_one_closed_forms() -> None:
    u = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kernel = torch.outer(u, u)
    spectrum = eigenvalues(kernel)
    assert spectrum[0] == pytest.approx(float(u @ u))
    np.testing.assert_allclose(spectrum[1:], 0.0, atol=1e-12)
    assert trace(kernel) == pytest.approx(float(u @ u))
    assert von_neumann_entropy(kernel) == pytest.approx(0.0, abs=1e-10)
    assert effective_rank(kernel) == pytest.approx(1.0)
    assert participation_ratio(kernel) == pytest.approx(1.0)


def test_known_spectrum_entropy_and_ranks() -> None:
    values = [5.0, 3.0, 1.0, 0.5, 0.25, 0.0, 0.0, 2.0]
    kernel = kernel_with_spectrum(values)
    np.testing.assert_allclose(eigenvalues(kernel), sorted(values, reverse=True), atol=1e-12)
    entropy = hand_entropy(values)
    assert von_neumann_entropy(kernel) == pytest.approx(entropy, rel=1e-12)
    assert von_neumann_entropy(kernel, normalize=True) == pytest.approx(
        entropy / math.log(len(values)), rel=1e-12
    )
    assert effective_rank(kernel) == pytest.approx(math.exp(entropy), rel=1e-12)
    squares = sum(v * v for v in values)
    assert participation_ratio(kernel) == pytest.approx(sum(values) ** 2 / squares, rel=1e-12)


def test_eigenvalues_are_float64_descending_and_clipped_at_zero() -> None:
    kernel = kernel_with_spectrum([3.0, -0.5, 1.0, -1e-9], seed=2).to(torch.float32)
    spectrum = eigenvalues(kernel)
    assert spectrum.dtype == np.float64
    np.testing.assert_allclose(spectrum, [3.0, 1.0, 0.0, 0.0], atol=1e-6)
    assert np.all(spectrum >= 0)


def test_cosine_normalized_entropy_is_blind_to_diagonal_scaling() -> None:
    kernel = kernel_with_spectrum([4.0, 2.0, 1.0, 1.0, 0.5, 0.1], seed=3)
    scale = torch.diag(torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0, 7.0], dtype=torch.float64))
    scaled = scale @ kernel @ scale
    assert von_neumann_entropy(scaled) != pytest.approx(von_neumann_entropy(kernel), rel=1e-3)
    assert von_neumann_entropy(scaled, cosine_normalize=True) == pytest.approx(
        von_neumann_entropy(kernel, cosine_normalize=True), rel=1e-12
    )


def test_cosine_normalized_entropy_of_a_diagonal_kernel_is_maximal() -> None:
    kernel = torch.diag(torch.tensor([9.0, 0.01, 4.0, 1.0], dtype=torch.float64))
    assert von_neumann_entropy(kernel, cosine_normalize=True) == pytest.approx(math.log(4))
    assert von_neumann_entropy(kernel) < math.log(4) - 0.1


def test_diagonal_entropy_uses_square_roots_of_the_diagonal() -> None:
    diagonal = [4.0, 1.0, 9.0, 0.0]
    weights = [math.sqrt(d) for d in diagonal]
    kernel = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    kernel[0, 1] = kernel[1, 0] = 0.5  # off-diagonal entries must not matter
    assert diagonal_entropy(kernel) == pytest.approx(hand_entropy(weights), rel=1e-12)


def test_full_kernel_is_flattened_with_row_index_i_times_k_plus_a() -> None:
    jacobian = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    full = torch.einsum("iap,jbp->iajb", jacobian, jacobian)
    flat_jacobian = jacobian.reshape(15, 8)
    flat = flat_jacobian @ flat_jacobian.T
    assert kernel_observables(full) == pytest.approx(kernel_observables(flat), rel=1e-12)
    assert trace(full) == pytest.approx(float(jacobian.square().sum()))


def test_numpy_and_torch_inputs_agree() -> None:
    kernel = kernel_with_spectrum([3.0, 2.0, 1.0, 0.5], seed=5)
    assert kernel_observables(kernel.numpy()) == kernel_observables(kernel)


def test_zero_kernel_gives_nan_for_undefined_ratios() -> None:
    observables = kernel_observables(torch.zeros(4, 4))
    assert observables["trace"] == 0.0
    for key in ("entropy", "entropy_cosine", "effective_rank", "participation_ratio"):
        assert math.isnan(observables[key]), key


@pytest.mark.parametrize(
    "bad", [torch.ones(3, 4), torch.ones(3), torch.ones(2, 2, 2), torch.ones(0, 0)]
)
def test_non_square_kernels_are_rejected(bad: torch.Tensor) -> None:
    with pytest.raises(NtkLensError, match=r"^k must be a non-empty square"):
        trace(bad)


def test_full_kernel_over_two_input_sets_is_rejected() -> None:
    with pytest.raises(NtkLensError, match="over one input set"):
        eigenvalues(torch.ones(3, 2, 4, 2))


def test_non_finite_kernel_is_rejected() -> None:
    kernel = torch.eye(3)
    kernel[1, 2] = math.nan
    with pytest.raises(NtkLensError, match="NaN or infinite"):
        kernel_observables(kernel)


# --- alignment and change -------------------------------------------------------------


def explicit_alignment(kernel: np.ndarray, targets: np.ndarray, centered: bool) -> float:
    """The textbook formula with explicit n×n matrices and the centering matrix H."""
    y = targets.reshape(len(targets), -1)
    target_kernel = y @ y.T
    if centered:
        h = np.eye(len(y)) - np.ones((len(y), len(y))) / len(y)
        kernel, target_kernel = h @ kernel @ h, h @ target_kernel @ h
    inner = np.sum(kernel * target_kernel)
    return inner / (np.linalg.norm(kernel) * np.linalg.norm(target_kernel))


@pytest.mark.parametrize("centered", [False, True])
def test_kernel_of_the_targets_is_perfectly_aligned(centered: bool) -> None:
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    one_hot = torch.nn.functional.one_hot(labels).to(torch.float64)
    kernel = one_hot @ one_hot.T
    assert kernel_target_alignment(kernel, one_hot, centered=centered) == pytest.approx(1.0)


def test_alignment_with_orthogonal_targets_is_zero() -> None:
    u = torch.tensor([1.0, 1.0, 0.0, 0.0])
    targets = torch.tensor([0.0, 0.0, 1.0, -2.0])
    assert kernel_target_alignment(torch.outer(u, u), targets) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("centered", [False, True])
def test_alignment_matches_the_explicit_formula(centered: bool) -> None:
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    targets = torch.randn(9, 3, generator=generator, dtype=torch.float64)
    kernel = features @ features.T + 2.0
    expected = explicit_alignment(kernel.numpy(), targets.numpy(), centered)
    assert kernel_target_alignment(kernel, targets, centered=centered) == pytest.approx(
        expected, rel=1e-12
    )


def test_centered_alignment_ignores_constant_kernel_and_target_offsets() -> None:
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(8, generator=generator, dtype=torch.float64)
    kernel = features @ features.T
    shifted = kernel_target_alignment(kernel + 5.0, targets + 3.0, centered=True)
    assert shifted == pytest.approx(kernel_target_alignment(kernel, targets, centered=True))
    assert kernel_target_alignment(kernel + 5.0, targets + 3.0) != pytest.approx(shifted)


def test_constant_kernel_alignment() -> None:
    constant = torch.full((6, 6), 2.0, dtype=torch.float64)
    ones = torch.ones(6, dtype=torch.float64)
    assert kernel_target_alignment(constant, ones) == pytest.approx(1.0)
    assert math.isnan(kernel_target_alignment(constant, torch.arange(6.0), centered=True))


def test_full_kernel_targets_are_flattened_like_the_kernel() -> None:
    generator = torch.Generator().manual_seed(8)
    jacobian = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64)
    full = torch.einsum("iap,jbp->iajb", jacobian, jacobian)
    targets = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    expected = explicit_alignment(full.reshape(12, 12).numpy(), targets.reshape(12).numpy(), False)
    assert kernel_target_alignment(full, targets) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_integer_class_labels_are_one_hot_targets(centered: bool, as_numpy: bool) -> None:
    generator = torch.Generator().manual_seed(10)
    features = torch.randn(12, 6, generator=generator, dtype=torch.float64)
    kernel = features @ features.T + 1.0
    labels = torch.tensor([0, 3, 1, 2, 3, 0, 1, 1, 2, 0, 3, 2])
    one_hot = torch.nn.functional.one_hot(labels).numpy().astype(np.float64)
    given = labels.numpy() if as_numpy else labels
    aligned = kernel_target_alignment(kernel, given, centered=centered)
    assert aligned == pytest.approx(explicit_alignment(kernel.numpy(), one_hot, centered))
    regressed = explicit_alignment(kernel.numpy(), labels.numpy().astype(float), centered)
    assert aligned != pytest.approx(regressed, rel=1e-3)  # not one target 0, 1, 2, 3
    observables = kernel_observables(kernel, targets=given)
    assert observables["alignment" + ("_centered" if centered else "")] == pytest.approx(aligned)


def test_integer_labels_of_a_full_kernel_are_one_hot_over_its_outputs() -> None:
    generator = torch.Generator().manual_seed(11)
    jacobian = torch.randn(5, 3, 7, generator=generator, dtype=torch.float64)
    full = torch.einsum("iap,jbp->iajb", jacobian, jacobian)
    labels = torch.tensor([2, 0, 1, 2, 2])
    one_hot = torch.nn.functional.one_hot(labels, 3).to(torch.float64)
    expected = explicit_alignment(full.reshape(15, 15).numpy(), one_hot.reshape(15).numpy(), False)
    assert kernel_target_alignment(full, labels) == pytest.approx(expected, rel=1e-12)
    assert kernel_target_alignment(full.reshape(15, 15), labels) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kernel", "labels", "words"),
    [
        (torch.eye(4), torch.tensor([0, 1, -1, 2]), ">= 0"),
        (torch.eye(6), torch.tensor([0, 1, 2, 1]), "fit neither"),
        (torch.eye(6), torch.tensor([0, 1, 3]), "fit neither"),  # N*K = 6 but label 3 >= K
    ],
)
def test_bad_integer_labels_are_refused(kernel, labels, words) -> None:
    with pytest.raises(NtkLensError) as caught:
        kernel_target_alignment(kernel, labels)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_targets_of_the_wrong_length_are_rejected() -> None:
    with pytest.raises(NtkLensError, match=r"^targets must have shape"):
        kernel_target_alignment(torch.eye(5), torch.ones(4))


def test_change_against_a_rescaled_reference() -> None:
    reference = kernel_with_spectrum([3.0, 1.0, 0.5], seed=9)
    assert kernel_change(2 * reference, reference) == pytest.approx(1.0)
    assert kernel_cosine_change(2 * reference, reference) == pytest.approx(0.0, abs=1e-14)
    assert kernel_change(reference, reference) == 0.0


def test_cosine_change_between_orthogonal_kernels_is_one() -> None:
    first = torch.diag(torch.tensor([1.0, 2.0, 0.0, 0.0]))
    second = torch.diag(torch.tensor([0.0, 0.0, 3.0, 1.0]))
    assert kernel_cosine_change(second, first) == pytest.approx(1.0)
    assert kernel_change(second, first) == pytest.approx(math.sqrt((1 + 4 + 9 + 1) / (1 + 4)))


def test_reference_of_another_shape_is_rejected() -> None:
    with pytest.raises(NtkLensError, match=r"^reference must have the same shape"):
        kernel_change(torch.eye(4), torch.eye(3))


# --- kernel_observables ---------------------------------------------------------------


def test_kernel_observables_keys_and_values() -> None:
    kernel = kernel_with_spectrum([4.0, 2.0, 1.0, 0.5, 0.2, 0.1], seed=10)
    targets = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = kernel_with_spectrum([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], seed=11)
    assert set(kernel_observables(kernel)) == BASE_KEYS
    observables, spectrum = kernel_observables_and_spectrum(kernel, targets, reference)
    assert set(observables) == BASE_KEYS | {
        "alignment",
        "alignment_centered",
        "change",
        "cosine_change",
    }
    np.testing.assert_array_equal(spectrum, eigenvalues(kernel))
    expected = {
        "trace": trace(kernel),
        "trace_per_size": trace_per_size(kernel),
        "entropy": von_neumann_entropy(kernel),
        "entropy_cosine": von_neumann_entropy(kernel, cosine_normalize=True),
        "entropy_normalized": von_neumann_entropy(kernel, normalize=True),
        "diagonal_entropy": diagonal_entropy(kernel),
        "effective_rank": effective_rank(kernel),
        "participation_ratio": participation_ratio(kernel),
        "alignment": kernel_target_alignment(kernel, targets),
        "alignment_centered": kernel_target_alignment(kernel, targets, centered=True),
        "change": kernel_change(kernel, reference),
        "cosine_change": kernel_cosine_change(kernel, reference),
    }
    assert observables == pytest.approx(expected, rel=1e-12)
    assert all(type(value) is float for value in observables.values())


def test_kernel_observables_decomposes_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = torch.linalg.eigvalsh

    def counting_eigvalsh(matrix: torch.Tensor) -> torch.Tensor:
        calls.append(matrix.shape)
        return original(matrix)

    monkeypatch.setattr(torch.linalg, "eigvalsh", counting_eigvalsh)
    kernel = kernel_with_spectrum([2.0, 1.0, 0.5], seed=12)
    kernel_observables_and_spectrum(kernel, torch.ones(3), reference=kernel)
    assert len(calls) == 2


# --- spectral position ----------------------------------------------------------------


def test_spectral_position_closed_forms() -> None:
    g = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    flat = g.reshape(-1)
    position = spectral_position(torch.eye(4), g)
    assert position.chi_loss == pytest.approx(float(flat @ flat))
    assert position.chi_net == 4.0
    assert position.chi_pos == pytest.approx(1 / 4)
    assert position.chi_net_stderr == 0.0
    aligned = spectral_position(torch.outer(flat, flat), g)
    assert aligned.chi_pos == pytest.approx(1.0)
    orthogonal = torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert spectral_position(torch.outer(orthogonal, orthogonal), g).chi_pos == pytest.approx(0.0)


def test_spectral_position_accepts_a_4d_full_kernel() -> None:
    generator = torch.Generator().manual_seed(13)
    jacobian = torch.randn(3, 2, 6, generator=generator, dtype=torch.float64)
    full = torch.einsum("iap,jbp->iajb", jacobian, jacobian)
    g = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    assert spectral_position(full, g) == spectral_position(full.reshape(6, 6), g)
    with pytest.raises(NtkLensError, match=r"^g must be"):
        spectral_position(full, g.T)


class SmallNet(torch.nn.Module):
    """An MLP with dropout (so eval mode matters) and one frozen parameter."""

    def __init__(self, seed: int = 15) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(4, 12),
            torch.nn.Tanh(),
            torch.nn.Dropout(0.5),
            torch.nn.Linear(12, 3),
        ).double()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
        self.layers[0].bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def explicit_kernel_and_gradient(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Θ = J Jᵀ from a hand-built Jacobian over the trainable parameters, and g = ∂L/∂f."""
    model.eval()
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    jacobian = jacrev(lambda params: functional_call(model, params, (x,)))(trainable)
    flat = torch.cat([block.reshape(x.shape[0] * 3, -1) for block in jacobian.values()], dim=1)
    outputs = model(x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(outputs, y), outputs)
    return flat @ flat.T, g


def test_matrix_free_spectral_position_equals_the_explicit_one() -> None:
    model = SmallNet()
    generator = torch.Generator().manual_seed(16)
    x = torch.randn(10, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=generator)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model.layers[2].eval()
    matrix_free = spectral_position_matrix_free(model, x, y, torch.nn.functional.cross_entropy)
    assert model.training and not model.layers[2].training
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    kernel, g = explicit_kernel_and_gradient(model, x, y)
    explicit = spectral_position(kernel, g)
    assert matrix_free.chi_loss == pytest.approx(explicit.chi_loss, rel=1e-12)
    assert matrix_free.chi_net == pytest.approx(explicit.chi_net, rel=1e-12)
    assert matrix_free.chi_pos == pytest.approx(explicit.chi_pos, rel=1e-12)
    assert matrix_free.chi_net_stderr == 0.0


def test_hutchinson_spectral_position_is_within_its_error() -> None:
    model = SmallNet()
    generator = torch.Generator().manual_seed(17)
    x = torch.randn(10, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=generator)
    kernel, g = explicit_kernel_and_gradient(model, x, y)
    exact = spectral_position(kernel, g)
    loss = torch.nn.functional.cross_entropy
    estimate = spectral_position_matrix_free(model, x, y, loss, n_probes=64, seed=3)
    assert estimate.chi_net_stderr > 0
    assert abs(estimate.chi_net - exact.chi_net) <= 3 * estimate.chi_net_stderr
    assert estimate.chi_loss == pytest.approx(exact.chi_loss, rel=1e-12)
    expected_pos = exact.chi_pos * exact.chi_net / estimate.chi_net
    assert estimate.chi_pos == pytest.approx(expected_pos, rel=1e-12)
    again = spectral_position_matrix_free(model, x, y, loss, n_probes=64, seed=3)
    assert again == estimate


def test_matrix_free_spectral_position_rejects_bad_arguments() -> None:
    model = SmallNet()
    x = torch.zeros(3, 4, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    with pytest.raises(NtkLensError, match=r"^n_probes must be"):
        spectral_position_matrix_free(model, x, y, torch.nn.functional.cross_entropy, n_probes=1)
    per_sample = torch.nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(NtkLensError, match=r"^loss_fn must return a scalar"):
        spectral_position_matrix_free(model, x, y, per_sample)

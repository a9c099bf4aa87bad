"""Tests of the infinite-width NNGP and NTK against numerical integration, random networks
and the empirical NTK of wide networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

import ntklens
from ntklens.errors import NtkLensError
from ntklens.infinite import analytic_nngp, analytic_ntk, infinite_kernel_for
from ntklens.models import build_model


def _inputs(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _relu(u: float) -> float:
    return max(u, 0.0)


def _step(u: float) -> float:
    return float(u > 0)


def _erf_derivative(u: float) -> float:
    return 2 / math.sqrt(math.pi) * math.exp(-u * u)


PHI = {"relu": (_relu, _step), "erf": (math.erf, _erf_derivative)}


def _normal_expectation(f, shift: float = 0.0, scale: float = 1.0) -> float:
    """E[f(shift + scale·z)] for z ~ N(0, 1) by adaptive quadrature, split at the kink of
    ReLU and its step derivative (where the argument is 0)."""
    kink = -shift / scale
    return integrate.quad(
        lambda z: f(shift + scale * z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
        -12,
        12,
        points=[kink] if abs(kink) < 12 else None,
        epsabs=1e-13,
        epsrel=1e-11,
        limit=200,
    )[0]


def _expect_pair(f, cov: np.ndarray) -> float:
    """E[f(u) f(v)] for (u, v) ~ N(0, cov): nested 1-D quadrature over u = L₀₀z₁,
    v = L₁₀z₁ + L₁₁z₂ with L the Cholesky factor of cov."""
    chol = np.linalg.cholesky(cov)
    return _normal_expectation(
        lambda u: f(u) * _normal_expectation(f, chol[1, 0] * u / chol[0, 0], chol[1, 1]),
        scale=chol[0, 0],
    )


def _reference_kernels(x, activation, depth, weight_std, bias_std):
    """NNGP and NTK of two inputs from the recursion, with every Gaussian expectation
    integrated numerically instead of taken from a closed form."""
    phi, dphi = PHI[activation]
    w2, b2 = weight_std**2, bias_std**2
    sigma = w2 * x @ x.T / x.shape[1] + b2
    theta = sigma.copy()
    for _ in range(depth):
        value, derivative = np.empty((2, 2)), np.empty((2, 2))
        for f, out in ((phi, value), (dphi, derivative)):
            out[0, 0], out[1, 1] = (
                _normal_expectation(lambda u, f=f: f(u) ** 2, scale=math.sqrt(sigma[i, i]))
                for i in range(2)
            )
            out[0, 1] = out[1, 0] = _expect_pair(f, sigma)
        sigma = w2 * value + b2
        theta = sigma + theta * w2 * derivative
    return sigma, theta


@pytest.mark.parametrize("activation", ["relu", "erf"])
@pytest.mark.parametrize("depth", [1, 2])
def test_kernels_match_numerical_integration(activation: str, depth: int) -> None:
    x = _inputs(2, 5, seed=1) * torch.tensor([[1.0], [1.7]], dtype=torch.float64)
    options = {"depth": depth, "activation": activation, "weight_std": 1.3, "bias_std": 0.2}
    sigma, theta = _reference_kernels(x.numpy(), **options)
    np.testing.assert_allclose(analytic_nngp(x, **options).numpy(), sigma, rtol=1e-7)
    np.testing.assert_allclose(analytic_ntk(x, **options).numpy(), theta, rtol=1e-7)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_relu_he_init_diagonal_closed_form(depth: int) -> None:
    """With σ_w² = 2, σ_b = 0 ReLU keeps Σ(x, x) = 2|x|²/d, and each layer adds it to Θ."""
    x = _inputs(4, 7, seed=2)
    options = {"depth": depth, "weight_std": math.sqrt(2), "bias_std": 0.0}
    second_moment = 2 * (x**2).sum(1) / x.shape[1]
    torch.testing.assert_close(analytic_nngp(x, **options).diagonal(), second_moment)
    torch.testing.assert_close(analytic_ntk(x, **options).diagonal(), (depth + 1) * second_moment)


def test_relu_depth_one_closed_forms_at_right_and_straight_angles() -> None:
    d, sw = 4, 1.1
    e1, e2 = torch.eye(d, dtype=torch.float64)[:2] * math.sqrt(d)
    x = torch.stack([e1, e2, -e1])
    nngp = analytic_nngp(x, depth=1, weight_std=sw, bias_std=0.0)
    ntk = analytic_ntk(x, depth=1, weight_std=sw, bias_std=0.0)
    # orthogonal: Σ¹ = 0 off the diagonal, so Θ = Σ² = σ_w⁴ / (2π)
    assert nngp[0, 1].item() == pytest.approx(sw**4 / (2 * math.pi))
    assert ntk[0, 1].item() == pytest.approx(sw**4 / (2 * math.pi))
    # opposite: ReLU(u)ReLU(-u) = 0 and the derivatives never overlap
    assert nngp[0, 2].item() == pytest.approx(0.0, abs=1e-12)
    assert ntk[0, 2].item() == pytest.approx(0.0, abs=1e-12)
    # a zero input with no bias has zero variance; the kernel stays finite
    zero = analytic_ntk(torch.zeros(2, d), depth=2, weight_std=sw, bias_std=0.0)
    assert torch.equal(zero, torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_nngp_matches_random_wide_networks(activation: str) -> None:
    """The output covariance over many random ntk-parameterized networks, within 5 standard
    errors (about 1%). Depth 2 at width 256 leaves an O(1/n) finite-width bias below that.
    A large σ_b makes a wrong bias convention visible."""
    x = _inputs(6, 8, seed=3)
    n_nets, n_outputs, weight_std, bias_std = 64, 512, 1.2, 0.6
    covariances = []
    for seed in range(n_nets):
        model = build_model(
            "mlp",
            width=256,
            depth=2,
            in_shape=(8,),
            n_outputs=n_outputs,
            parameterization="ntk",
            activation=activation,
            weight_std=weight_std,
            bias_std=bias_std,
            seed=seed,
        )
        with torch.no_grad():
            f = model.double()(x)
        covariances.append((f @ f.T / n_outputs).numpy())
    covariances = np.array(covariances)
    mean = covariances.mean(0)
    stderr = covariances.std(0, ddof=1) / math.sqrt(n_nets)
    expected = analytic_nngp(
        x, depth=2, activation=activation, weight_std=weight_std, bias_std=bias_std
    ).numpy()
    assert np.all(np.abs(mean - expected) <= 5 * stderr)


def test_cross_kernels_are_blocks_of_the_joint_kernel() -> None:
    x1, x2 = _inputs(3, 6, seed=4), _inputs(5, 6, seed=5)
    options = {"depth": 3, "activation": "erf", "weight_std": 1.0, "bias_std": 0.3}
    joint = analytic_ntk(torch.cat([x1, x2]), **options)
    cross = analytic_ntk(x1, x2, **options)
    assert cross.shape == (3, 5) and cross.dtype == torch.float64
    torch.testing.assert_close(cross, joint[:3, 3:])
    torch.testing.assert_close(analytic_ntk(x1, **options), analytic_ntk(x1, x1, **options))
    images = x2.reshape(5, 1, 2, 3)
    torch.testing.assert_close(analytic_nngp(images, **options), analytic_nngp(x2, **options))


def _relative_distances(activation: str, widths: list[int], n_seeds: int) -> list[float]:
    """Mean over seeds of ‖eNTK_trace / K − Θ∞‖_F / ‖Θ∞‖_F at init under `ntk`."""
    x, n_outputs = _inputs(20, 16, seed=6), 2
    distances = []
    for width in widths:
        per_seed = []
        for seed in range(n_seeds):
            model = build_model(
                "mlp",
                width=width,
                depth=2,
                in_shape=(16,),
                n_outputs=n_outputs,
                parameterization="ntk",
                activation=activation,
                seed=seed,
            ).double()
            empirical = ntklens.ntk(model, x, output="trace") / n_outputs
            limit = infinite_kernel_for(model)(x, None)
            per_seed.append(
                (torch.linalg.norm(empirical - limit) / torch.linalg.norm(limit)).item()
            )
        distances.append(float(np.mean(per_seed)))
    return distances


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_entk_approaches_analytic_ntk_with_width(activation: str) -> None:
    """The acceptance criterion: at init under `ntk` the eNTK's relative distance to the
    analytic NTK falls like n^-1/2 over widths 64…4096 (fitted slope −0.5 ± 0.15)."""
    widths = [64, 128, 256, 512, 1024, 2048, 4096]
    distances = _relative_distances(activation, widths, n_seeds=4)
    slope = np.polyfit(np.log(widths), np.log(distances), 1)[0]
    assert -0.65 <= slope <= -0.35
    assert distances[-1] / distances[0] < 2 * math.sqrt(widths[0] / widths[-1])


def test_full_entk_tends_to_kronecker_with_identity() -> None:
    x = _inputs(10, 16, seed=7)
    model = build_model(
        "mlp",
        width=2048,
        depth=2,
        in_shape=(16,),
        n_outputs=2,
        parameterization="ntk",
        activation="erf",
    ).double()
    full = ntklens.ntk(model, x, output="full")
    limit = infinite_kernel_for(model)(x, None)
    norm = torch.linalg.norm(limit)
    for a in range(2):
        assert torch.linalg.norm(full[:, a, :, a] - limit) / norm < 0.1
    assert torch.linalg.norm(full[:, 0, :, 1]) / norm < 0.1


def test_infinite_kernel_for_uses_the_models_own_hyperparameters() -> None:
    x = _inputs(4, 6, seed=8)
    model = build_model(
        "mlp",
        width=8,
        depth=3,
        in_shape=(6,),
        n_outputs=2,
        parameterization="ntk",
        activation="erf",
        weight_std=1.4,
        bias_std=0.3,
    )
    kernel = infinite_kernel_for(model)
    expected = analytic_ntk(x, depth=3, activation="erf", weight_std=1.4, bias_std=0.3)
    torch.testing.assert_close(kernel(x, None), expected)


@pytest.mark.parametrize(
    "arguments",
    [
        {"family": "mlp", "parameterization": "standard"},
        {"family": "mlp", "parameterization": "mup"},
        {"family": "mlp", "parameterization": "ntk", "activation": "tanh"},
        {"family": "cnn", "parameterization": "ntk"},
    ],
)
def test_infinite_kernel_for_is_none_without_a_closed_form(arguments: dict) -> None:
    family = arguments.pop("family")
    model = build_model(family, width=4, depth=1, in_shape=(1, 4, 4), n_outputs=2, **arguments)
    assert infinite_kernel_for(model) is None
    assert infinite_kernel_for(torch.nn.Linear(3, 2)) is None


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"depth": 0}, "depth"),
        ({"activation": "tanh"}, "activation"),
        ({"weight_std": 0.0}, "weight_std"),
        ({"bias_std": -0.1}, "bias_std"),
        ({"x2": torch.zeros(2, 5)}, "features"),
        ({"x2": torch.zeros(4)}, "x2"),
    ],
)
def test_bad_arguments_raise_one_line_errors(arguments: dict, named: str) -> None:
    call = {"depth": 2, "activation": "relu", "weight_std": 1.0, "bias_std": 0.1} | arguments
    with pytest.raises(NtkLensError, match=named) as error:
        analytic_ntk(torch.zeros(3, 4), **call)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("depth", [1, 3])
def test_relu_ntk_of_identical_inputs_is_exact(depth: int) -> None:
    """Identical inputs have cos = 1 at every layer: the diagonal follows the closed form
    Σ ← σ_w²Σ/2 + σ_b², Θ ← Σ + Θσ_w²/2 to rounding (an inconsistent covariance and
    variance would put the arccos at an angle of ~1e-8 and lose ~1e-8 of Θ)."""
    x = _inputs(48, 784, seed=5) * 0.8 + 0.3
    x[7] = x[3]  # a duplicate within the set
    w2, b2 = 2.0, 0.01
    options = {"depth": depth, "weight_std": math.sqrt(w2), "bias_std": math.sqrt(b2)}
    sigma = w2 * (x * x).sum(1) / x.shape[1] + b2
    theta = sigma.clone()
    for _ in range(depth):
        sigma = w2 * sigma / 2 + b2
        theta = sigma + theta * w2 / 2
    kernel = analytic_ntk(x, **options)
    torch.testing.assert_close(kernel.diagonal(), theta, rtol=1e-13, atol=0)
    torch.testing.assert_close(kernel[3, 7], theta[3], rtol=1e-13, atol=0)
    cross = analytic_ntk(x[:10], x[5:], **options)  # rows 5..9 appear in both sets
    torch.testing.assert_close(cross[5:10, :5].diagonal(), theta[5:10], rtol=1e-13, atol=0)
    torch.testing.assert_close(cross, kernel[:10, 5:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", [analytic_ntk, analytic_nngp])
def test_row_blocks_give_the_kernel_of_one_block(which, monkeypatch: pytest.MonkeyPatch) -> None:
    """The closed form is computed in row blocks (memory: ~10 temporaries of a block, not of
    the kernel); blocks of 3 rows, a last partial block and a cross kernel give the kernel
    of a single block, and the exact diagonal of identical inputs survives the blocking."""
    x = _inputs(11, 9, seed=8)
    x[9] = x[2]
    options = {"depth": 2, "weight_std": 1.4, "bias_std": 0.2}
    whole, cross = which(x, **options), which(x[:4], x, **options)
    monkeypatch.setattr("ntklens.infinite.BLOCK_ENTRIES", 3 * len(x))
    blocked = which(x, **options)
    torch.testing.assert_close(blocked, whole, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(which(x[:4], x, **options), cross, rtol=1e-13, atol=1e-15)
    assert blocked[2, 9] == blocked[2, 2] == blocked[9, 9]

"""Scaling-law fits: recovery of planted exponents, CI coverage, fit range, Huber, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import optimize
from sklearn.metrics import r2_score

from ntklens.analysis import compare_exponents, fit_power_law, fit_trend
from ntklens.analysis.bootstrap import case_counts
from ntklens.analysis.fits import _offset_batched_lm
from ntklens.errors import NtkLensError

SIZES = np.geomspace(100, 10_000, 6)


def power_law_data(
    rng: np.random.Generator,
    *,
    a: float = 3.0,
    alpha: float = 0.4,
    c: float = 0.0,
    noise: float = 0.1,
    seeds: int = 4,
    sizes: np.ndarray = SIZES,
) -> tuple[np.ndarray, np.ndarray]:
    """``seeds`` runs per size of ``(a·x^−α + c)·exp(noise·N(0,1))``."""
    x = np.repeat(sizes, seeds)
    y = (a * x**-alpha + c) * np.exp(noise * rng.standard_normal(x.size))
    return x, y


@pytest.mark.parametrize(("a", "alpha"), [(3.0, 0.4), (0.5, 1.2), (20.0, -0.3)])
def test_power_law_recovers_planted_parameters(a: float, alpha: float) -> None:
    x, y = power_law_data(np.random.default_rng(1), a=a, alpha=alpha)
    fit = fit_power_law(x, y)
    assert fit.ci["alpha"][0] < alpha < fit.ci["alpha"][1]
    assert fit.ci["a"][0] < a < fit.ci["a"][1]
    assert abs(fit.alpha - alpha) < 0.05
    assert (fit.model, fit.n_points, fit.resampling) == ("power", x.size, "cases")


def test_power_law_point_estimate_matches_polyfit_and_r2_matches_sklearn() -> None:
    x, y = power_law_data(np.random.default_rng(2))
    fit = fit_power_law(x, y)
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    assert fit.alpha == pytest.approx(-slope, rel=1e-10)
    assert fit.params["a"] == pytest.approx(np.exp(intercept), rel=1e-10)
    assert fit.r2 == pytest.approx(r2_score(np.log(y), np.log(fit.predict(x))), rel=1e-10)


def test_offset_power_law_recovers_exponent_and_floor() -> None:
    x, y = power_law_data(np.random.default_rng(3), a=5.0, alpha=0.7, c=0.05, noise=0.03)
    fit = fit_power_law(x, y, offset=True)
    assert fit.model == "power_offset"
    for name, truth in {"a": 5.0, "alpha": 0.7, "c": 0.05}.items():
        assert fit.ci[name][0] < truth < fit.ci[name][1], name
    assert abs(fit.alpha - 0.7) < 0.1
    pure = fit_power_law(x, y)
    assert pure.alpha < fit.ci["alpha"][0]  # ignoring the floor flattens the curve


def test_offset_fit_reaches_floor_bound_when_there_is_no_offset() -> None:
    x, y = power_law_data(np.random.default_rng(4), alpha=0.5, noise=0.02)
    fit = fit_power_law(x, y, offset=True)
    assert fit.params["c"] >= 0.0
    assert fit.ci["c"][0] == 0.0
    assert fit.ci["alpha"][0] < 0.5 < fit.ci["alpha"][1]


@pytest.mark.parametrize("huber", [False, True])
def test_batched_offset_refits_match_scipy_least_squares(huber: bool) -> None:
    rng = np.random.default_rng(5)
    x, y = power_law_data(rng, a=5.0, alpha=0.7, c=0.05, noise=0.05)
    u, v = np.log(x) - np.log(x).mean(), np.log(y) - np.log(y).mean()
    counts = case_counts(x, 40, rng).astype(float)
    start = np.array([-0.5, 0.6, 0.3])
    scale = 0.05 if huber else None
    batched, _ = _offset_batched_lm(
        u, np.broadcast_to(v, counts.shape), counts, scale, np.tile(start, (40, 1))
    )

    def residuals(theta: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.log(np.exp(theta[0] - theta[1] * u[rows]) + theta[2]) - v[rows]

    for weights, theta in zip(counts, batched, strict=True):
        rows = np.repeat(np.arange(len(u)), weights.astype(int))
        reference = optimize.least_squares(
            residuals,
            start,
            args=(rows,),
            bounds=([-np.inf, -np.inf, 0.0], np.inf),
            loss="huber" if huber else "linear",
            f_scale=scale or 1.0,
            xtol=1e-14,
            ftol=1e-14,
            gtol=1e-14,
        )
        np.testing.assert_allclose(theta, reference.x, atol=1e-6)


def _coverage(fit_kwargs: dict, truth: float, repeats: int, **data_kwargs) -> float:
    rng = np.random.default_rng(100)
    hits = 0
    for repeat in range(repeats):
        x, y = power_law_data(rng, **data_kwargs)
        low, high = fit_power_law(x, y, seed=repeat, **fit_kwargs).ci["alpha"]
        hits += low <= truth <= high
    return hits / repeats


def test_power_law_ci_coverage_with_seeds() -> None:
    coverage = _coverage({"n_bootstrap": 400}, 0.4, 200, alpha=0.4, seeds=3)
    assert 0.80 <= coverage <= 1.0


def test_power_law_ci_coverage_with_one_run_per_size() -> None:
    sizes = np.geomspace(100, 10_000, 10)
    coverage = _coverage({"n_bootstrap": 400}, 0.4, 200, alpha=0.4, seeds=1, sizes=sizes)
    assert 0.80 <= coverage <= 1.0


def test_offset_ci_coverage() -> None:
    coverage = _coverage(
        {"offset": True, "n_bootstrap": 200}, 0.7, 60, a=5.0, alpha=0.7, c=0.05, noise=0.03
    )
    assert 0.80 <= coverage <= 1.0


def test_group_bootstrap_covers_seed_level_slope_variation() -> None:
    """Resampling whole seeds stays calibrated when each seed's curve has its own slope."""
    rng = np.random.default_rng(7)
    n_seeds, hits, repeats = 8, 0, 120
    x = np.repeat(SIZES, n_seeds)
    groups = np.tile(np.arange(n_seeds), len(SIZES))
    for repeat in range(repeats):
        seed_alpha = 0.4 + 0.05 * rng.standard_normal(n_seeds)
        y = 3.0 * x ** -seed_alpha[groups] * np.exp(0.02 * rng.standard_normal(x.size))
        fit = fit_power_law(x, y, groups=groups, n_bootstrap=400, seed=repeat)
        hits += fit.ci["alpha"][0] <= 0.4 <= fit.ci["alpha"][1]
    assert fit.resampling == "groups"
    assert 0.80 <= hits / repeats <= 1.0


def test_fit_range_selects_the_regime() -> None:
    rng = np.random.default_rng(8)
    x = np.repeat(np.geomspace(10, 100_000, 13), 3)
    # slope 0.2 below x = 1000, 0.8 above, continuous at the break
    y = np.where(x < 1000, x**-0.2, 1000**0.6 * x**-0.8) * np.exp(
        0.05 * rng.standard_normal(x.size)
    )
    low = fit_power_law(x, y, x_range=(None, 1000))
    high = fit_power_law(x, y, x_range=(1000, None))
    assert abs(low.alpha - 0.2) < 0.03 and abs(high.alpha - 0.8) < 0.03
    assert (low.x_max, high.x_min) == (1000.0, 1000.0)
    assert low.n_points == 3 * 7 and high.n_points == 3 * 7
    whole = fit_power_law(x, y)
    assert low.alpha < whole.alpha < high.alpha


def test_huber_resists_an_outlier() -> None:
    x, y = power_law_data(np.random.default_rng(9), alpha=0.4, noise=0.05)
    y[np.argmax(x)] *= 30.0  # one corrupted run at the largest size
    squares = fit_power_law(x, y)
    huber = fit_power_law(x, y, huber=True)
    assert abs(huber.alpha - 0.4) < abs(squares.alpha - 0.4) / 3
    assert huber.ci["alpha"][0] < 0.4 < huber.ci["alpha"][1]


def test_compare_exponents_finds_planted_difference() -> None:
    rng = np.random.default_rng(10)
    fit_a = fit_power_law(*power_law_data(rng, alpha=0.6), seed=1)
    fit_b = fit_power_law(*power_law_data(rng, alpha=0.3), seed=2)
    fit_c = fit_power_law(*power_law_data(rng, alpha=0.3), seed=3)
    different = compare_exponents(fit_a, fit_b)
    assert different["diff"] == pytest.approx(fit_a.alpha - fit_b.alpha)
    assert different["ci"][0] < 0.3 < different["ci"][1]
    assert different["excludes_zero"]
    same = compare_exponents(fit_b, fit_c)
    assert same["ci"][0] < 0.0 < same["ci"][1] and not same["excludes_zero"]
    # independent errors add in quadrature: the CI is wider than either fit's own
    width = different["ci"][1] - different["ci"][0]
    assert width > max(np.ptp(fit_a.ci["alpha"]), np.ptp(fit_b.ci["alpha"]))


def test_trend_directions() -> None:
    rng = np.random.default_rng(11)
    x = np.repeat(SIZES, 3)
    noise = 0.01 * rng.standard_normal(x.size)
    rising = fit_trend(x, 0.2 * np.log10(x) - 1.0 + noise)
    assert rising.direction == "increases"
    assert rising.ci[0] < 0.2 < rising.ci[1]
    assert fit_trend(x, -np.log(x) + noise).direction == "decreases"
    flat = fit_trend(x, np.full(x.size, -0.3))
    assert (flat.direction, flat.slope) == ("flat", 0.0)


def test_to_dict_is_json() -> None:
    x, y = power_law_data(np.random.default_rng(12))
    payload = fit_power_law(x, y, offset=True).to_dict()
    decoded = json.loads(json.dumps(payload, allow_nan=False))
    assert set(decoded["params"]) == set(decoded["ci"]) == {"a", "alpha", "c"}


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "message"),
    [
        ([1, 2, 1, 2], [1, 2, 3, 4], {}, "at least 3 distinct x"),
        ([1, 2, 3], [1, 2, 3], {"offset": True}, "at least 4 distinct x"),
        ([1, 2, 3], [1, -2, 3], {}, "y must be positive"),
        ([0, 2, 3], [1, 2, 3], {}, "x must be positive"),
        ([1, 2, 3], [1, np.nan, 3], {}, "finite"),
        ([1, 2, 3], [1, 2], {}, "equal length"),
        ([1, 2, 3, 4], [1, 2, 3, 4], {"x_range": (3, 2)}, "empty"),
        ([1, 2, 3, 4], [1, 2, 3, 4], {"x_range": (3, None)}, "at least 3 distinct x"),
        ([1, 2, 3], [1, 2, 3], {"n_bootstrap": 5}, "n_bootstrap"),
        ([1, 2, 3], [1, 2, 3], {"confidence": 1.5}, "confidence"),
        ([1, 2, 3], [1, 2, 3], {"groups": [0, 1]}, "groups"),
    ],
)
def test_bad_inputs_give_one_line_errors(x, y, kwargs, message) -> None:
    with pytest.raises(NtkLensError, match=message) as info:
        fit_power_law(np.array(x, float), np.array(y, float), **kwargs)
    assert "\n" not in str(info.value)

"""Transition-width estimators: planted break widths and thresholds are recovered."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ntklens.analysis import (
    advantage_transition,
    broken_power_law_transition,
    llm_ratio,
    threshold_transition,
)
from ntklens.errors import NtkLensError

GRID = 2.0 ** np.arange(4, 13)  # 16 … 4096
SEEDS = 4


def broken_power_law(
    widths: np.ndarray, w_star: float, beta_feature: float, beta_lazy: float, smoothness: float
) -> np.ndarray:
    """Caballero et al.'s one-break law, written directly from its published form."""
    ratio = widths / w_star
    bend = (1 + ratio ** (1 / smoothness)) ** (-(beta_lazy - beta_feature) * smoothness)
    return 0.8 * ratio ** (-beta_feature) * bend


def test_broken_power_law_recovers_planted_breaks_within_ci() -> None:
    rng = np.random.default_rng(1)
    widths = np.repeat(GRID, SEEDS)
    hits, repeats = 0, 20
    for w_star, smoothness in [(256.0, 0.5), (90.0, 0.2), (400.0, 0.3)]:
        ratios, slopes = [], []
        for repeat in range(repeats):
            delta = broken_power_law(widths, w_star, 0.05, 1.0, smoothness)
            delta *= np.exp(0.1 * rng.standard_normal(widths.size))
            estimate = broken_power_law_transition(widths, delta, n_bootstrap=200, seed=repeat)
            hits += estimate.ci[0] <= w_star <= estimate.ci[1]
            ratios.append(estimate.w_star / w_star)
            slopes.append(estimate.details["beta_lazy"])
        assert np.mean(np.abs(np.log(ratios)) < np.log(1.5)) >= 0.85
        assert 1 / 1.15 < np.median(ratios) < 1.15
        assert abs(np.median(slopes) - 1.0) < 0.15
    assert hits / (3 * repeats) >= 0.8


def test_broken_power_law_without_a_break_lands_on_the_grid_edge() -> None:
    rng = np.random.default_rng(2)
    widths = np.repeat(GRID, SEEDS)
    delta = widths**-0.5 * np.exp(0.05 * rng.standard_normal(widths.size))
    estimate = broken_power_law_transition(widths, delta, n_bootstrap=100)
    assert estimate.details["at_grid_edge"]
    # a single power law fits as well: the break is rejected and no w* leaves the estimator
    assert not estimate.identified and estimate.details["delta_bic"] < 10
    assert estimate.to_dict()["w_star"] is None and estimate.to_dict()["ci"] == [None, None]
    assert estimate.reason.startswith("not identified within [16, 4096]")


def test_threshold_matches_closed_form_without_noise() -> None:
    # Δ = min(1, (w/w0)^−β): it halves at w0·2^(1/β), on a power-law segment where
    # log-log interpolation between grid widths is exact.
    w0, beta = 100.0, 0.7
    widths = np.repeat(GRID, 2)
    delta = np.minimum(1.0, (widths / w0) ** -beta)
    estimate = threshold_transition(widths, delta, fraction=0.5, n_bootstrap=50)
    truth = w0 * 2 ** (1 / beta)
    assert estimate.w_star == pytest.approx(truth, rel=1e-12)
    assert estimate.ci == pytest.approx((truth, truth), rel=1e-12)


def test_threshold_recovers_planted_width_within_ci() -> None:
    rng = np.random.default_rng(3)
    w0, beta = 100.0, 1.0
    widths = np.repeat(GRID, SEEDS)
    delta = np.minimum(1.0, (widths / w0) ** -beta) * np.exp(0.1 * rng.standard_normal(widths.size))
    estimate = threshold_transition(widths, delta, fraction=0.25)
    truth = w0 * 4.0
    assert estimate.ci[0] < truth < estimate.ci[1]
    assert estimate.details["beyond_widths_share"] == 0.0


def test_threshold_beyond_the_widths_is_reported_not_invented() -> None:
    widths = np.repeat(GRID, 2)
    delta = np.ones(widths.size) + 0.01 * (widths == GRID[1])
    estimate = threshold_transition(widths, delta, n_bootstrap=50)
    assert estimate.w_star == np.inf
    assert "exceeds the widths" in estimate.details["reason"]
    payload = json.loads(json.dumps(estimate.to_dict(), allow_nan=False))
    assert payload["w_star"] is None


def advantage_losses(
    rng: np.random.Generator, zero_width: float, noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kernel and network losses whose gap falls linearly in log w, to zero at ``zero_width``."""
    widths = np.repeat(GRID, SEEDS)
    kernel_loss = 1.0 + noise * rng.standard_normal(widths.size)
    gap = 0.3 * (1 - np.log(widths / GRID[0]) / np.log(zero_width / GRID[0]))
    network_loss = kernel_loss - gap + noise * rng.standard_normal(widths.size)
    return widths, kernel_loss, network_loss


def test_advantage_matches_closed_form_without_noise() -> None:
    widths, kernel_loss, network_loss = advantage_losses(np.random.default_rng(0), 2000.0, 0.0)
    half = advantage_transition(widths, kernel_loss, network_loss, fraction=0.5, n_bootstrap=50)
    assert half.w_star == pytest.approx(np.sqrt(GRID[0] * 2000.0), rel=1e-10)
    zero = advantage_transition(widths, kernel_loss, network_loss, fraction=0.0, n_bootstrap=50)
    assert zero.w_star == pytest.approx(2000.0, rel=1e-10)


def test_advantage_recovers_planted_width_within_ci() -> None:
    widths, kernel_loss, network_loss = advantage_losses(np.random.default_rng(4), 1500.0, 0.01)
    estimate = advantage_transition(widths, kernel_loss, network_loss, fraction=0.0)
    assert estimate.ci[0] < 1500.0 < estimate.ci[1]
    assert estimate.method == "advantage"


def test_advantage_that_is_never_positive_has_no_width() -> None:
    widths = np.repeat(GRID, 2)
    estimate = advantage_transition(widths, np.ones(widths.size), np.full(widths.size, 1.5))
    assert np.isnan(estimate.w_star)
    assert "nowhere positive" in estimate.details["reason"]


def test_single_seed_gives_no_threshold_ci() -> None:
    delta = np.minimum(1.0, (GRID / 100.0) ** -1.0)
    estimate = threshold_transition(GRID, delta, n_bootstrap=50)
    assert np.isfinite(estimate.w_star) and np.isnan(estimate.ci[0])
    assert "single run" in estimate.details["ci_reason"]


def test_llm_ratio() -> None:
    assert llm_ratio(2048.0) == {"4096": 0.5, "12288": pytest.approx(2048 / 12288)}
    assert llm_ratio(512.0, (1024,)) == {"1024": 0.5}
    with pytest.raises(NtkLensError, match="llm_widths"):
        llm_ratio(512.0, (0,))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: threshold_transition([64, 128, 64], [1.0, 0.5, 1.0]), "at least 3 distinct"),
        (lambda: broken_power_law_transition(GRID[:4], GRID[:4] ** -1.0), "at least 5 distinct"),
        (lambda: threshold_transition(GRID, -np.ones(GRID.size)), "non-negative"),
        (lambda: threshold_transition(GRID, np.ones(GRID.size), fraction=1.0), "fraction"),
        (lambda: threshold_transition(GRID, np.ones(3)), "equal length"),
        (lambda: advantage_transition(GRID, np.ones(GRID.size), np.ones(3)), "equal length"),
        (lambda: broken_power_law_transition(GRID, np.zeros(GRID.size)), "positive"),
    ],
)
def test_bad_inputs_give_one_line_errors(call, message) -> None:
    with pytest.raises(NtkLensError, match=message) as info:
        call()
    assert "\n" not in str(info.value)

"""Scaling-law fits with bootstrap confidence intervals, and monotone trends.

Two models, both fitted in float64 to log residuals ``r = log y − log model(x)``:

* ``"power"``: ``y = a · x^(−α)``. Least squares on log residuals is a straight-line fit of
  ``log y`` on ``log x``, solved in closed form (with ``huber``, by iteratively reweighted
  least squares, which converges to the global optimum because the Huber loss is convex).
* ``"power_offset"``: ``y = a · x^(−α) + c`` with ``a > 0`` and ``c ≥ 0``; a grid of starts
  over ``α`` and ``c``, the best polished by bounded ``scipy.optimize.least_squares``.
  Starts and bootstrap replicates run together through a vectorized Levenberg–Marquardt.

Uncertainty comes from a bootstrap over runs (see :mod:`ntklens.analysis.bootstrap`): rows
that share ``x`` are the seeds of one configuration and are resampled within their ``x``
(or whole ``groups`` are resampled). When no ``x`` is replicated, the log residuals of the
fit are resampled instead. Every replicate is refitted; intervals are percentile intervals.
Non-positive ``x`` or ``y`` inside the fit range are an error, never silently dropped: a
power law of a quantity that reaches zero or changes sign is not defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import optimize, stats

from ntklens.analysis.bootstrap import (
    case_counts,
    check_bootstrap_args,
    finite_or_none,
    percentile_interval,
    resampling_name,
    residual_draws,
)
from ntklens.errors import NtkLensError

Model = Literal["power", "power_offset"]
DEFAULT_BOOTSTRAP = {"power": 1000, "power_offset": 300}
HUBER_TUNING = 1.345  # 95% efficiency under Gaussian residuals
_IRLS_ITERATIONS = 100
_OFFSET_ALPHA_STARTS = (0.1, 0.3, 0.6, 1.0, 2.0)
_OFFSET_C_FRACTIONS = (0.0, 0.3, 0.6, 0.9)


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted power law with percentile confidence intervals for every parameter.

    ``params`` holds ``a`` and ``alpha`` (and ``c`` for ``"power_offset"``); ``ci`` maps each
    name to ``(low, high)``; ``r2`` is the coefficient of determination of ``log y``.
    ``alpha_draws`` are the bootstrap replicates of ``alpha``, kept for comparisons.
    """

    model: Model
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    r2: float
    n_points: int
    x_min: float
    x_max: float
    n_bootstrap: int
    confidence: float
    resampling: str
    alpha_draws: np.ndarray = field(repr=False, compare=False)

    @property
    def alpha(self) -> float:
        """The fitted exponent α of ``x^(−α)``."""
        return self.params["alpha"]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The fitted curve at ``x``."""
        x = np.asarray(x, dtype=np.float64)
        return self.params["a"] * x ** (-self.alpha) + self.params.get("c", 0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (plain floats, NaN as ``None``), without the raw draws."""
        return {
            "model": self.model,
            "params": {k: finite_or_none(v) for k, v in self.params.items()},
            "ci": {k: [finite_or_none(lo), finite_or_none(hi)] for k, (lo, hi) in self.ci.items()},
            "r2": finite_or_none(self.r2),
            "n_points": self.n_points,
            "x_min": self.x_min,
            "x_max": self.x_max,
            "n_bootstrap": self.n_bootstrap,
            "confidence": self.confidence,
            "resampling": self.resampling,
        }


@dataclass(frozen=True)
class Trend:
    """The slope of ``y`` per decade of ``x`` with its bootstrap CI, and Spearman's ρ.

    ``direction`` is ``"increases"`` or ``"decreases"`` when the slope's interval excludes
    zero, else ``"flat"``. Works for signed quantities, where no power law exists.
    """

    slope: float
    ci: tuple[float, float]
    spearman: float
    direction: str
    n_points: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary."""
        return {
            "direction": self.direction,
            "slope_per_decade": finite_or_none(self.slope),
            "ci": [finite_or_none(self.ci[0]), finite_or_none(self.ci[1])],
            "spearman": finite_or_none(self.spearman),
            "n_points": self.n_points,
            "confidence": self.confidence,
        }


def fit_power_law(
    x: np.ndarray,
    y: np.ndarray,
    *,
    offset: bool = False,
    groups: np.ndarray | None = None,
    x_range: tuple[float | None, float | None] | None = None,
    huber: bool = False,
    n_bootstrap: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> PowerLawFit:
    """Fit ``y = a·x^(−α)`` (or ``+ c`` with ``offset``) with bootstrap CIs.

    ``x_range=(low, high)`` keeps ``low ≤ x ≤ high`` (either end may be ``None``);
    ``groups`` labels rows resampled together (e.g. seeds shared across ``x``); ``huber``
    uses the Huber loss with scale 1.345 × the MAD of the least-squares log residuals.
    ``n_bootstrap`` defaults to 1000 replicates (300 for the offset model, which refits
    each one with an optimizer).
    """
    model: Model = "power_offset" if offset else "power"
    n_bootstrap = DEFAULT_BOOTSTRAP[model] if n_bootstrap is None else n_bootstrap
    check_bootstrap_args(n_bootstrap, confidence)
    x, y, groups = _select(x, y, groups, x_range, min_distinct=4 if offset else 3)
    rng = np.random.default_rng(seed)
    log_x_ref, log_y_ref = float(np.mean(np.log(x))), float(np.mean(np.log(y)))
    u, v = np.log(x) - log_x_ref, np.log(y) - log_y_ref
    counts = case_counts(x, n_bootstrap, rng, groups=groups)
    if offset:
        theta, replicates, fitted = _offset_with_bootstrap(u, v, huber, counts, n_bootstrap, rng)
    else:
        scale = None
        if huber:
            intercept, slope = _line(u, v[None, :], np.ones((1, len(u))), None)[0]
            scale = _huber_scale(v - intercept - slope * u)
        theta, replicates, fitted = _line_with_bootstrap(u, v, scale, counts, n_bootstrap, rng)
        theta, replicates = theta * [1.0, -1.0], replicates * [1.0, -1.0]  # slope = −α
    # theta holds (log a, α[, c]) in the centred units u, v; convert back to x and y.
    estimates = _natural_params(theta[None, :], log_x_ref, log_y_ref)
    draws = _natural_params(replicates, log_x_ref, log_y_ref)
    ss_tot = float(np.sum((v - v.mean()) ** 2))
    r2 = 1.0 - float(np.sum((v - fitted) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    return PowerLawFit(
        model=model,
        params={k: float(val[0]) for k, val in estimates.items()},
        ci={k: percentile_interval(d, confidence) for k, d in draws.items()},
        r2=r2,
        n_points=len(x),
        x_min=float(x.min()),
        x_max=float(x.max()),
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        resampling=resampling_name(counts, groups),
        alpha_draws=draws["alpha"],
    )


def fit_trend(
    x: np.ndarray,
    y: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Trend:
    """The least-squares slope of ``y`` against ``log10 x``, bootstrapped like a fit.

    Tells whether a quantity that may be signed (an alignment, a change) rises or falls
    along a scaling axis; ``y`` may take any finite values, ``x`` must be positive.
    """
    check_bootstrap_args(n_bootstrap, confidence)
    x, y, groups = _select(x, y, groups, None, min_distinct=3, positive_y=False)
    rng = np.random.default_rng(seed)
    u = np.log10(x)
    counts = case_counts(x, n_bootstrap, rng, groups=groups)
    theta, replicates, _ = _line_with_bootstrap(u, y, None, counts, n_bootstrap, rng)
    low, high = percentile_interval(replicates[:, 1], confidence)
    direction = "increases" if low > 0 else "decreases" if high < 0 else "flat"
    spearman = stats.spearmanr(x, y).statistic if np.ptp(y) > 0 else float("nan")
    return Trend(
        slope=float(theta[1]),
        ci=(low, high),
        spearman=float(spearman),
        direction=direction,
        n_points=len(x),
        confidence=confidence,
    )


def compare_exponents(
    fit_a: PowerLawFit, fit_b: PowerLawFit, confidence: float = 0.95
) -> dict[str, Any]:
    """The difference ``α_a − α_b`` of two independent fits with its percentile CI.

    The fits' bootstrap draws are treated as independent: the interval is taken over all
    pairwise differences (each side thinned to at most 2000 evenly spaced quantiles).
    """
    if not 0.0 < confidence < 1.0:
        raise NtkLensError(f"confidence must lie in (0, 1), got {confidence!r}; e.g. 0.95")
    draws_a, draws_b = _thinned(fit_a.alpha_draws), _thinned(fit_b.alpha_draws)
    low, high = percentile_interval(np.subtract.outer(draws_a, draws_b).ravel(), confidence)
    return {
        "alpha_a": fit_a.alpha,
        "alpha_b": fit_b.alpha,
        "diff": fit_a.alpha - fit_b.alpha,
        "ci": [finite_or_none(low), finite_or_none(high)],
        "confidence": confidence,
        "excludes_zero": bool(low > 0 or high < 0),
    }


def _select(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None,
    x_range: tuple[float | None, float | None] | None,
    *,
    min_distinct: int,
    positive_y: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate the inputs and keep the rows inside ``x_range``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise NtkLensError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != x.shape:
            raise NtkLensError(
                f"groups must have one label per point ({len(x)}), got {len(groups)}"
            )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise NtkLensError("x and y must be finite; drop NaN/inf rows (e.g. failed runs) first")
    keep = np.ones(len(x), dtype=bool)
    if x_range is not None:
        low, high = x_range
        if low is not None and high is not None and not low < high:
            raise NtkLensError(f"x_range=({low}, {high}) is empty; give low < high")
        keep &= (x >= (-np.inf if low is None else low)) & (x <= (np.inf if high is None else high))
    x, y = x[keep], y[keep]
    groups = None if groups is None else groups[keep]
    if np.any(x <= 0):
        raise NtkLensError("x must be positive for a power law; restrict x_range to x > 0")
    if positive_y and np.any(y <= 0):
        raise NtkLensError(
            f"y must be positive for a power-law fit, got min {y.min():.3g}; fit |y| or a "
            "shifted quantity, or narrow x_range"
        )
    n_distinct = len(np.unique(x))
    if n_distinct < min_distinct:
        raise NtkLensError(
            f"need at least {min_distinct} distinct x values in the fit range, got {n_distinct}; "
            "widen x_range or add sizes to the sweep"
        )
    return x, y, groups


def _weighted_line(
    u: np.ndarray, values: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares (intercept, slope) of each row of ``values`` on ``u``.

    A row whose weight sits on a single ``u`` (possible when whole groups are resampled)
    has no slope and gives NaN, which the percentile intervals skip.
    """
    total = weights.sum(axis=1)
    mean_u = weights @ u / total
    mean_v = (weights * values).sum(axis=1) / total
    du = u[None, :] - mean_u[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (weights * du * (values - mean_v[:, None])).sum(axis=1) / (weights * du * du).sum(
            axis=1
        )
    return mean_v - slope * mean_u, slope


def _line(
    u: np.ndarray, values: np.ndarray, weights: np.ndarray, scale: float | None
) -> np.ndarray:
    """(intercept, slope) per row; with a Huber ``scale``, by IRLS from the LS solution."""
    intercept, slope = _weighted_line(u, values, weights)
    if scale is not None:
        for _ in range(_IRLS_ITERATIONS):
            residuals = np.abs(values - intercept[:, None] - slope[:, None] * u)
            huber_weights = scale / np.maximum(residuals, scale)
            new_intercept, new_slope = _weighted_line(u, values, weights * huber_weights)
            converged = max(
                np.max(np.abs(new_intercept - intercept)), np.max(np.abs(new_slope - slope))
            )
            intercept, slope = new_intercept, new_slope
            if converged < 1e-12:
                break
    return np.column_stack([intercept, slope])


def _line_with_bootstrap(
    u: np.ndarray,
    v: np.ndarray,
    scale: float | None,
    counts: np.ndarray | None,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point (intercept, slope), its replicates ``(R, 2)`` and the fitted values."""
    theta = _line(u, v[None, :], np.ones((1, len(u))), scale)[0]
    fitted = theta[0] + theta[1] * u
    if counts is None:
        values = fitted + residual_draws(v - fitted, 2, n_bootstrap, rng)
        replicates = _line(u, values, np.ones_like(values), scale)
    else:
        replicates = _line(u, np.broadcast_to(v, counts.shape), counts.astype(np.float64), scale)
    return theta, replicates, fitted


def _offset_log_model(theta: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``log(exp(log a − α u) + c)`` in the centred units."""
    return np.log(np.exp(theta[0] - theta[1] * u) + theta[2])


def _offset_solve(
    u: np.ndarray, v: np.ndarray, scale: float | None, start: np.ndarray
) -> optimize.OptimizeResult:
    """Bounded least squares (c ≥ 0) of the offset model's log residuals from ``start``."""

    def residuals(theta: np.ndarray) -> np.ndarray:
        return _offset_log_model(theta, u) - v

    def jacobian(theta: np.ndarray) -> np.ndarray:
        power = np.exp(theta[0] - theta[1] * u)
        model = power + theta[2]
        return np.column_stack([power / model, -u * power / model, 1.0 / model])

    return optimize.least_squares(
        residuals,
        start,
        jac=jacobian,
        bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, np.inf]),
        loss="linear" if scale is None else "huber",
        f_scale=1.0 if scale is None else scale,
    )


def _offset_multistart(u: np.ndarray, v: np.ndarray, scale: float | None) -> np.ndarray:
    """The best offset-model fit over a grid of starts in α and c (c below min y).

    All starts run at once in the batched Levenberg–Marquardt; the best is polished with
    ``scipy.optimize.least_squares`` (trust-region reflective, bounded).
    """
    alpha_line = -_weighted_line(u, v[None, :], np.ones((1, len(u))))[1][0]
    sign = 1.0 if alpha_line >= 0 else -1.0
    alphas = np.array([alpha_line, *(sign * a for a in _OFFSET_ALPHA_STARTS)])
    y = np.exp(v)
    starts = []
    for alpha in alphas:
        for fraction in _OFFSET_C_FRACTIONS:
            c = fraction * y.min()
            starts.append([float(np.median(np.log(y - c) + alpha * u)), alpha, c])
    values = np.broadcast_to(v, (len(starts), len(v)))
    thetas, costs = _offset_batched_lm(u, values, np.ones_like(values), scale, np.array(starts))
    return _offset_solve(u, v, scale, thetas[np.argmin(costs)]).x


def _offset_with_bootstrap(
    u: np.ndarray,
    v: np.ndarray,
    huber: bool,
    counts: np.ndarray | None,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offset-model (log a, α, c), replicates ``(R, 3)`` refitted from the estimate, fit."""
    theta = _offset_multistart(u, v, None)
    scale = None
    if huber:
        scale = _huber_scale(v - _offset_log_model(theta, u))
        theta = _offset_multistart(u, v, scale)
    fitted = _offset_log_model(theta, u)
    if counts is None:
        values = fitted + residual_draws(v - fitted, 3, n_bootstrap, rng)
        weights = np.ones_like(values)
    else:
        values, weights = np.broadcast_to(v, counts.shape), counts.astype(np.float64)
    replicates, _ = _offset_batched_lm(u, values, weights, scale, np.tile(theta, (len(values), 1)))
    return theta, replicates, fitted


def _huber_loss(residuals: np.ndarray, scale: float | None) -> np.ndarray:
    """Elementwise ½r² (or the Huber loss with threshold ``scale``)."""
    if scale is None:
        return 0.5 * residuals**2
    magnitude = np.abs(residuals)
    return np.where(magnitude <= scale, 0.5 * residuals**2, scale * magnitude - 0.5 * scale**2)


def _offset_batched_lm(
    u: np.ndarray,
    values: np.ndarray,
    weights: np.ndarray,
    scale: float | None,
    starts: np.ndarray,
    max_iterations: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit the offset model to every row of ``values`` at once, row ``r`` from ``starts[r]``.

    A Levenberg–Marquardt with an active set for the bound ``c ≥ 0``, vectorized over
    replicates (a Python loop of ``least_squares`` calls is over ten times slower); the Huber loss
    enters through IRLS weights. Returns ``(R, 3)`` rows of (log a, α, c) and their costs.
    """
    n_rows = values.shape[0]
    theta = starts.astype(np.float64, copy=True)
    damping = np.full(n_rows, 1e-3)

    def evaluate(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        exponent = np.minimum(theta[:, :1] - theta[:, 1:2] * u, 700.0)
        power = np.exp(exponent)
        model = power + theta[:, 2:3]
        residuals = np.log(model) - values
        cost = (weights * _huber_loss(residuals, scale)).sum(axis=1)
        return residuals, cost, np.stack([power / model, -u * power / model, 1 / model], -1)

    residuals, cost, jacobian = evaluate(theta)
    active = np.ones(n_rows, dtype=bool)
    for _ in range(max_iterations):
        irls = weights if scale is None else weights * scale / np.maximum(np.abs(residuals), scale)
        normal = np.einsum("rn,rni,rnj->rij", irls, jacobian, jacobian)
        gradient = np.einsum("rn,rni,rn->ri", irls, jacobian, residuals)
        blocked = (theta[:, 2] <= 0.0) & (gradient[:, 2] > 0.0)
        normal[blocked, 2, :] = 0.0
        normal[blocked, :, 2] = 0.0
        normal[blocked, 2, 2] = 1.0
        gradient[blocked, 2] = 0.0
        diagonal = np.einsum("rii->ri", normal)
        damped = normal + (damping[:, None] * (diagonal + 1e-12))[:, :, None] * np.eye(3)
        step = -np.linalg.solve(damped, gradient[:, :, None])[:, :, 0]
        trial = theta + step
        trial[:, 2] = np.maximum(trial[:, 2], 0.0)
        trial_residuals, trial_cost, trial_jacobian = evaluate(trial)
        better = active & (trial_cost < cost)
        converged = np.max(np.abs(step) / (1.0 + np.abs(theta)), axis=1) < 1e-10
        theta[better] = trial[better]
        residuals[better], cost[better] = trial_residuals[better], trial_cost[better]
        jacobian[better] = trial_jacobian[better]
        damping = np.where(better, damping / 3.0, damping * 4.0)
        active &= ~converged & (damping < 1e12)
        if not active.any():
            break
    return theta, cost


def _huber_scale(residuals: np.ndarray) -> float:
    """The Huber threshold: 1.345 robust standard deviations (MAD) of the residuals."""
    mad = stats.median_abs_deviation(residuals, scale="normal")
    return HUBER_TUNING * max(float(mad), 1e-12)


def _natural_params(theta: np.ndarray, log_x_ref: float, log_y_ref: float) -> dict[str, np.ndarray]:
    """Map rows of (log a, α[, c]) from the centred units back to ``a``, ``alpha``, ``c``."""
    params = {
        "a": np.exp(theta[:, 0] + log_y_ref + theta[:, 1] * log_x_ref),
        "alpha": theta[:, 1],
    }
    if theta.shape[1] == 3:
        params["c"] = theta[:, 2] * math.exp(log_y_ref)
    return params


def _thinned(draws: np.ndarray, limit: int = 2000) -> np.ndarray:
    """At most ``limit`` evenly spaced quantiles of the finite draws."""
    draws = draws[np.isfinite(draws)]
    if draws.size <= limit:
        return draws
    return np.quantile(draws, (np.arange(limit) + 0.5) / limit)

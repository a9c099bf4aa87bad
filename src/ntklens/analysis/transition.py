"""The feature–kernel transition width w* from a width sweep, with bootstrap CIs.

As width grows, training changes the kernel less and less (the lazy, kernel regime); below
some width w* the network learns features. Three estimators of w*, each bootstrapped over
the runs (seeds) of every width like the scaling-law fits
(:mod:`ntklens.analysis.bootstrap`):

* :func:`broken_power_law_transition` fits a smoothly broken power law to a kernel change
  Δ(w) and reads off its break.
* :func:`threshold_transition` finds where the seed-mean Δ first falls below a fraction of
  its maximum.
* :func:`advantage_transition` does the same for the feature-learning advantage, the
  kernel-regression test loss minus the network's test loss.

A ``w_star`` of ``inf`` means the curve never fell below the threshold within the widths
(w* lies beyond the sweep); ``nan`` means it is not identified (e.g. no advantage anywhere).

The broken power law is a model of a *transition*, so its break is reported only where the
data prefer it (:data:`BREAK_CHECKS`): the break beats a single power law by
ΔBIC ≥ :data:`MIN_DELTA_BIC`, the lazy-side slope is negative and steeper than the
feature-side one, at least two widths lie on each side of w*, and w* with its whole
interval lies strictly inside the swept widths. Otherwise ``identified`` is false, the
estimate's ``to_dict`` carries no w* and ``reason`` says which check failed. The threshold
and advantage crossings are descriptive (a width where a curve falls to a fraction of its
peak), not tests of a transition; ``analysis.findings`` decides what counts as w*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ntklens.analysis.bootstrap import (
    case_counts,
    check_bootstrap_args,
    finite_or_none,
    percentile_interval,
    resampling_name,
    residual_draws,
)
from ntklens.errors import NtkLensError

DEFAULT_LLM_WIDTHS = (4096, 12288)
MIN_WIDTHS = 3
MIN_WIDTHS_BROKEN = 5  # four parameters (amplitude, two slopes, break) need a spare width
MIN_DELTA_BIC = 10.0  # "very strong" evidence for the break on Kass & Raftery's (1995) scale
MIN_WIDTHS_PER_SIDE = 2  # each slope of the broken power law rests on ≥ 2 widths
BREAK_CHECKS = (
    "break preferred over a single power law (ΔBIC ≥ 10)",
    "lazy-side slope negative (β_lazy > 0)",
    "curve steepens past the break (β_lazy > β_feature)",
    "≥ 2 widths on each side of w*",
    "w* and its CI strictly inside the swept widths",
)
SMOOTHNESS_GRID = np.geomspace(0.05, 1.0, 10)  # bend widths s, natural-log units of width


@dataclass(frozen=True)
class TransitionEstimate:
    """An estimate of the transition width w* with its percentile interval ``ci``.

    ``details`` holds the method's own numbers (slopes, threshold, the seed-mean curve,
    the share of bootstrap replicates whose w* lies beyond the sweep). ``identified`` is
    false when the method's own validity checks fail (``reason`` says which); such an
    estimate's :meth:`to_dict` holds no w* and no interval.
    """

    method: str
    w_star: float
    ci: tuple[float, float]
    confidence: float
    n_bootstrap: int
    details: dict[str, Any]
    identified: bool = True
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary; non-finite numbers become ``None`` (see ``details``).

        An estimate that failed its checks gives ``w_star`` and ``ci`` as ``None`` with
        ``identified: false`` and the ``reason``; its fitted numbers stay only in
        ``details`` (slopes, ΔBIC), never as a w*.
        """
        shown = self.identified
        return {
            "method": self.method,
            "identified": self.identified,
            "reason": self.reason,
            "w_star": finite_or_none(self.w_star) if shown else None,
            "ci": [finite_or_none(b) if shown else None for b in self.ci],
            "confidence": self.confidence,
            "n_bootstrap": self.n_bootstrap,
            "details": self.details,
        }


def broken_power_law_transition(
    widths: np.ndarray,
    delta: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    smoothness: float | None = None,
    n_grid: int = 100,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> TransitionEstimate:
    """w* as the break of a smoothly broken power law fitted to the kernel change Δ(w).

    The form is the one-break "broken neural scaling law" of Caballero et al. (2022,
    arXiv:2210.14891) without its constant:
    ``Δ(w) = A·(w/w*)^(−β₁)·(1 + (w/w*)^(1/s))^(−(β₂−β₁)·s)``: slope −β₁ in the feature regime
    below w*, −β₂ in the lazy regime above it, and a bend ``s`` wide in natural-log units of
    width (fitted from a grid of 0.05 … 1 unless ``smoothness`` fixes it). It is fitted to
    ``log Δ`` by least squares. For given (w*, s) the model is linear in (log A, β₁, β₂), so
    the fit profiles those out on ``n_grid`` log-spaced w* spanning the measured widths
    (times the s grid) and refines the best w* by a parabola; all bootstrap replicates are
    solved at once the same way.

    The estimate is ``identified`` only if it passes every check of :data:`BREAK_CHECKS`;
    ``details["checks"]`` lists each with its outcome and ``details["delta_bic"]`` is
    BIC(single power law) − BIC(broken), both from the Gaussian log-likelihood of the
    log residuals of all runs (k = 2 against 4, or 5 with a fitted bend).
    """
    check_bootstrap_args(n_bootstrap, confidence)
    if smoothness is not None and not smoothness > 0:
        raise NtkLensError(f"smoothness must be positive, got {smoothness!r}; e.g. 0.5")
    if n_grid < 10:
        raise NtkLensError(f"n_grid={n_grid} is too coarse; use at least 10 (100 is typical)")
    widths, (delta,), groups = _validate(widths, [delta], groups, MIN_WIDTHS_BROKEN, "delta")
    if np.any(delta <= 0):
        raise NtkLensError("delta must be positive for a broken power-law fit; drop zero changes")
    rng = np.random.default_rng(seed)
    bends = SMOOTHNESS_GRID if smoothness is None else np.array([float(smoothness)])
    log_w = np.log(widths)
    v = np.log(delta)
    v_ref = float(v.mean())
    v = v - v_ref
    grid = np.linspace(log_w.min(), log_w.max(), n_grid)
    distinct, index = np.unique(log_w, return_inverse=True)
    features = _broken_design(distinct - grid[None, :, None], bends[:, None, None])[..., 1:]
    log_break, bend_index = _profile_break(features, grid, index, v[None, :], np.ones((1, len(v))))
    log_break, bend = float(log_break[0]), float(bends[bend_index[0]])
    point_design = _broken_design(log_w - log_break, bend)
    coef, *_ = np.linalg.lstsq(point_design, v, rcond=None)
    fitted = point_design @ coef
    counts = case_counts(widths, n_bootstrap, rng, groups=groups)
    if counts is None:
        n_params = 4 if smoothness is not None else 5
        values = fitted + residual_draws(v - fitted, n_params, n_bootstrap, rng)
        weights = np.ones_like(values)
    else:
        values, weights = np.broadcast_to(v, counts.shape), counts.astype(np.float64)
    draws = np.exp(_profile_break(features, grid, index, values, weights)[0])
    step = grid[1] - grid[0]
    ss_tot = float(np.sum(v**2))
    w_star = float(np.exp(log_break))
    ci = percentile_interval(draws, confidence, estimate=w_star)
    n_params = 4 if smoothness is not None else 5
    delta_bic = _bic(v - _line_fit(log_w, v), 2) - _bic(v - fitted, n_params)
    distinct_widths = np.unique(widths)
    checks = dict(
        zip(
            BREAK_CHECKS,
            [
                bool(delta_bic >= MIN_DELTA_BIC),
                bool(coef[2] > 0),
                bool(coef[2] > coef[1]),
                bool(
                    min(np.sum(distinct_widths < w_star), np.sum(distinct_widths > w_star))
                    >= MIN_WIDTHS_PER_SIDE
                ),
                bool(
                    np.isfinite(ci[0])
                    and np.isfinite(ci[1])
                    and ci[0] > distinct_widths[0] * (1 + 1e-9)
                    and ci[1] < distinct_widths[-1] * (1 - 1e-9)
                ),
            ],
            strict=True,
        )
    )
    failed = [name for name, passed in checks.items() if not passed]
    details = {
        "beta_feature": float(coef[1]),
        "beta_lazy": float(coef[2]),
        "amplitude": float(np.exp(coef[0] + v_ref)),
        "smoothness": bend,
        "smoothness_fitted": smoothness is None,
        "r2": 1.0 - float(np.sum((v - fitted) ** 2)) / ss_tot if ss_tot > 0 else None,
        "at_grid_edge": bool(min(log_break - grid[0], grid[-1] - log_break) < step),
        "delta_bic": float(delta_bic),
        "checks": checks,
        "resampling": resampling_name(counts, groups),
        **_curve_details(widths, delta),
    }
    reason = None
    if failed:
        low, high = distinct_widths[0], distinct_widths[-1]
        reason = f"not identified within [{low:g}, {high:g}]: fails {'; '.join(failed)}"
        details["rejected"] = {"w_star": w_star, "ci": [finite_or_none(b) for b in ci]}
    return TransitionEstimate(
        method="broken_power_law",
        w_star=w_star,
        ci=ci,
        confidence=confidence,
        n_bootstrap=n_bootstrap,
        details=details,
        identified=not failed,
        reason=reason,
    )


def threshold_transition(
    widths: np.ndarray,
    delta: np.ndarray,
    *,
    fraction: float = 0.5,
    groups: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> TransitionEstimate:
    """w* where the seed-mean kernel change first falls below ``fraction`` of its maximum.

    The search starts at the width with the largest mean Δ; between grid widths the curve is
    interpolated linearly in (log w, log Δ), which is exact on a power-law segment. The CI is
    a bias-corrected percentile interval: a maximum of noisy means sits high, and its
    bootstrap replicates higher still.
    """
    if not 0.0 < fraction < 1.0:
        raise NtkLensError(f"fraction must lie in (0, 1), got {fraction!r}; e.g. 0.5")
    widths, (delta,), groups = _validate(widths, [delta], groups, MIN_WIDTHS, "delta")
    if np.any(delta < 0):
        raise NtkLensError("delta must be non-negative (a size of change); pass |Δ|")
    return _crossing_estimate(
        "threshold", widths, delta, fraction, True, groups, n_bootstrap, confidence, seed
    )


def advantage_transition(
    widths: np.ndarray,
    kernel_loss: np.ndarray,
    network_loss: np.ndarray,
    *,
    fraction: float = 0.5,
    groups: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> TransitionEstimate:
    """w* where the feature-learning advantage falls below ``fraction`` of its maximum.

    The advantage of a run is ``kernel_loss − network_loss``: how much better the trained
    network does than kernel regression with its own step-0 eNTK. ``fraction=0`` finds where
    the advantage first turns negative. Between grid widths the seed-mean advantage is
    interpolated linearly in log w. If the advantage is nowhere positive, w* is ``nan``.
    """
    if not 0.0 <= fraction < 1.0:
        raise NtkLensError(f"fraction must lie in [0, 1), got {fraction!r}; e.g. 0.5")
    widths, (kernel_loss, network_loss), groups = _validate(
        widths, [kernel_loss, network_loss], groups, MIN_WIDTHS, "losses"
    )
    advantage = kernel_loss - network_loss
    return _crossing_estimate(
        "advantage", widths, advantage, fraction, False, groups, n_bootstrap, confidence, seed
    )


def llm_ratio(
    w_star: float, llm_widths: tuple[int, ...] = DEFAULT_LLM_WIDTHS
) -> dict[str, float | None]:
    """w* divided by each typical LLM hidden size, keyed by that size as a string."""
    if not llm_widths or any(w <= 0 for w in llm_widths):
        raise NtkLensError(f"llm_widths must be positive hidden sizes, got {llm_widths!r}")
    return {str(int(w)): finite_or_none(w_star / w) for w in llm_widths}


def _validate(
    widths: np.ndarray,
    arrays: list[np.ndarray],
    groups: np.ndarray | None,
    min_widths: int,
    name: str,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
    """Check shapes, finiteness and the number of distinct widths."""
    widths = np.asarray(widths, dtype=np.float64)
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    if widths.ndim != 1 or any(a.shape != widths.shape for a in arrays):
        raise NtkLensError(f"widths and {name} must be 1-D arrays of equal length")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != widths.shape:
            raise NtkLensError(f"groups must have one label per run ({len(widths)})")
    if not all(np.all(np.isfinite(a)) for a in [widths, *arrays]):
        raise NtkLensError(f"widths and {name} must be finite; drop failed runs first")
    if np.any(widths <= 0):
        raise NtkLensError("widths must be positive hidden sizes; drop rows with width ≤ 0")
    n_widths = len(np.unique(widths))
    if n_widths < min_widths:
        raise NtkLensError(
            f"the transition width needs at least {min_widths} distinct widths, got {n_widths}; "
            "sweep over more widths"
        )
    return widths, arrays, groups


def _line_fit(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Fitted values of the least-squares line of ``v`` on ``u`` (a single power law in logs)."""
    slope, intercept = np.polyfit(u, v, 1)
    return intercept + slope * u


def _bic(residuals: np.ndarray, n_params: int) -> float:
    """Gaussian BIC ``n·log(SSE/n) + k·log n`` (SSE floored so exact fits stay finite)."""
    n = len(residuals)
    sse = max(float(np.sum(residuals**2)), 1e-300 * n)
    return n * np.log(sse / n) + n_params * np.log(n)


def _broken_design(u: np.ndarray, smoothness: np.ndarray | float) -> np.ndarray:
    """Columns (1, −(u − softplus), −softplus) of the broken power law at ``u = log(w/w*)``.

    ``log Δ = log A − β₁·(u − sp(u)) − β₂·sp(u)`` with ``sp(u) = s·log(1 + e^(u/s))``.
    """
    soft = smoothness * np.logaddexp(0.0, u / smoothness)
    return np.stack([np.ones_like(soft), -(u - soft), -soft], axis=-1)


def _profile_break(
    features: np.ndarray,
    grid: np.ndarray,
    index: np.ndarray,
    values: np.ndarray,
    weights: np.ndarray,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares (log w*, index of s) of each row of ``values`` over the grids.

    ``features`` is ``(S, T, k, 2)``: the two slope columns of the design at the ``k``
    distinct widths for each candidate (s, log w*); ``index`` maps rows to distinct widths.
    The intercept is eliminated in closed form (Schur complement), leaving one 2×2 system
    per (row, candidate). The best log w* is refined by a parabola through its grid
    neighbours at the best s.
    """
    n_bends, n_breaks, n_widths, _ = features.shape
    f1 = features[..., 0].reshape(-1, n_widths).T
    f2 = features[..., 1].reshape(-1, n_widths).T
    one_hot = np.eye(n_widths)[index]
    sse = np.empty((len(values), n_bends * n_breaks))

    def project(row_weights: np.ndarray, columns: np.ndarray) -> np.ndarray:
        # einsum, not BLAS: these products have a tiny inner dimension, and multithreaded
        # BLAS runs them tens of times slower on a busy machine.
        return np.einsum("rk,kc->rc", row_weights, columns)

    for start in range(0, len(values), chunk):
        w = project(weights[start : start + chunk], one_hot)
        wv = project(weights[start : start + chunk] * values[start : start + chunk], one_hot)
        wvv = (weights[start : start + chunk] * values[start : start + chunk] ** 2).sum(axis=1)
        n00, b0 = w.sum(axis=1)[:, None], wv.sum(axis=1)[:, None]
        n01, n02, b1, b2 = project(w, f1), project(w, f2), project(wv, f1), project(wv, f2)
        s11 = project(w, f1 * f1) - n01 * n01 / n00
        s12 = project(w, f1 * f2) - n01 * n02 / n00
        s22 = project(w, f2 * f2) - n02 * n02 / n00
        t1, t2 = b1 - n01 * b0 / n00, b2 - n02 * b0 / n00
        s11, s22 = s11 * (1 + 1e-10), s22 * (1 + 1e-10)  # keeps collinear candidates finite
        explained = (s22 * t1 * t1 - 2 * s12 * t1 * t2 + s11 * t2 * t2) / (s11 * s22 - s12 * s12)
        sse[start : start + chunk] = wvv[:, None] - b0 * b0 / n00 - explained
    sse = sse.reshape(len(values), n_bends, n_breaks)
    rows = np.arange(len(values))
    best_flat = np.argmin(sse.reshape(len(values), -1), axis=1)
    bend_index, edge = np.unravel_index(best_flat, sse.shape[1:])
    profile = sse[rows, bend_index]
    best = np.clip(edge, 1, n_breaks - 2)
    left, mid, right = profile[rows, best - 1], profile[rows, best], profile[rows, best + 1]
    curvature = left - 2 * mid + right
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(curvature > 0, 0.5 * (left - right) / curvature, 0.0)
    at_edge = (edge == 0) | (edge == n_breaks - 1)
    shift = np.where(at_edge, edge - best, np.clip(shift, -1, 1))
    return grid[best] + shift * (grid[1] - grid[0]), bend_index


def _crossing_estimate(
    method: str,
    widths: np.ndarray,
    values: np.ndarray,
    fraction: float,
    log_values: bool,
    groups: np.ndarray | None,
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> TransitionEstimate:
    """w* where the seed-mean curve first falls below ``fraction`` × its peak, bootstrapped."""
    check_bootstrap_args(n_bootstrap, confidence)
    rng = np.random.default_rng(seed)
    grid, index = np.unique(widths, return_inverse=True)
    one_hot = np.eye(len(grid))[index]
    mean = (values @ one_hot) / one_hot.sum(axis=0)
    log_w_star = _first_crossing(np.log(grid), mean[None, :], fraction, log_values)[0]
    counts = case_counts(widths, n_bootstrap, rng, groups=groups, hold_singletons=True)
    details: dict[str, Any] = {
        "fraction": fraction,
        "peak_width": float(grid[np.argmax(mean)]),
        "peak_value": float(mean.max()),
        "resampling": "none" if counts is None else resampling_name(counts, groups),
        **_curve_details(widths, values),
    }
    if np.isnan(log_w_star):
        details["reason"] = "the curve is nowhere positive, so there is no regime to leave"
    elif np.isinf(log_w_star):
        details["reason"] = "the curve never falls below the threshold; w* exceeds the widths"
    ci = (float("nan"), float("nan"))
    if counts is None:
        details["ci_reason"] = "every width has a single run; add seeds for a CI"
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            curves = ((counts * values) @ one_hot) / (counts @ one_hot)
        draws = _first_crossing(np.log(grid), curves, fraction, log_values)
        details["beyond_widths_share"] = float(np.mean(np.isposinf(draws)))
        details["unidentified_share"] = float(np.mean(np.isnan(draws)))
        ci = percentile_interval(np.exp(draws), confidence, estimate=float(np.exp(log_w_star)))
    return TransitionEstimate(
        method=method,
        w_star=float(np.exp(log_w_star)),
        ci=ci,
        confidence=confidence,
        n_bootstrap=n_bootstrap,
        details=details,
        identified=bool(np.isfinite(log_w_star)),
        reason=details.get("reason"),
    )


def _first_crossing(
    log_w: np.ndarray, curves: np.ndarray, fraction: float, log_values: bool
) -> np.ndarray:
    """Per row of ``curves`` ``(R, k)``: log w where it first drops below ``fraction``·peak.

    Searches after the peak only; interpolates linearly in log w against the value (or its
    log, with ``log_values``). ``+inf`` when it never drops, ``nan`` when the peak is ≤ 0
    or the row has a missing width.
    """
    rows = np.arange(len(curves))
    peak_index = np.argmax(np.nan_to_num(curves, nan=-np.inf), axis=1)
    peak = curves[rows, peak_index]
    level = fraction * peak
    after_peak = np.arange(curves.shape[1])[None, :] > peak_index[:, None]
    below = (curves < level[:, None]) & after_peak
    first = np.argmax(below, axis=1)
    before = np.maximum(first - 1, 0)
    high, low, target = curves[rows, before], curves[rows, first], level
    if log_values:
        floor = np.maximum(peak, np.finfo(float).tiny) * 1e-12
        high, low, target = (np.log(np.maximum(a, floor)) for a in (high, low, target))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (target - high) / (low - high)
        crossing = log_w[before] + t * (log_w[first] - log_w[before])
    crossing = np.where(below.any(axis=1), crossing, np.inf)
    invalid = ~(peak > 0) | np.isnan(curves).any(axis=1)
    return np.where(invalid, np.nan, crossing)


def _curve_details(widths: np.ndarray, values: np.ndarray) -> dict[str, list[float]]:
    """The measured widths and the seed-mean curve, for plots and reports."""
    grid, index = np.unique(widths, return_inverse=True)
    mean = np.bincount(index, weights=values) / np.bincount(index)
    return {"widths": grid.tolist(), "mean": mean.tolist()}

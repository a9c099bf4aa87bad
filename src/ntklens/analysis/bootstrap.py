"""Bootstrap resampling plans shared by the scaling-law fits and the transition estimators.

Rows that share an ``x`` value are the seeds (independent runs) of one configuration. A
case bootstrap is stratified by ``x`` so that every ``x`` appears in every replicate, and
draws ``m − 1`` of the ``m`` rows of a stratum (McCarthy & Snowden 1985): the plain
``m``-of-``m`` draw shrinks every variance by ``(m − 1)/m``, which with the usual 3–5 seeds
gives confidence intervals that are too narrow. Replicates are count matrices,
``counts[r, i]`` = how often row ``i`` enters replicate ``r``, so a fit can solve all of
them at once as weighted problems.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from ntklens.errors import NtkLensError

MIN_BOOTSTRAP = 20


def check_bootstrap_args(n_bootstrap: int, confidence: float) -> None:
    """Reject a replicate count or confidence level that cannot give an interval."""
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int | np.integer):
        raise NtkLensError(f"n_bootstrap must be an integer, got {n_bootstrap!r}")
    if n_bootstrap < MIN_BOOTSTRAP:
        raise NtkLensError(
            f"n_bootstrap={n_bootstrap} is too few for a percentile interval; "
            f"use at least {MIN_BOOTSTRAP} (1000 is typical)"
        )
    if not 0.0 < confidence < 1.0:
        raise NtkLensError(f"confidence must lie in (0, 1), got {confidence!r}; e.g. 0.95")


def case_counts(
    x: np.ndarray,
    n_bootstrap: int,
    rng: np.random.Generator,
    *,
    groups: np.ndarray | None = None,
    hold_singletons: bool = False,
) -> np.ndarray | None:
    """Row counts ``(n_bootstrap, n)`` of a stratified (or, with ``groups``, cluster) bootstrap.

    Without ``groups`` the rows of each distinct ``x`` are resampled among themselves
    (``m − 1`` draws from ``m``). With ``groups`` (e.g. seed labels shared across ``x``)
    whole groups are resampled (``G − 1`` draws from ``G``) and each row gets its group's
    count. Returns ``None`` when the rows carry no replication to resample: fewer than two
    groups, or an ``x`` with a single row (unless ``hold_singletons``, which keeps such
    rows fixed and needs at least one replicated ``x``).
    """
    n = len(x)
    if groups is not None:
        labels, index = np.unique(groups, return_inverse=True)
        if len(labels) < 2:
            return None
        draws = rng.multinomial(len(labels) - 1, np.full(len(labels), 1 / len(labels)), n_bootstrap)
        return draws[:, index]
    _, index, sizes = np.unique(x, return_inverse=True, return_counts=True)
    if sizes.max() < 2 or (sizes.min() < 2 and not hold_singletons):
        return None
    counts = np.ones((n_bootstrap, n), dtype=np.int64)
    for stratum, size in enumerate(sizes):
        if size < 2:
            continue
        rows = np.flatnonzero(index == stratum)
        counts[:, rows] = rng.multinomial(size - 1, np.full(size, 1 / size), n_bootstrap)
    return counts


def residual_draws(
    residuals: np.ndarray, n_params: int, n_bootstrap: int, rng: np.random.Generator
) -> np.ndarray:
    """Resampled residuals ``(n_bootstrap, n)`` for a residual bootstrap of a fitted model.

    Used when the rows carry no replication. Residuals are centred and inflated by
    ``sqrt(n / (n − p))`` so that their spread is not shrunk by the ``p`` fitted parameters.
    """
    n = len(residuals)
    scaled = (residuals - residuals.mean()) * np.sqrt(n / max(n - n_params, 1))
    return scaled[rng.integers(0, n, size=(n_bootstrap, n))]


def percentile_interval(
    draws: np.ndarray, confidence: float, *, estimate: float | None = None
) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of ``draws``; NaN draws are ignored.

    With ``estimate``, the interval is bias-corrected (Efron's BC): the tail levels move by
    twice the normal quantile of the share of draws below the estimate. That repairs
    estimators whose replicates sit systematically to one side (a threshold read off a
    noisy maximum). Infinite draws are allowed (an estimate beyond the measured range) and
    may make a bound infinite; quantiles are order statistics, never interpolated.
    """
    kept = draws[~np.isnan(draws)]
    if kept.size == 0:
        return (float("nan"), float("nan"))
    tail = (1.0 - confidence) / 2.0
    levels = np.array([tail, 1.0 - tail])
    if estimate is not None and not np.isnan(estimate):
        below = (np.sum(kept < estimate) + 0.5 * np.sum(kept == estimate)) / kept.size
        z0 = stats.norm.ppf(np.clip(below, 0.5 / kept.size, 1 - 0.5 / kept.size))
        levels = stats.norm.cdf(2 * z0 + stats.norm.ppf(levels))
    low, high = np.quantile(kept, levels, method="inverted_cdf")
    return (float(low), float(high))


def resampling_name(counts: np.ndarray | None, groups: np.ndarray | None) -> str:
    """How replicates were drawn: ``cases`` (within x), ``groups`` or, without, ``residuals``."""
    if counts is None:
        return "residuals"
    return "cases" if groups is None else "groups"


def finite_or_none(value: float) -> float | None:
    """A plain float, or ``None`` for NaN/inf (JSON has no non-finite numbers)."""
    value = float(value)
    return value if math.isfinite(value) else None

"""The paper's claims as data: for each a statistic, its CI and a verdict from a stated rule.

:func:`derive_findings` turns the fits, trends and transition estimates of
:func:`ntklens.analysis.summarize` into rows ``{claim, family, statistic, rule, verdict,
reason, parts}``. A verdict is ``"supported"``, ``"contradicted"`` or ``"inconclusive"``;
an inconclusive verdict's reason says what is missing (``"needs …"``) or which check
failed. ``c`` below is the summary's confidence (default 0.95) and every interval a
bootstrap percentile interval over runs.

Decision rules (also in :data:`RULES`, which the report prints):

* ``similar_exponents`` (claim 1a): Δα = α_data − α_width of the test loss, α_data from the
  fullest data sweep (most sizes; ties: the largest width), α_width from the fullest width
  sweep (most widths; ties: the largest n_train), and α_params, the same width sweep
  against the parameter count, where runs record ``n_params``. Every claim picks its sweeps
  this way. Equivalence test (TOST): supported if the ``1 − 2(1 − c)`` interval of Δα lies
  inside ``(−m, m)``, m = ``margin`` (default 0.05 in exponent units); contradicted if the
  ``c`` interval lies wholly outside ``[−m, m]``; else inconclusive. Both fits must first
  pass their checks: R² ≥ ``min_r2`` (default 0.8) and α > 0 (the loss falls with the
  resource), else inconclusive.
* ``opposite_kernel_dynamics`` (claim 1b): per kernel observable, the slope per decade of
  its training-induced change along the data sweep and along the width sweep. An
  observable supports the claim if both ``c`` intervals exclude zero with opposite signs,
  contradicts it if both exclude zero with the same sign, else is inconclusive. The claim
  is supported if any observable supports it, contradicted if none does and at least one
  contradicts it, else inconclusive.
* ``feature_learning_fades`` (claim 2a): the log-log slope of the kernel change against
  width in the fullest width sweep shared by the NTK and μP families. Supported if the NTK
  slope's interval lies below zero and the interval of (μP slope − NTK slope) above zero;
  contradicted if the NTK interval lies at or above zero or the difference's below zero;
  else inconclusive. Without a μP sweep: inconclusive (needs μP).
* ``max_feature_learning_width`` (claim 2b), per family on its fullest width sweep.
  (i) Advantage: per width the seed-mean of kernel0_test_loss − test_loss with its ``c``
  interval; the width is the largest one whose interval lies above zero, reported only if
  a wider swept width has an interval that does not (else w* ≥ w_max); it is given as the
  bracket [that width, the next width]. (ii) Break: the broken power law of the kernel
  change, reported only where it passes :data:`~ntklens.analysis.transition.BREAK_CHECKS`
  (ΔBIC ≥ 10 over one power law, lazy slope negative and steeper, ≥ 2 widths a side, w*
  and CI strictly inside the sweep). Supported (w* located) if either is identified; else
  inconclusive, "not identified within [w_min, w_max]" with the reasons. Never
  contradicted: a sweep can miss a transition.
* ``kernel_vs_feature_scaling`` (claim 2c): per width of the data sweeps, δ = α_network −
  α_kernel0 (the step-0 eNTK regression's data exponent). A width is feature-driven if the
  ``c`` interval of δ lies wholly outside ``[−m, m]``, kernel-driven if the ``1 − 2(1 − c)``
  interval lies inside ``(−m, m)`` (the same equivalence test as claim 1a), else
  undetermined. The meeting width is the smallest width from which every wider width is
  kernel-driven, with a feature-driven width below it. Supported if that width is
  identified, else inconclusive.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ntklens.analysis.bootstrap import case_counts, finite_or_none, percentile_interval
from ntklens.analysis.fits import PowerLawFit, compare_exponents, fit_power_law
from ntklens.analysis.transition import MIN_WIDTHS, llm_ratio
from ntklens.errors import NtkLensError

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
VERDICTS = (SUPPORTED, CONTRADICTED, INCONCLUSIVE)
DEFAULT_MARGIN = 0.05
DEFAULT_MIN_R2 = 0.8
KERNEL_OBSERVABLE_CHANGES = (
    "kernel_change",
    "entropy/change",
    "trace/change",
    "effective_rank/change",
    "alignment/change",
)

CLAIMS = {
    "similar_exponents": "Data and width scaling give similar test-loss exponents",
    "opposite_kernel_dynamics": "The kernel's training dynamics move in opposite directions "
    "under data and width scaling",
    "feature_learning_fades": "Kernel change falls with width under NTK, not under μP",
    "max_feature_learning_width": "The width beyond which the network stops learning "
    "features can be measured",
    "kernel_vs_feature_scaling": "Beyond some width the network's data scaling is its "
    "step-0 kernel's",
}
RULES = {
    "similar_exponents": "TOST: supported if the {tost:.0%} CI of Δα lies in (−{m:g}, {m:g}); "
    "contradicted if the {c:.0%} CI lies outside [−{m:g}, {m:g}]; fits need R² ≥ {r2:g} and α > 0",
    "opposite_kernel_dynamics": "per observable: both {c:.0%} CIs of the slopes exclude 0, "
    "opposite signs → supports, same sign → contradicts; the claim: any observable supports",
    "feature_learning_fades": "supported if the {c:.0%} CI of the NTK slope d log Δ/d log w is "
    "< 0 and that of (μP slope − NTK slope) is > 0; contradicted if either lies the other way",
    "max_feature_learning_width": "w* located if the largest width with loss advantage CI > 0 "
    "has a wider width without, or the kernel-change break passes its checks (ΔBIC ≥ 10, "
    "lazy slope < 0 and steeper, ≥ 2 widths a side, w* and CI inside the sweep)",
    "kernel_vs_feature_scaling": "per width: δ = α_net − α_kernel0, {c:.0%} CI outside "
    "[−{m:g}, {m:g}] → feature-driven, {tost:.0%} CI in (−{m:g}, {m:g}) → kernel-driven; "
    "supported if a width from which all wider are kernel-driven follows a feature-driven one",
}


def derive_findings(
    families: dict[str, pd.DataFrame],
    fits: dict[str, dict[str, dict[str, dict[str, PowerLawFit]]]],
    directions: dict[str, dict[str, Any]],
    transition: dict[str, Any],
    *,
    margin: float = DEFAULT_MARGIN,
    min_r2: float = DEFAULT_MIN_R2,
    llm_widths: tuple[int, ...],
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """Every claim's verdict rows, the rules they follow and the settings, JSON-able.

    ``families`` are :func:`~ntklens.analysis.summary.run_table`'s tables; ``fits`` the
    PowerLawFit objects of each ``{"data"|"width": family: group: quantity}``;
    ``directions`` and ``transition`` the summary's sections of those names.
    """
    check_finding_args(margin, min_r2)
    tost = round(1.0 - 2.0 * (1.0 - confidence), 12)
    settings = {
        "margin": margin,
        "min_r2": min_r2,
        "confidence": confidence,
        "tost_confidence": tost,
        "llm_widths": [int(w) for w in llm_widths],
    }
    context = _Context(
        families,
        fits,
        directions,
        transition,
        margin,
        min_r2,
        confidence,
        tost,
        llm_widths,
        {"n_bootstrap": n_bootstrap, "confidence": confidence, "seed": seed},
    )
    rows = [
        *_similar_exponents(context),
        *_opposite_dynamics(context),
        *_fades_with_width(context),
        *_max_feature_width(context),
        *_kernel_vs_feature(context),
    ]
    rules = {
        claim: rule.format(m=margin, c=confidence, tost=tost, r2=min_r2)
        for claim, rule in RULES.items()
    }
    for row in rows:
        row["title"] = CLAIMS[row["claim"]]
        row["rule"] = rules[row["claim"]]
    return {"settings": settings, "claims": CLAIMS, "rules": rules, "verdicts": rows}


def check_finding_args(margin: float, min_r2: float) -> None:
    """Reject an equivalence margin or R² floor that cannot decide anything."""
    if not (isinstance(margin, int | float) and math.isfinite(margin) and margin > 0):
        raise NtkLensError(f"margin must be a positive exponent difference, got {margin!r}")
    if not (isinstance(min_r2, int | float) and 0.0 <= min_r2 < 1.0):
        raise NtkLensError(f"min_r2 must lie in [0, 1), got {min_r2!r}; e.g. 0.8")


class _Context:
    """What every claim reads: the tables, fits, sections and the decision settings."""

    def __init__(
        self,
        families: dict[str, pd.DataFrame],
        fits: dict[str, dict[str, dict[str, dict[str, PowerLawFit]]]],
        directions: dict[str, dict[str, Any]],
        transition: dict[str, Any],
        margin: float,
        min_r2: float,
        confidence: float,
        tost: float,
        llm_widths: tuple[int, ...],
        options: dict[str, Any],
    ) -> None:
        self.families, self.fits, self.directions = families, fits, directions
        self.transition = transition
        self.margin, self.min_r2, self.confidence, self.tost = margin, min_r2, confidence, tost
        self.llm_widths, self.options = llm_widths, options


def _row(
    claim: str,
    family: str | None,
    verdict: str,
    reason: str,
    statistic: dict[str, Any] | None = None,
    parts: list[dict[str, Any]] | None = None,
    **details: Any,
) -> dict[str, Any]:
    return {
        "claim": claim,
        "family": family,
        "verdict": verdict,
        "reason": reason,
        "statistic": statistic,
        "parts": parts or [],
        "details": details,
    }


def _statistic(name: str, value: float | None, ci: Any, confidence: float) -> dict[str, Any]:
    bounds = [finite_or_none(b) if b is not None else None for b in (ci or (None, None))]
    return {
        "name": name,
        "value": None if value is None else finite_or_none(value),
        "ci": bounds,
        "confidence": confidence,
    }


def _needs(claim: str, what: str) -> list[dict[str, Any]]:
    return [_row(claim, None, INCONCLUSIVE, f"needs {what}")]


def _group_value(key: str) -> int:
    return int(key.split("=")[1])


def _sweep_size(runs: pd.DataFrame, key: str) -> int:
    """How many distinct values of its axis the group ``held=value`` sweeps in ``runs``."""
    held, _, value = key.partition("=")
    varied = "n_train" if held == "width" else "width"
    return int(runs.loc[runs[held] == int(value), varied].nunique())


def _largest(
    groups: dict[str, dict[str, Any]], quantity: str, runs: pd.DataFrame | None = None
) -> tuple[str | None, Any]:
    """The group that has ``quantity`` and sweeps the most values (with ``runs``), ties going
    to the largest held value: the fullest sweep where the other resource limits least."""
    keyed = [
        (_sweep_size(runs, k) if runs is not None else 0, _group_value(k), k)
        for k, g in groups.items()
        if quantity in g
    ]
    if not keyed:
        return None, None
    key = max(keyed)[2]
    return key, groups[key][quantity]


# ---- claim 1a: similar exponents ---------------------------------------------------------


def _fit_problem(fit: PowerLawFit, min_r2: float, what: str) -> str | None:
    if not fit.r2 >= min_r2:
        return f"the {what} fit has R² {fit.r2:.2f} < {min_r2:g}"
    if not fit.alpha > 0:
        return f"the {what} exponent α = {fit.alpha:.3g} ≤ 0: the loss does not fall with it"
    return None


def _equivalence(
    name: str, fit_a: PowerLawFit, fit_b: PowerLawFit, ctx: _Context
) -> tuple[str, str, dict[str, Any]]:
    """TOST verdict on α_a − α_b with margin ``ctx.margin``."""
    narrow = compare_exponents(fit_a, fit_b, confidence=ctx.tost)
    wide = compare_exponents(fit_a, fit_b, confidence=ctx.confidence)
    statistic = _statistic(name, narrow["diff"], narrow["ci"], ctx.tost)
    statistic["ci_wide"] = wide["ci"]
    m = ctx.margin
    (low, high), (wide_low, wide_high) = narrow["ci"], wide["ci"]
    if None in (low, high, wide_low, wide_high):
        return INCONCLUSIVE, "the bootstrap gave no interval for the difference", statistic
    if -m < low and high < m:
        reason = f"{ctx.tost:.0%} CI [{low:.3g}, {high:.3g}] inside ±{m:g}: equivalent"
        return SUPPORTED, reason, statistic
    if wide_low > m or wide_high < -m:
        reason = f"{ctx.confidence:.0%} CI [{wide_low:.3g}, {wide_high:.3g}] outside ±{m:g}"
        return CONTRADICTED, reason, statistic
    reason = f"{ctx.tost:.0%} CI [{low:.3g}, {high:.3g}] neither inside nor outside ±{m:g}"
    return INCONCLUSIVE, reason, statistic


def _similar_exponents(ctx: _Context) -> list[dict[str, Any]]:
    claim, rows = "similar_exponents", []
    for family in ctx.families:
        runs = ctx.families[family]
        data_key, data_fit = _largest(ctx.fits["data"].get(family, {}), "test_loss", runs)
        width_key, width_fit = _largest(ctx.fits["width"].get(family, {}), "test_loss", runs)
        if data_fit is None or width_fit is None:
            continue
        parts = []
        problem = _fit_problem(data_fit, ctx.min_r2, f"data ({data_key})") or _fit_problem(
            width_fit, ctx.min_r2, f"width ({width_key})"
        )
        name = f"α_data ({data_key}) − α_width ({width_key}), test loss"
        if problem:
            diff = compare_exponents(data_fit, width_fit, confidence=ctx.tost)
            verdict, reason = INCONCLUSIVE, problem
            statistic = _statistic(name, diff["diff"], diff["ci"], ctx.tost)
        else:
            verdict, reason, statistic = _equivalence(name, data_fit, width_fit, ctx)
        parts.append(
            {"part": "vs width", "verdict": verdict, "reason": reason, "statistic": statistic}
        )
        parts.append(_versus_parameters(ctx, family, data_fit, data_key, width_key))
        rows.append(
            _row(
                claim,
                family,
                verdict,
                reason,
                statistic,
                parts,
                alpha_data=_alpha(data_fit),
                alpha_width=_alpha(width_fit),
            )
        )
    return rows or _needs(
        claim,
        "a data sweep (≥ 3 n_train at one width) and a width sweep (≥ 3 widths at one "
        "n_train) of the test loss in one family",
    )


def _alpha(fit: PowerLawFit) -> dict[str, Any]:
    return {
        "alpha": fit.alpha,
        "ci": [finite_or_none(b) for b in fit.ci["alpha"]],
        "r2": finite_or_none(fit.r2),
        "x_range": [fit.x_min, fit.x_max],
    }


def _versus_parameters(
    ctx: _Context, family: str, data_fit: PowerLawFit, data_key: str | None, width_key: str | None
) -> dict[str, Any]:
    """α_data against the width sweep's exponent in the parameter count."""
    part = {"part": "vs parameters"}
    runs = ctx.families[family]
    if "n_params" not in runs or runs["n_params"].isna().all():
        return {
            **part,
            "verdict": INCONCLUSIVE,
            "reason": "needs the parameter count of each run (n_params)",
        }
    group = runs[runs["n_train"] == _group_value(width_key or "n_train=0")]
    group = group[np.isfinite(group["test_loss"]) & np.isfinite(group["n_params"])]
    try:
        params_fit = fit_power_law(
            group["n_params"].to_numpy(np.float64),
            group["test_loss"].to_numpy(np.float64),
            **ctx.options,
        )
    except NtkLensError as error:
        return {**part, "verdict": INCONCLUSIVE, "reason": f"needs a parameter fit: {error}"}
    problem = _fit_problem(params_fit, ctx.min_r2, "parameter-count")
    name = f"α_data ({data_key}) − α_params ({width_key}), test loss"
    if problem:
        diff = compare_exponents(data_fit, params_fit, confidence=ctx.tost)
        return {
            **part,
            "verdict": INCONCLUSIVE,
            "reason": problem,
            "statistic": _statistic(name, diff["diff"], diff["ci"], ctx.tost),
        }
    verdict, reason, statistic = _equivalence(name, data_fit, params_fit, ctx)
    return {
        **part,
        "verdict": verdict,
        "reason": reason,
        "statistic": statistic,
        "alpha_params": _alpha(params_fit),
    }


# ---- claim 1b: opposite kernel dynamics --------------------------------------------------


def _sign(trend: dict[str, Any]) -> int:
    """+1 / −1 when the trend's interval excludes zero, else 0."""
    low, high = trend["ci"]
    if low is not None and low > 0:
        return 1
    if high is not None and high < 0:
        return -1
    return 0


def _opposite_dynamics(ctx: _Context) -> list[dict[str, Any]]:
    claim, rows = "opposite_kernel_dynamics", []
    for family in ctx.families:
        along = {
            axis: {
                k: g
                for k, g in ctx.directions.get(axis, {}).get(family, {}).items()
                if k != "overall" and "skipped" not in g
            }
            for axis in ("data", "width")
        }
        if not along["data"] or not along["width"]:
            continue
        parts = []
        for quantity in KERNEL_OBSERVABLE_CHANGES:
            runs = ctx.families[family]
            data_key, data_trend = _largest(along["data"], quantity, runs)
            width_key, width_trend = _largest(along["width"], quantity, runs)
            if data_trend is None or width_trend is None:
                continue
            if "ci" not in data_trend or "ci" not in width_trend:
                continue
            signs = (_sign(data_trend), _sign(width_trend))
            if 0 in signs:
                verdict, reason = INCONCLUSIVE, "a slope CI covers 0"
            elif signs[0] != signs[1]:
                verdict, reason = SUPPORTED, "opposite signs, both CIs exclude 0"
            else:
                verdict, reason = CONTRADICTED, "same sign, both CIs exclude 0"
            parts.append(
                {
                    "part": quantity,
                    "verdict": verdict,
                    "reason": reason,
                    "statistic": {
                        "name": "slope per decade: data / width",
                        "data": {
                            "group": data_key,
                            "slope": data_trend["slope_per_decade"],
                            "ci": data_trend["ci"],
                        },
                        "width": {
                            "group": width_key,
                            "slope": width_trend["slope_per_decade"],
                            "ci": width_trend["ci"],
                        },
                        "confidence": ctx.confidence,
                    },
                }
            )
        if not parts:
            continue
        verdicts = [p["verdict"] for p in parts]
        supporting = [p["part"] for p in parts if p["verdict"] == SUPPORTED]
        if supporting:
            verdict, reason = SUPPORTED, f"opposite for {', '.join(supporting)}"
        elif CONTRADICTED in verdicts:
            against = [p["part"] for p in parts if p["verdict"] == CONTRADICTED]
            verdict = CONTRADICTED
            reason = f"same direction for {', '.join(against)}; none opposite"
        else:
            verdict, reason = INCONCLUSIVE, "no observable has both slope CIs excluding 0"
        counted = f"{len(supporting)} of {len(parts)} observables opposite"
        rows.append(
            _row(
                claim,
                family,
                verdict,
                reason,
                {
                    "name": "observables moving in opposite directions",
                    "value": len(supporting),
                    "ci": [None, None],
                    "confidence": ctx.confidence,
                    "text": counted,
                },
                parts,
            )
        )
    return rows or _needs(claim, "kernel observables along a data sweep and a width sweep")


# ---- claim 2a: feature learning fades with width -----------------------------------------


def _kernel_change_slope(fit: PowerLawFit) -> tuple[float, list[float | None], np.ndarray]:
    """The log-log slope −α of the kernel change, its CI and its bootstrap draws."""
    low, high = fit.ci["alpha"]
    return -fit.alpha, [finite_or_none(-high), finite_or_none(-low)], -fit.alpha_draws


def _fades_with_width(ctx: _Context) -> list[dict[str, Any]]:
    claim = "feature_learning_fades"
    ntk = [f for f in ctx.families if f.split(";")[0].endswith("/ntk")]
    rows = []
    for family in ntk:
        partner = family.replace("/ntk", "/mup", 1)
        ntk_groups = {
            k: g for k, g in ctx.fits["width"].get(family, {}).items() if "kernel_change" in g
        }
        if not ntk_groups:
            continue
        mup_groups = {
            k: g for k, g in ctx.fits["width"].get(partner, {}).items() if "kernel_change" in g
        }
        shared = set(ntk_groups) & set(mup_groups)
        runs = ctx.families[family]
        key = max(shared or ntk_groups, key=lambda k: (_sweep_size(runs, k), _group_value(k)))
        slope, ci, draws = _kernel_change_slope(ntk_groups[key]["kernel_change"])
        statistic = _statistic(f"NTK slope of log Δ vs log w ({key})", slope, ci, ctx.confidence)
        parts = [{"part": "NTK slope", "statistic": statistic}]
        ntk_falls = ci[1] is not None and ci[1] < 0
        ntk_rises = ci[0] is not None and ci[0] >= 0
        if key not in mup_groups:
            verdict = CONTRADICTED if ntk_rises else INCONCLUSIVE
            reason = (
                "the NTK kernel change does not fall with width"
                if ntk_rises
                else f"needs a μP width sweep ({partner}) at {key} to contrast"
            )
            rows.append(_row(claim, family, verdict, reason, statistic, parts))
            continue
        mup_slope, mup_ci, mup_draws = _kernel_change_slope(mup_groups[key]["kernel_change"])
        parts.append(
            {
                "part": "μP slope",
                "statistic": _statistic(f"μP slope ({key})", mup_slope, mup_ci, ctx.confidence),
            }
        )
        difference = np.subtract.outer(_thin(mup_draws), _thin(draws)).ravel()
        low, high = percentile_interval(difference, ctx.confidence)
        parts.append(
            {
                "part": "μP − NTK slope",
                "statistic": _statistic(
                    "μP slope − NTK slope", mup_slope - slope, [low, high], ctx.confidence
                ),
            }
        )
        if ntk_falls and low > 0:
            verdict, reason = SUPPORTED, "NTK slope CI < 0 and μP − NTK CI > 0"
        elif ntk_rises or high < 0:
            verdict = CONTRADICTED
            reason = "NTK slope CI ≥ 0" if ntk_rises else "μP falls faster than NTK"
        else:
            verdict, reason = INCONCLUSIVE, "a slope CI covers 0"
        rows.append(_row(claim, f"{family} vs {partner}", verdict, reason, statistic, parts))
    return rows or _needs(claim, "an NTK width sweep (≥ 3 widths) with a recorded kernel change")


def _thin(draws: np.ndarray, limit: int = 2000) -> np.ndarray:
    draws = draws[np.isfinite(draws)]
    if draws.size <= limit:
        return draws
    return np.quantile(draws, (np.arange(limit) + 0.5) / limit)


# ---- claim 2b: the maximum feature-learning width ----------------------------------------


def _width_group(runs: pd.DataFrame) -> int | None:
    """The n_train of the family's fullest width sweep (≥ MIN_WIDTHS widths; ties: largest n)."""
    counts = runs.groupby("n_train")["width"].nunique()
    counts = counts[counts >= MIN_WIDTHS]
    if counts.empty:
        return None
    return int(max(counts.index, key=lambda n: (counts[n], n)))


def advantage_by_width(
    widths: np.ndarray,
    advantage: np.ndarray,
    *,
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> pd.DataFrame:
    """Per width: seed mean of the advantage and its percentile CI (NaN for one seed).

    The CI resamples the runs within each width (m − 1 of m, as the fits do); widths with
    a single run keep their value and get no interval.
    """
    grid, index = np.unique(widths, return_inverse=True)
    one_hot = np.eye(len(grid))[index]
    mean = (advantage @ one_hot) / one_hot.sum(axis=0)
    low = np.full(len(grid), np.nan)
    high = np.full(len(grid), np.nan)
    counts = case_counts(widths, n_bootstrap, np.random.default_rng(seed), hold_singletons=True)
    if counts is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            curves = ((counts * advantage) @ one_hot) / (counts @ one_hot)
        for j in range(len(grid)):
            if one_hot[:, j].sum() >= 2:
                low[j], high[j] = percentile_interval(curves[:, j], confidence)
    return pd.DataFrame({"width": grid, "mean": mean, "low": low, "high": high})


def _advantage_part(ctx: _Context, runs: pd.DataFrame) -> dict[str, Any]:
    part: dict[str, Any] = {"part": "loss advantage over the step-0 kernel"}
    rows = runs[np.isfinite(runs["kernel0_test_loss"]) & np.isfinite(runs["test_loss"])]
    if rows["width"].nunique() < MIN_WIDTHS:
        reason = f"needs kernel0_test_loss and test_loss at ≥ {MIN_WIDTHS} widths"
        return {**part, "identified": False, "reason": reason}
    table = advantage_by_width(
        rows["width"].to_numpy(np.float64),
        (rows["kernel0_test_loss"] - rows["test_loss"]).to_numpy(np.float64),
        **ctx.options,
    )
    part["per_width"] = [
        {
            "width": int(r.width),
            "advantage": finite_or_none(r.mean),
            "ci": [finite_or_none(r.low), finite_or_none(r.high)],
        }
        for r in table.itertuples()
    ]
    w_min, w_max = int(table["width"].min()), int(table["width"].max())
    span = f"not identified within [{w_min}, {w_max}]"
    if table["low"].isna().all():
        return {**part, "identified": False, "reason": f"{span}: needs ≥ 2 seeds per width"}
    above = table.index[table["low"] > 0]
    if len(above) == 0:
        return {
            **part,
            "identified": False,
            "reason": f"{span}: the advantage CI is above 0 at no width",
        }
    last = int(above.max())
    if last == len(table) - 1:
        reason = f"{span}: the network still beats its step-0 kernel at w = {w_max}"
        return {**part, "identified": False, "reason": reason}
    w_star, w_next = int(table["width"].iloc[last]), int(table["width"].iloc[last + 1])
    return {
        **part,
        "identified": True,
        "w_star": w_star,
        "bracket": [w_star, w_next],
        "reason": f"advantage CI > 0 up to w = {w_star}, not at w = {w_next}",
    }


def _break_part(ctx: _Context, family: str, key: str) -> dict[str, Any]:
    part: dict[str, Any] = {"part": "kernel-change break (broken power law)"}
    entry = ctx.transition.get(family, {}).get(key, {}) if isinstance(ctx.transition, dict) else {}
    estimate = entry.get("broken_power_law") if isinstance(entry, dict) else None
    if not estimate:
        reason = entry.get("skipped") if isinstance(entry, dict) else None
        return {
            **part,
            "identified": False,
            "reason": f"needs a transition fit: {reason or 'none in the summary'}",
        }
    if "skipped" in estimate:
        return {**part, "identified": False, "reason": f"not identified: {estimate['skipped']}"}
    details = estimate.get("details", {})
    part["checks"] = details.get("checks", {})
    part["delta_bic"] = details.get("delta_bic")
    if not estimate.get("identified", False) or estimate.get("w_star") is None:
        return {**part, "identified": False, "reason": estimate.get("reason") or "not identified"}
    delta_bic = details.get("delta_bic", float("nan"))
    return {
        **part,
        "identified": True,
        "w_star": estimate["w_star"],
        "ci": estimate["ci"],
        "beta_feature": details.get("beta_feature"),
        "beta_lazy": details.get("beta_lazy"),
        "reason": f"passes every check (ΔBIC {delta_bic:.3g})",
    }


def _max_feature_width(ctx: _Context) -> list[dict[str, Any]]:
    claim, rows = "max_feature_learning_width", []
    for family, runs in ctx.families.items():
        n_train = _width_group(runs)
        if n_train is None:
            continue
        key = f"n_train={n_train}"
        group = runs[runs["n_train"] == n_train]
        w_min, w_max = int(group["width"].min()), int(group["width"].max())
        parts = [_advantage_part(ctx, group), _break_part(ctx, family, key)]
        found = [p for p in parts if p.get("identified")]
        for p in found:
            p["llm_ratio"] = llm_ratio(float(p["w_star"]), ctx.llm_widths)
        if found:
            best = next((p for p in found if "ci" in p), found[0])
            ci = best.get("ci", best.get("bracket"))
            statistic = _statistic(
                f"w* by {best['part']} ({key})", best["w_star"], ci, ctx.confidence
            )
            statistic["llm_ratio"] = best["llm_ratio"]
            reason = "; ".join(f"{p['part']}: {p['reason']}" for p in found)
            rows.append(
                _row(claim, family, SUPPORTED, reason, statistic, parts, w_range=[w_min, w_max])
            )
        else:
            span = f"not identified within [{w_min}, {w_max}]"
            reason = f"{span}: " + "; ".join(
                f"{p['part']}: {p['reason'].removeprefix(span + ': ')}" for p in parts
            )
            statistic = _statistic(f"w* ({key})", None, None, ctx.confidence)
            rows.append(
                _row(claim, family, INCONCLUSIVE, reason, statistic, parts, w_range=[w_min, w_max])
            )
    return rows or _needs(claim, f"a width sweep (≥ {MIN_WIDTHS} widths at one n_train)")


# ---- claim 2c: kernel-driven vs feature-driven scaling -----------------------------------


def _kernel_vs_feature(ctx: _Context) -> list[dict[str, Any]]:
    claim, rows = "kernel_vs_feature_scaling", []
    for family in ctx.families:
        groups = ctx.fits["data"].get(family, {})
        parts = []
        for key in sorted(groups, key=_group_value):
            network, kernel = groups[key].get("test_loss"), groups[key].get("kernel0_test_loss")
            if network is None or kernel is None:
                continue
            wide = compare_exponents(network, kernel, confidence=ctx.confidence)
            narrow = compare_exponents(network, kernel, confidence=ctx.tost)
            (low, high), (wide_low, wide_high), m = narrow["ci"], wide["ci"], ctx.margin
            if None in (low, high, wide_low, wide_high):
                status = "undetermined"
            elif wide_low > m or wide_high < -m:
                status = "feature-driven"
            elif -m < low and high < m:
                status = "kernel-driven"
            else:
                status = "undetermined"
            statistic = _statistic("α_net − α_kernel0", wide["diff"], wide["ci"], ctx.confidence)
            statistic["ci_tost"] = narrow["ci"]
            parts.append(
                {"part": key, "width": _group_value(key), "scaling": status, "statistic": statistic}
            )
        if not parts:
            continue
        widths = [p["width"] for p in parts]
        span = f"[{min(widths)}, {max(widths)}]"
        meet = _meeting_width(parts)
        if meet is not None:
            verdict, reason = SUPPORTED, f"feature-driven below w = {meet}, kernel-driven from it"
        elif len(parts) < 2:
            verdict = INCONCLUSIVE
            reason = f"needs data sweeps at ≥ 2 widths (has {widths[0]}: {parts[0]['scaling']})"
        else:
            listing = ", ".join(f"{p['width']}: {p['scaling']}" for p in parts)
            verdict = INCONCLUSIVE
            reason = f"meeting width not identified within {span} ({listing})"
        statistic = _statistic("width where α_net meets α_kernel0", meet, None, ctx.confidence)
        rows.append(_row(claim, family, verdict, reason, statistic, parts))
    return rows or _needs(claim, "a data sweep with the step-0 kernel baseline (kernel0_test_loss)")


def _meeting_width(parts: list[dict[str, Any]]) -> int | None:
    """The smallest width from which every wider width is kernel-driven, after a feature-driven
    width; ``None`` when the widths show no such switch."""
    statuses = [p["scaling"] for p in parts]
    for i in range(1, len(parts)):
        if all(s == "kernel-driven" for s in statuses[i:]) and "feature-driven" in statuses[:i]:
            if statuses[i - 1] == "feature-driven":
                return int(parts[i]["width"])
            return None
    return None

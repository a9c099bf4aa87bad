"""The scaling-law summary of a study: every fit, comparison and transition width, as JSON.

Input is the store's two tables: ``runs`` (one row per run, spec fields as columns) and
``records`` (``run_id, step, quantity, value``). Only runs with ``status == "ok"`` count.
Each run is reduced to one number per quantity:

* performance at the end: ``test_loss``, ``test_error = 1 − test_acc`` and the same for the
  step-0 kernel-regression baseline (``kernel0_test_loss``, ``kernel0_test_error``);
* for each kernel observable ``k``: ``k/init`` (step 0), ``k/end`` (the last step at which
  the run recorded it) and ``k/change = end − init``; plus ``kernel_change``, the relative
  Frobenius change of the eNTK at the end (``ntk_change``);
* ``n_params``, the trainable parameter count a run records at step 0 (a ``runs`` column of
  that name takes precedence), the resource of the parameter-count verdict.

A power law needs a quantity of one sign: a quantity whose runs are all negative is fitted
as ``|y|`` (the fit dict says ``"sign": "negative"``), one that changes sign is not fitted.
Every kernel quantity also gets a trend (slope per decade, Spearman ρ) that says whether it
rises or falls along the axis, sign or no sign.

Runs are split into families by every spec field that varies other than the scaling axes
(``n_train``, ``width``), the replicate seeds and bookkeeping (status, timings, device); a
family is named ``model/parameterization`` plus ``;field=value`` for any other field that
takes two values at one width (see ``_family_labels``). Within a family, data scaling varies
``n_train`` at each fixed width and width scaling varies ``width`` at each fixed
``n_train``; runs sharing a point are its seeds.
Groups with fewer than 3 distinct values of their axis are skipped with a reason.

Exponent comparisons set the data-scaling α at the largest width against the width-scaling
α at the largest ``n_train`` (where the other resource limits least). The transition width
is estimated per family and ``n_train`` from the width sweep: the broken power law and the
threshold on ``kernel_change``, and on two more signals (``entropy_change = |ΔS|``,
``trace_change = |ΔTr| / Tr₀``), and the feature-learning advantage
``kernel0_test_loss − test_loss``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ntklens.analysis.bootstrap import check_bootstrap_args, finite_or_none
from ntklens.analysis.findings import (
    DEFAULT_MARGIN,
    DEFAULT_MIN_R2,
    check_finding_args,
    derive_findings,
)
from ntklens.analysis.fits import PowerLawFit, compare_exponents, fit_power_law, fit_trend
from ntklens.analysis.transition import (
    DEFAULT_LLM_WIDTHS,
    MIN_WIDTHS,
    TransitionEstimate,
    advantage_transition,
    broken_power_law_transition,
    llm_ratio,
    threshold_transition,
)
from ntklens.errors import NtkLensError

PERFORMANCE = ("test_loss", "test_error", "kernel0_test_loss", "kernel0_test_error")
DEFAULT_OBSERVABLES = ("trace", "entropy", "effective_rank", "alignment")
STAGES = ("init", "end", "change")
AXES = {"data": ("n_train", "width"), "width": ("width", "n_train")}  # (varied, held fixed)
REPLICATE_COLUMNS = ("seed", "subset_seed", "probe_seed")
NON_SPEC_COLUMNS = (  # bookkeeping and where a run ran: never split a family
    "run_id",
    "n_params",
    "status",
    "error",
    "failed_step",
    "wall_time_s",
    "finished_at",
    "ntklens_version",
    "data_path",
    "device",
    "study",  # the study that planned a run: a data sweep and a width sweep share a family
)
TRANSITION_SIGNALS = ("kernel_change", "entropy_change", "trace_change")
MIN_DISTINCT = 3


def summarize(
    runs: pd.DataFrame,
    records: pd.DataFrame,
    *,
    fraction: float = 0.5,
    llm_widths: tuple[int, ...] = DEFAULT_LLM_WIDTHS,
    observables: tuple[str, ...] = DEFAULT_OBSERVABLES,
    offset: bool = False,
    transition: bool | None = None,
    margin: float = DEFAULT_MARGIN,
    min_r2: float = DEFAULT_MIN_R2,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """All scaling-law fits, exponent comparisons and transition widths of a study.

    ``observables`` are the ``ntk_<key>`` kernel observables to fit; ``offset`` adds an
    offset power-law fit (key ``"<quantity>:offset"``) for the performance quantities;
    ``fraction`` is the threshold of the threshold and advantage transition estimators.
    ``transition=None`` estimates w* wherever a family has ≥ 3 widths at one ``n_train``;
    ``True`` demands it (one-line error when the runs have no width axis); ``False`` skips.
    ``margin`` (equivalence margin of exponents) and ``min_r2`` (the R² a fit needs before
    its exponent is compared) feed the verdicts of :mod:`ntklens.analysis.findings`.
    Returns a JSON-able dict with keys ``data_scaling``, ``width_scaling``,
    ``exponent_comparison``, ``kernel_directions``, ``transition`` and
    ``kernel_vs_network_data_exponent``, each keyed by family and then by group
    (``"width=256"``, ``"n_train=1000"``), and ``findings``: every claim's verdict rows
    (see :func:`~ntklens.analysis.findings.derive_findings`).
    """
    check_bootstrap_args(n_bootstrap, confidence)
    check_finding_args(margin, min_r2)
    if not 0.0 < fraction < 1.0:
        raise NtkLensError(f"fraction must lie in (0, 1), got {fraction!r}; e.g. 0.5")
    llm_ratio(1.0, llm_widths)
    families = run_table(runs, records, observables)
    has_width_axis = any(
        sub.groupby("n_train")["width"].nunique().max() >= MIN_WIDTHS for sub in families.values()
    )
    if transition and not has_width_axis:
        raise NtkLensError(
            f"the transition width needs a width sweep (≥ {MIN_WIDTHS} widths at one n_train "
            "in one family), but the runs have none; sweep over width or pass transition=False"
        )
    kernel_quantities = ["kernel_change", *(f"{k}/{s}" for k in observables for s in STAGES)]
    options = {"n_bootstrap": n_bootstrap, "confidence": confidence, "seed": seed}
    summary: dict[str, Any] = {
        "settings": {
            "fraction": fraction,
            "llm_widths": [int(w) for w in llm_widths],
            "observables": list(observables),
            "offset": offset,
            "margin": margin,
            "min_r2": min_r2,
            "n_bootstrap": n_bootstrap,
            "confidence": confidence,
            "seed": seed,
        },
        "families": {
            name: {
                "n_runs": len(sub),
                "widths": sorted(int(w) for w in sub["width"].unique()),
                "n_train": sorted(int(n) for n in sub["n_train"].unique()),
            }
            for name, sub in families.items()
        },
    }
    fits: dict[str, dict[str, dict[str, dict[str, PowerLawFit]]]] = {"data": {}, "width": {}}
    directions: dict[str, dict[str, Any]] = {"data": {}, "width": {}}
    scaling: dict[str, dict[str, Any]] = {"data": {}, "width": {}}
    for axis, (varied, held) in AXES.items():
        for name, sub in families.items():
            scaling[axis][name], fits[axis][name], directions[axis][name] = _scaling_section(
                sub, varied, held, kernel_quantities, offset, options
            )
    summary["data_scaling"] = scaling["data"]
    summary["width_scaling"] = scaling["width"]
    summary["exponent_comparison"] = {
        name: _compare_axes(fits["data"][name], fits["width"][name], confidence)
        for name in families
    }
    summary["kernel_directions"] = directions
    summary["kernel_vs_network_data_exponent"] = {
        name: _kernel_vs_network(fits["data"][name], confidence) for name in families
    }
    if transition is False:
        summary["transition"] = {"skipped": "not requested (transition=False)"}
    elif not has_width_axis:
        summary["transition"] = {"skipped": f"no width axis (< {MIN_WIDTHS} widths per n_train)"}
    else:
        summary["transition"] = {
            name: _transition_section(sub, fraction, llm_widths, options)
            for name, sub in families.items()
        }
    summary["findings"] = derive_findings(
        families,
        fits,
        directions,
        summary["transition"],
        margin=margin,
        min_r2=min_r2,
        llm_widths=llm_widths,
        **options,
    )
    return summary


def run_table(
    runs: pd.DataFrame, records: pd.DataFrame, observables: tuple[str, ...]
) -> dict[str, pd.DataFrame]:
    """One row per ok run with every summarized quantity, split by family."""
    _require_columns(runs, ("run_id", "status", "n_train", "width"), "runs")
    _require_columns(records, ("run_id", "step", "quantity", "value"), "records")
    if isinstance(observables, str) or not observables:
        raise NtkLensError(f"observables must be a tuple of observable keys, got {observables!r}")
    ok = runs[runs["status"] == "ok"]
    if ok.empty:
        raise NtkLensError(f"none of the {len(runs)} runs has status 'ok'; nothing to summarize")
    kept = records[records["run_id"].isin(ok["run_id"])].sort_values("step", kind="stable")
    end = _last_values(kept)
    init = _last_values(kept[kept["step"] == 0])

    def column(frame: pd.DataFrame, quantity: str) -> pd.Series:
        return frame[quantity] if quantity in frame else pd.Series(np.nan, index=frame.index)

    values = pd.DataFrame(index=end.index)
    values["test_loss"] = column(end, "test_loss")
    values["test_error"] = 1.0 - column(end, "test_acc")
    values["kernel0_test_loss"] = column(end, "kernel0_test_loss")
    values["kernel0_test_error"] = 1.0 - column(end, "kernel0_test_acc")
    values["kernel_change"] = column(end, "ntk_change")
    if "n_params" not in ok:
        values["n_params"] = column(end, "n_params")
    for key in {*observables, "entropy", "trace"}:
        start, last = column(init, f"ntk_{key}").reindex(end.index), column(end, f"ntk_{key}")
        values[f"{key}/init"], values[f"{key}/end"] = start, last
        values[f"{key}/change"] = last - start
    values["entropy_change"] = values["entropy/change"].abs()
    values["trace_change"] = (values["trace/change"] / values["trace/init"]).abs()
    table = ok.merge(values, left_on="run_id", right_index=True, how="left")
    labels = _family_labels(ok)
    return {name: table[labels == name] for name in sorted(labels.unique())}


def _last_values(records: pd.DataFrame) -> pd.DataFrame:
    """Wide table (run × quantity) of each quantity's value at its last recorded step."""
    last = records.drop_duplicates(["run_id", "quantity"], keep="last")
    return last.pivot(index="run_id", columns="quantity", values="value")


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...], name: str) -> None:
    """Raise a one-line error naming the columns that ``frame`` lacks."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise NtkLensError(
            f"{name} lacks columns {missing}; pass the store's {name}() table "
            f"(needs {list(columns)})"
        )


def _family_labels(runs: pd.DataFrame) -> pd.Series:
    """``model/parameterization[;field=value...]`` for each run.

    A field names families where it takes two values at one width of one
    model/parameterization (two swept learning rates, two step counts). It does not where
    it differs only between models (a baseline a CNN study leaves out), between
    parameterizations, or with width alone (a width-dependent lr rule). A field that
    names families is added to every family of that model, so that the NTK and μP families
    of one model carry the same suffix and pair up.
    """
    base = [c for c in ("model", "parameterization") if c in runs.columns]
    ignored = {*NON_SPEC_COLUMNS, *REPLICATE_COLUMNS, "n_train", "width", *base}
    candidates = [c for c in runs.columns if c not in ignored]
    labels = (
        runs[base].astype(str).agg("/".join, axis=1) if base else pd.Series("all", index=runs.index)
    )
    points = [c for c in ("parameterization", "width") if c in runs.columns]
    named = labels.copy()
    models = runs["model"].astype(str) if "model" in runs.columns else labels
    for _, rows in runs.groupby(models, sort=False):
        for c in candidates:
            values = rows[c].astype(str)
            at_point = values.groupby([rows[p] for p in points]) if points else values
            if (at_point.nunique(dropna=False) > 1).any():
                named[rows.index] = named[rows.index] + f";{c}=" + values
    return named


def _scaling_section(
    runs: pd.DataFrame,
    varied: str,
    held: str,
    kernel_quantities: list[str],
    offset: bool,
    options: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, dict[str, PowerLawFit]], dict[str, Any]]:
    """Fits and trends of every quantity against ``varied``, one group per ``held`` value."""
    section: dict[str, Any] = {}
    group_fits: dict[str, dict[str, PowerLawFit]] = {}
    trends: dict[str, Any] = {}
    for held_value, group in runs.groupby(held, sort=True):
        key = f"{held}={int(held_value)}"
        x = group[varied].to_numpy(dtype=np.float64)
        n_distinct = len(np.unique(x))
        if n_distinct < MIN_DISTINCT:
            reason = f"only {n_distinct} distinct {varied} value(s); need ≥ {MIN_DISTINCT}"
            section[key] = trends[key] = {"skipped": reason}
            continue
        section[key] = {"x": varied, "x_values": sorted(float(v) for v in np.unique(x))}
        group_fits[key], trends[key] = {}, {}
        for quantity in [*PERFORMANCE, *kernel_quantities]:
            y = group[quantity].to_numpy(dtype=np.float64)
            present = np.isfinite(y)
            if not present.any():
                continue
            fit, entry = _fit_quantity(x[present], y[present], options)
            section[key][quantity] = entry
            if fit is not None:
                group_fits[key][quantity] = fit
            if offset and quantity in PERFORMANCE:
                _, section[key][f"{quantity}:offset"] = _fit_quantity(
                    x[present], y[present], {**options, "offset": True}
                )
            if quantity in kernel_quantities:
                trends[key][quantity] = _trend(x[present], y[present], options)
    trends["overall"] = _direction_counts(trends)
    return section, group_fits, trends


def _fit_quantity(
    x: np.ndarray, y: np.ndarray, options: dict[str, Any]
) -> tuple[PowerLawFit | None, dict[str, Any]]:
    """A power-law fit of ``|y|`` when ``y`` has one sign, or the reason it has none."""
    if np.all(y > 0) or np.all(y < 0):
        sign = "positive" if y[0] > 0 else "negative"
        try:
            result = fit_power_law(x, np.abs(y), **options)
        except NtkLensError as err:
            return None, {"skipped": str(err)}
        return result, {**result.to_dict(), "sign": sign}
    return None, {"skipped": "values are zero or change sign; no power law (see the trend)"}


def _trend(x: np.ndarray, y: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
    """The direction of ``y`` along ``x``, or why it could not be measured."""
    try:
        return fit_trend(x, y, **options).to_dict()
    except NtkLensError as err:
        return {"skipped": str(err)}


def _direction_counts(trends: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per quantity: how many groups it increases / decreases / stays flat in, and the majority."""
    tally: dict[str, dict[str, int]] = {}
    for group in trends.values():
        for quantity, trend in group.items():
            if quantity == "skipped" or "direction" not in trend:
                continue
            counts = tally.setdefault(quantity, {"increases": 0, "decreases": 0, "flat": 0})
            counts[trend["direction"]] += 1
    return {q: {**c, "majority": max(c, key=c.__getitem__)} for q, c in tally.items()}


def _largest_with(fits: dict[str, dict[str, PowerLawFit]], quantity: str) -> tuple[str, Any]:
    """The group with the largest held value that has a fit of ``quantity``."""
    keyed = [(int(k.split("=")[1]), k) for k, f in fits.items() if quantity in f]
    if not keyed:
        return "", None
    _, key = max(keyed)
    return key, fits[key][quantity]


def _compare_axes(
    data_fits: dict[str, dict[str, PowerLawFit]],
    width_fits: dict[str, dict[str, PowerLawFit]],
    confidence: float,
) -> dict[str, Any]:
    """α from data scaling (largest width) minus α from width scaling (largest n_train)."""
    comparison: dict[str, Any] = {}
    quantities = {q for f in data_fits.values() for q in f} & {
        q for f in width_fits.values() for q in f
    }
    for quantity in sorted(quantities):
        data_key, data_fit = _largest_with(data_fits, quantity)
        width_key, width_fit = _largest_with(width_fits, quantity)
        comparison[quantity] = {
            "data": {"group": data_key, **_alpha_entry(data_fit)},
            "width": {"group": width_key, **_alpha_entry(width_fit)},
            **compare_exponents(data_fit, width_fit, confidence=confidence),
        }
    return comparison


def _alpha_entry(fit: PowerLawFit) -> dict[str, Any]:
    """A fit's exponent and its CI, JSON-able."""
    return {"alpha": fit.alpha, "ci": [finite_or_none(bound) for bound in fit.ci["alpha"]]}


def _kernel_vs_network(
    data_fits: dict[str, dict[str, PowerLawFit]], confidence: float
) -> dict[str, Any]:
    """Per width: the network's data-scaling α minus that of its step-0 kernel regression.

    A difference whose CI covers 0 means the network scales like its initial kernel
    ("kernel-driven"); otherwise learned features change the scaling ("feature-driven").
    """
    result: dict[str, Any] = {}
    for key, fits in data_fits.items():
        entry = {}
        for loss in ("test_loss", "test_error"):
            network, kernel = fits.get(loss), fits.get(f"kernel0_{loss}")
            if network is None or kernel is None:
                continue
            comparison = compare_exponents(network, kernel, confidence=confidence)
            comparison["scaling"] = (
                "feature-driven" if comparison["excludes_zero"] else "kernel-driven"
            )
            entry[loss] = comparison
        if entry:
            result[key] = entry
    return result


def _transition_section(
    runs: pd.DataFrame,
    fraction: float,
    llm_widths: tuple[int, ...],
    options: dict[str, Any],
) -> dict[str, Any]:
    """w* by all three methods for each ``n_train`` of a family that has a width sweep."""
    section: dict[str, Any] = {}
    for n_train, group in runs.groupby("n_train", sort=True):
        key = f"n_train={int(n_train)}"
        if group["width"].nunique() < MIN_WIDTHS:
            section[key] = {"skipped": f"fewer than {MIN_WIDTHS} widths at this n_train"}
            continue
        entry: dict[str, Any] = {"signals": {}}
        for signal in TRANSITION_SIGNALS:
            rows = group[np.isfinite(group[signal])]
            widths, delta = rows["width"].to_numpy(np.float64), rows[signal].to_numpy(np.float64)
            estimates = {
                "broken_power_law": _estimate(
                    broken_power_law_transition, widths, delta, **options
                ),
                "threshold": _estimate(
                    threshold_transition, widths, delta, fraction=fraction, **options
                ),
            }
            if signal == "kernel_change":
                entry.update(estimates)
            else:
                entry["signals"][signal] = estimates
        rows = group[np.isfinite(group["kernel0_test_loss"]) & np.isfinite(group["test_loss"])]
        entry["advantage"] = _estimate(
            advantage_transition,
            rows["width"].to_numpy(np.float64),
            rows["kernel0_test_loss"].to_numpy(np.float64),
            rows["test_loss"].to_numpy(np.float64),
            fraction=fraction,
            **options,
        )
        # only a checked break is a transition width; the crossings are descriptive
        entry["llm_ratio"] = {
            method: llm_ratio(entry[method]["w_star"], llm_widths)
            for method in ("broken_power_law",)
            if entry[method].get("identified") and entry[method].get("w_star") is not None
        }
        section[key] = entry
    return section


def _estimate(estimator: Any, *arrays: np.ndarray, **kwargs: Any) -> dict[str, Any]:
    """One transition estimate as a dict, or the reason it could not be made."""
    try:
        estimate: TransitionEstimate = estimator(*arrays, **kwargs)
    except NtkLensError as err:
        return {"skipped": str(err)}
    return estimate.to_dict()

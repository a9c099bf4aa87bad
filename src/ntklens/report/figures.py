"""The report's figures: scaling laws with their fits, kernel observables, spectra and w*.

Each figure function takes a :class:`StudyData` and the summary dict of
:func:`ntklens.analysis.summarize` and returns a :class:`matplotlib.figure.Figure` (the
object API, so no pyplot state is touched), or raises :class:`FigureUnavailable` saying what
the study lacks. One story per figure, and a panel shows one sweep: a scaling panel draws
only the groups the summary fitted as a sweep (≥ 3 values of its axis), never the single
points other sweeps leave on that axis. Scaling plots are log-log; points are the seed
means with bootstrap confidence intervals (runs resampled as in the fits), lines the
summary's power-law fits, drawn only where the fit passes its check (R² ≥ the summary's
``min_r2``) and never for bounded quantities (alignment) unless ``StudyData.fit_bounded``.
Legends sit inside the axes or below them; symbols are rendered as mathtext.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ntklens.analysis.bootstrap import case_counts, percentile_interval
from ntklens.analysis.findings import DEFAULT_MIN_R2
from ntklens.analysis.summary import AXES

PANEL_SIZE = (4.6, 3.3)  # inches per panel
LEGEND_HEIGHT = 0.24  # inches per legend entry below a panel
CI_BOOTSTRAP = 400  # replicates of each plotted mean's interval
BOUNDED = ("alignment",)  # quantities in [0, 1]: no power law unless asked
SYMBOLS = {"width": "w", "n_train": "n"}
AXIS_LABELS = {"width": "width w", "n_train": "training set size n", "step": "training step"}
STAGE_LABELS = {"init": "at init", "end": "at end", "change": "change"}
QUANTITY_LABELS = {
    "test_loss": "test loss",
    "train_loss": "train loss",
    "test_error": "test error",
    "kernel_change": r"kernel change $\|\Theta_T - \Theta_0\| / \|\Theta_0\|$",
    "chi_pos": r"spectral position $\chi_{pos}$",
    "trace": r"eNTK trace $\mathrm{Tr}\,\Theta$",
    "entropy": "spectral entropy $S$",
    "effective_rank": "effective rank",
    "alignment": "kernel–target alignment",
}
HISTORY_QUANTITIES = ("train_loss", "test_loss", "ntk_change", "chi_pos")
CURVE_ROWS = {  # training-curve figure: recorded quantity -> label key
    "train_loss": "train_loss",
    "test_loss": "test_loss",
    "ntk_change": "kernel_change",
    "chi_pos": "chi_pos",
}


class FigureUnavailable(Exception):
    """The study lacks what a figure needs; the message says what, in one line."""


@dataclass(frozen=True)
class StudyData:
    """The ok runs of a study, shaped for plotting.

    ``runs``: one row per run with ``family``, the spec columns and the summarized quantities
    (``test_loss``, ``test_error``, ``kernel0_test_error``, ``kernel_change``,
    ``<observable>/init|end|change``) plus ``infinite_test_error`` and
    ``infinite_ntk_<observable>`` where the model has an infinite-width limit.
    ``history``: records (``run_id, step, quantity, value``) of :data:`HISTORY_QUANTITIES`
    joined with ``family, width, n_train``. ``spectra``: ``run_id, step, kind, values``
    joined the same way. ``fit_bounded`` draws power laws of bounded quantities too.
    """

    runs: pd.DataFrame
    history: pd.DataFrame
    spectra: pd.DataFrame
    observables: tuple[str, ...]
    fit_bounded: bool = False


@dataclass(frozen=True)
class FigureSpec:
    """A figure of the report: its HTML id, title, caption and drawing function."""

    id: str
    title: str
    caption: str
    draw: Callable[[StudyData, dict[str, Any]], Figure]

    @property
    def filename(self) -> str:
        """The file stem of the saved PNG and PDF, e.g. ``loss-vs-data``."""
        return self.id.removeprefix("fig-")


def loss_vs_data(data: StudyData, summary: dict[str, Any]) -> Figure:
    """Test loss and error against n_train, one colour per width, with power-law fits."""
    return _scaling_figure(data, summary, "data", [("test_loss",), ("test_error",)])


def loss_vs_width(data: StudyData, summary: dict[str, Any]) -> Figure:
    """Test loss and error against width, one colour per n_train, with power-law fits."""
    return _scaling_figure(data, summary, "width", [("test_loss",), ("test_error",)])


def kernel_vs_data(data: StudyData, summary: dict[str, Any]) -> Figure:
    """Each kernel observable at init and at the end against n_train, with fits."""
    return _scaling_figure(data, summary, "data", _observable_rows(data))


def kernel_vs_width(data: StudyData, summary: dict[str, Any]) -> Figure:
    """Each kernel observable at init and at the end against width, with fits."""
    return _scaling_figure(data, summary, "width", _observable_rows(data))


def kernel_change_vs_width(data: StudyData, summary: dict[str, Any]) -> Figure:
    """The kernel change against width with every family (NTK, μP, …) overlaid, one panel per
    n_train; w* and its CI where the checked break is identified, and the LLM widths."""
    families = [
        f
        for f in _scaling_families(summary, "width")
        if data.runs.loc[data.runs["family"] == f, "kernel_change"].notna().any()
    ]
    if not families:
        raise FigureUnavailable(
            "no family has a width sweep (≥ 3 widths at one n_train) with a recorded kernel change"
        )
    sweeps = {
        f: _sweep_groups(summary, "width", f) & set(_family_runs(data, f)["n_train"].astype(int))
        for f in families
    }
    n_trains = sorted({n for groups in sweeps.values() for n in groups})
    transition = summary.get("transition", {})
    llm_widths = summary.get("settings", {}).get("llm_widths", [])
    figure, axes = _panels(1, len(n_trains), legend_rows=2 * len(families) + len(llm_widths))
    confidence = _confidence(summary)
    for ax, n_train in zip(axes[0], n_trains, strict=True):
        for index, family in enumerate(f for f in families if n_train in sweeps[f]):
            color = f"C{index}"
            runs = _family_runs(data, family)
            rows = runs[(runs["n_train"] == n_train) & runs["kernel_change"].notna()]
            x, mean, low, high = _mean_ci(rows, "width", "kernel_change", confidence)
            ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="o-", ms=3.5, capsize=2,
                        color=color, lw=1.0, label=family)  # fmt: skip
            entry = transition.get(family, {}).get(f"n_train={n_train}")
            _mark_transition(ax, entry, color, family)
        for width in llm_widths:
            ax.axvline(width, color="0.45", ls=":", lw=1.0, label=f"LLM width {width}")
        ax.set(xscale="log", yscale="log", xlabel=AXIS_LABELS["width"])
        ax.set(ylabel=QUANTITY_LABELS["kernel_change"], title=f"n={n_train}")
        _plain_ticks(ax)
        _legend(ax, below=True)
    return figure


def training_curves(data: StudyData, summary: dict[str, Any]) -> Figure:
    """Per-run training curves (losses, kernel change, χ_pos against step), one colour per
    width, one column per family; each column shows one sweep (the width sweep at its
    largest n_train, else the data sweep at its largest width)."""
    history = data.history[data.history["quantity"].isin(CURVE_ROWS)]
    rows = [q for q in CURVE_ROWS if (history["quantity"] == q).any()]
    families = sorted(f for f, h in history.groupby("family") if h["step"].nunique() > 1)
    if not rows or not families:
        raise FigureUnavailable("no run recorded its losses, kernel change or χ_pos at ≥ 2 steps")
    figure, axes = _panels(len(rows), len(families), legend_rows=3)
    for column, family in enumerate(families):
        runs = history[history["family"] == family]
        by, held, value = _one_sweep(runs)
        runs = runs[runs[held] == value]
        levels = sorted(runs[by].unique())
        colors = dict(zip(levels, _colors(len(levels)), strict=True))
        for row, quantity in enumerate(rows):
            ax = axes[row, column]
            curves = runs[runs["quantity"] == quantity]
            for (level, _run), curve in curves.groupby([by, "run_id"], sort=True):
                ax.plot(curve["step"], curve["value"], "-", lw=0.9, color=colors[level],
                        alpha=0.85)  # fmt: skip
            for level, color in colors.items():
                ax.plot([], [], "-", color=color, label=f"{SYMBOLS[by]}={level}")
            if curves.empty:
                _note(ax, f"no {quantity} recorded")
                continue
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_yscale("log" if (curves["value"] > 0).all() else "linear")
            ax.set(xlabel=AXIS_LABELS["step"], ylabel=_label(CURVE_ROWS[quantity]))
            ax.set_title(f"{family}, {SYMBOLS[held]}={value}")
            _plain_ticks(ax)
        _legend(axes[-1, column], below=True, columns=4)
    return figure


def spectra_per_width(data: StudyData, summary: dict[str, Any]) -> Figure:
    """Normalized eNTK eigenvalues by rank at init and at the end, one colour per width."""
    entk = data.spectra[data.spectra["kind"] == "entk"]
    if entk.empty:
        raise FigureUnavailable("the runs recorded no eNTK spectra")
    families = sorted(entk["family"].unique())
    infinite = data.spectra[data.spectra["kind"] == "infinite"]
    last_step = entk.groupby("run_id")["step"].transform("max")
    stages = {"init": entk[entk["step"] == 0], "end": entk[entk["step"] == last_step]}
    figure, axes = _panels(2, len(families))
    for column, family in enumerate(families):
        n_train = entk.loc[entk["family"] == family, "n_train"].max()
        for row, (stage, frame) in enumerate(stages.items()):
            ax = axes[row, column]
            rows = frame[(frame["family"] == family) & (frame["n_train"] == n_train)]
            widths = sorted(rows["width"].unique())
            for width, color in zip(widths, _colors(len(widths)), strict=True):
                spectrum = _mean_spectrum(rows.loc[rows["width"] == width, "values"])
                rank = np.arange(1, len(spectrum) + 1)
                ax.plot(rank, spectrum, color=color, lw=1.3, label=f"w={width}")
            reference = infinite.loc[infinite["family"] == family, "values"]
            if not reference.empty:
                spectrum = _mean_spectrum(reference)
                rank = np.arange(1, len(spectrum) + 1)
                ax.plot(rank, spectrum, "k--", lw=1.3, label="infinite width")
            ax.set(xscale="log", yscale="log", xlabel="eigenvalue rank k")
            ylabel = rf"$\lambda_k / \sum_j \lambda_j$ {STAGE_LABELS[stage]}"
            ax.set(ylabel=ylabel, title=f"{family}, n={n_train}")
            _plain_ticks(ax)
            _legend(ax)
    return figure


def spectral_position_over_training(data: StudyData, summary: dict[str, Any]) -> Figure:
    """χ_pos against the training step, one colour per width (mean ± std over seeds)."""
    history = data.history[data.history["quantity"] == "chi_pos"]
    families = sorted(f for f, rows in history.groupby("family") if rows["step"].nunique() > 1)
    if not families:
        raise FigureUnavailable("no family recorded the spectral position χ_pos at ≥ 2 steps")
    figure, axes = _panels(1, len(families))
    for ax, family in zip(axes[0], families, strict=True):
        rows = history[history["family"] == family]
        n_train = rows["n_train"].max()
        rows = rows[rows["n_train"] == n_train]
        widths = sorted(rows["width"].unique())
        for width, color in zip(widths, _colors(len(widths)), strict=True):
            steps, mean, low, high = _mean_ci(
                rows[rows["width"] == width], "step", "value", _confidence(summary)
            )
            ax.plot(steps, mean, "o-", ms=3, color=color, label=f"w={width}")
            ax.fill_between(steps, low, high, color=color, alpha=0.15, lw=0)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_yscale("log" if (rows["value"] > 0).all() else "linear")
        ax.set(xlabel=AXIS_LABELS["step"], ylabel=QUANTITY_LABELS["chi_pos"])
        ax.set_title(f"{family}, n={n_train}")
        _plain_ticks(ax)
        _legend(ax, below=True, columns=4)
    return figure


def infinite_width_reference(data: StudyData, summary: dict[str, Any]) -> Figure:
    """Test error of network, step-0 kernel and infinite-width NTK regression against n;
    and how far each kernel observable at init lies from its infinite-width value."""
    columns = [c for c in data.runs.columns if c.startswith(("infinite_test_", "infinite_ntk_"))]
    families = sorted(data.runs.loc[data.runs[columns].notna().any(axis=1), "family"].unique())
    if not families:
        raise FigureUnavailable(
            "no model has a closed-form infinite-width NTK (needs an ntk-parameterized MLP "
            "with relu or erf)"
        )
    figure, axes = _panels(2, len(families), legend_rows=3)
    confidence = _confidence(summary)
    for column, family in enumerate(families):
        runs = _family_runs(data, family)
        _plot_baselines(axes[0, column], runs, confidence)
        _plot_infinite_gap(axes[1, column], runs, data.observables, confidence)
        axes[0, column].set_title(family)
    return figure


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec(
        "fig-loss-vs-data",
        "Test loss vs dataset size, per width",
        "End-of-training test loss and error against the training set size n; one colour per "
        "width that was swept over n; points are seed means with bootstrap CIs, lines the "
        "fitted power laws (drawn only where R² passes the summary's threshold).",
        loss_vs_data,
    ),
    FigureSpec(
        "fig-loss-vs-width",
        "Test loss vs width, per dataset size",
        "End-of-training test loss and error against the width w; one colour per training "
        "set size that was swept over width; seed means with bootstrap CIs and the fitted "
        "power laws that pass their check.",
        loss_vs_width,
    ),
    FigureSpec(
        "fig-kernel-vs-data",
        "Kernel observables vs dataset size, at init and at the end",
        "eNTK observables on the probe set against n: hollow markers and dashed fits at step "
        "0, filled markers and solid fits at the last step; one colour per width; no power "
        "law for bounded quantities (alignment).",
        kernel_vs_data,
    ),
    FigureSpec(
        "fig-kernel-vs-width",
        "Kernel observables vs width, at init and at the end",
        "eNTK observables on the probe set against w: hollow markers and dashed fits at step "
        "0, filled markers and solid fits at the last step; one colour per training set size.",
        kernel_vs_width,
    ),
    FigureSpec(
        "fig-kernel-change",
        "Kernel change vs width: NTK and μP overlaid, with w* and the LLM widths",
        "Relative Frobenius change of the eNTK over training against width, every "
        "parameterization's width sweep in one panel (seed means, bootstrap CIs). A dashed "
        "line and shaded band mark w* and its CI only where the broken power law passes its "
        "checks (the fitted curve dotted); dotted grey lines mark the LLM widths.",
        kernel_change_vs_width,
    ),
    FigureSpec(
        "fig-training-curves",
        "Training curves of every run",
        "Train and test loss, kernel change and spectral position against the training step, "
        "one line per run, one colour per width (or per n for a data sweep); each column is "
        "one sweep of one family.",
        training_curves,
    ),
    FigureSpec(
        "fig-spectra",
        "eNTK eigen-spectra per width",
        "Eigenvalues of the eNTK on the probe set divided by their sum, at step 0 and at the "
        "last step, at the largest n; mean over seeds; dashed black: the infinite-width NTK.",
        spectra_per_width,
    ),
    FigureSpec(
        "fig-spectral-position",
        "Spectral position over training",
        "χ_pos = gᵀΘg / (‖g‖² Tr Θ) against the training step at the largest n; lower values "
        "mean learning is driven by the kernel's small-eigenvalue modes; band: bootstrap CI "
        "of the seed mean.",
        spectral_position_over_training,
    ),
    FigureSpec(
        "fig-infinite-reference",
        "The infinite-width reference",
        "Top: test error of the trained widest network, of kernel regression with its step-0 "
        "eNTK and with the analytic infinite-width NTK. Bottom: relative distance of each "
        "eNTK observable at init from its infinite-width value against width.",
        infinite_width_reference,
    ),
)


def fit_label(fit: dict[str, Any]) -> str:
    """``α=0.31 [0.27, 0.35], R²=0.98`` (plus ``c`` for an offset fit) for a legend."""
    low, high = fit["ci"]["alpha"]
    text = f"α={_g(fit['params']['alpha'])} [{_g(low)}, {_g(high)}], R²={_g(fit['r2'])}"
    offset = fit["params"].get("c")
    return text if offset is None else f"{text}, c={_g(offset)}"


def _scaling_figure(
    data: StudyData, summary: dict[str, Any], axis: str, quantity_rows: Sequence[Sequence[str]]
) -> Figure:
    """A row of panels per entry of ``quantity_rows``, a column per family; the quantities of
    one entry share a panel (``(<key>/init, <key>/end)``: hollow dashed init, solid end)."""
    varied, held = AXES[axis]
    families = _scaling_families(summary, axis)
    if not families:
        raise FigureUnavailable(
            f"no family has ≥ 3 values of {varied} at one {held}; sweep {varied} for this plot"
        )
    if not quantity_rows:
        raise FigureUnavailable("the runs recorded none of the summarized kernel observables")
    n_groups = max(len(_sweep_groups(summary, axis, f)) for f in families)
    figure, axes = _panels(
        len(quantity_rows), len(families), legend_rows=n_groups * max(map(len, quantity_rows))
    )
    settings = {
        "confidence": _confidence(summary),
        "min_r2": summary.get("settings", {}).get("min_r2", DEFAULT_MIN_R2),
        "fit_bounded": data.fit_bounded,
    }
    for row, quantities in enumerate(quantity_rows):
        for column, family in enumerate(families):
            ax = axes[row, column]
            runs = _family_runs(data, family)
            runs = runs[runs[held].astype(int).isin(_sweep_groups(summary, axis, family))]
            for quantity in quantities:
                stage = quantity.partition("/")[2] if len(quantities) > 1 else ""
                fits = summary[f"{axis}_scaling"][family]
                _plot_scaling(ax, runs, varied, held, quantity, fits, stage=stage, **settings)
            if len(quantities) > 1:
                ax.set_ylabel(_label(quantities[0].partition("/")[0]))
            ax.set_title(family)
            _legend(ax, below=True)
    return figure


def _plot_scaling(
    ax: Axes,
    runs: pd.DataFrame,
    varied: str,
    held: str,
    quantity: str,
    fits: dict[str, Any] | None = None,
    *,
    stage: str = "",
    confidence: float = 0.95,
    min_r2: float = DEFAULT_MIN_R2,
    fit_bounded: bool = False,
) -> dict[int, Any]:
    """Seed means with bootstrap CIs of ``quantity`` against ``varied``, a colour per ``held``
    value, and the fitted power law of each group from ``fits`` (the summary's groups of one
    family) where it has R² ≥ ``min_r2`` (and, for bounded quantities, ``fit_bounded``).

    A quantity that is negative in every run is drawn as −y; one that changes sign on a
    linear y axis without fits. ``stage="init"`` draws hollow markers and dashed lines, and
    a ``stage`` goes into the legend. Returns the colour of each ``held`` value.
    """
    rows = runs[[held, varied, quantity]].dropna()
    if rows.empty:
        _note(ax, f"no {quantity} recorded")
        return {}
    sign = -1.0 if (rows[quantity] < 0).all() else 1.0
    rows = rows.assign(y=sign * rows[quantity])
    log_y = bool((rows["y"] > 0).all())
    held_values = sorted(int(v) for v in rows[held].unique())
    colors = dict(zip(held_values, _colors(len(held_values)), strict=True))
    hollow = stage == "init"
    tag = f" {'−' if sign < 0 and stage else ''}{stage}" if stage else ""
    bounded = quantity.partition("/")[0] in BOUNDED and not fit_bounded
    for value, color in colors.items():
        x, mean, low, high = _mean_ci(rows[rows[held] == value], varied, "y", confidence)
        name = f"{SYMBOLS[held]}={value}{tag}"
        fit = (fits or {}).get(f"{held}={value}", {}).get(quantity, {})
        has_fit = log_y and not bounded and _is_fit(fit) and (fit.get("r2") or 0.0) >= min_r2
        ax.errorbar(
            x,
            mean,
            yerr=[mean - low, high - mean],
            fmt="o",
            ms=3.5,
            capsize=2,
            color=color,
            mfc="white" if hollow else color,
            label=None if has_fit else name,
        )
        if has_fit:
            grid = np.geomspace(fit["x_min"], fit["x_max"], 64)
            line = "--" if hollow else "-"
            label = f"{name}: {fit_label(fit)}"
            ax.plot(grid, _power_law(fit, grid), line, color=color, lw=1.2, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log" if log_y else "linear")
    ax.set(xlabel=AXIS_LABELS[varied], ylabel=("−" if sign < 0 else "") + _label(quantity))
    _plain_ticks(ax)
    return colors


def _mark_transition(ax: Axes, entry: dict[str, Any] | None, color: Any, group: str) -> None:
    """A dashed line at w* with its CI shaded and the fitted broken power law dotted, only for
    a break that passed its checks; ``group`` names the curve in the legend."""
    if not entry or "skipped" in entry:
        return
    estimate = entry.get("broken_power_law", {})
    if not estimate.get("identified") or estimate.get("w_star") is None:
        return
    w_star, (low, high) = estimate["w_star"], estimate["ci"]
    label = f"{group}: $w^*$={_g(w_star)} [{_g(low)}, {_g(high)}]"
    ax.axvline(w_star, color=color, ls="--", lw=1.1, label=label)
    ax.axvspan(low, high, color=color, alpha=0.12, lw=0)
    details = estimate["details"]
    widths = np.geomspace(min(details["widths"]), max(details["widths"]), 128)
    ax.plot(widths, _broken_power_law(widths, w_star, details), ":", color=color, lw=1.2)


def _broken_power_law(widths: np.ndarray, w_star: float, details: dict[str, Any]) -> np.ndarray:
    """``A·(w/w*)^(−β₁)·(1 + (w/w*)^(1/s))^(−(β₂−β₁)·s)``, the form of the transition fit."""
    ratio = widths / w_star
    beta_1, beta_2, bend = details["beta_feature"], details["beta_lazy"], details["smoothness"]
    return (
        details["amplitude"]
        * ratio**-beta_1
        * (1 + ratio ** (1 / bend)) ** (-(beta_2 - beta_1) * bend)
    )


def _plot_baselines(ax: Axes, runs: pd.DataFrame, confidence: float) -> None:
    """Test error against n of the widest network, its step-0 kernel and the infinite NTK."""
    widest = runs[runs["width"] == runs["width"].max()]
    width = int(widest["width"].iloc[0])
    curves = {
        "test_error": f"trained network (w={width})",
        "kernel0_test_error": f"step-0 eNTK regression (w={width})",
        "infinite_test_error": "infinite-width NTK regression",
    }
    drawn = False
    for (quantity, label), color in zip(curves.items(), ("C0", "C1", "k"), strict=True):
        if quantity not in widest or widest[quantity].isna().all():
            continue
        x, mean, low, high = _mean_ci(widest.dropna(subset=[quantity]), "n_train", quantity,
                                      confidence)  # fmt: skip
        ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="o-",
                    ms=3.5, capsize=2, color=color, label=label)  # fmt: skip
        drawn = True
    if not drawn:
        _note(ax, "no test error recorded")
        return
    ax.set(xscale="log", xlabel=AXIS_LABELS["n_train"], ylabel=QUANTITY_LABELS["test_error"])
    _plain_ticks(ax)
    _legend(ax, below=True)


def _plot_infinite_gap(
    ax: Axes, runs: pd.DataFrame, observables: Sequence[str], confidence: float
) -> None:
    """|observable at init − its infinite-width value| / |infinite value| against width."""
    present = [
        k
        for k in observables
        if f"infinite_ntk_{k}" in runs and runs[f"infinite_ntk_{k}"].notna().any()
    ]
    if not present:
        _note(ax, "no infinite-width kernel observables recorded")
        return
    for index, key in enumerate(present):
        reference = runs[f"infinite_ntk_{key}"]
        gap = ((runs[f"{key}/init"] - reference) / reference).abs()
        x, mean, low, high = _mean_ci(runs.assign(gap=gap).dropna(subset=["gap"]), "width",
                                      "gap", confidence)  # fmt: skip
        ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="o-",
                    ms=3.5, capsize=2, color=f"C{index}", label=_label(key))  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel=AXIS_LABELS["width"])
    ax.set_ylabel(r"$|\Theta_0 - \Theta_\infty| \,/\, |\Theta_\infty|$")
    _plain_ticks(ax)
    _legend(ax, below=True)


def _observable_rows(data: StudyData) -> list[tuple[str, str]]:
    """``(<key>/init, <key>/end)`` for each summarized observable that the runs recorded."""
    return [
        (f"{key}/init", f"{key}/end")
        for key in data.observables
        if f"{key}/end" in data.runs and data.runs[f"{key}/end"].notna().any()
    ]


def _scaling_families(summary: dict[str, Any], axis: str) -> list[str]:
    """Families with at least one group fitted along ``axis`` (``"data"`` or ``"width"``)."""
    section = summary.get(f"{axis}_scaling", {})
    return sorted(f for f, groups in section.items() if any("x" in g for g in groups.values()))


def _family_runs(data: StudyData, family: str) -> pd.DataFrame:
    return data.runs[data.runs["family"] == family]


def _mean_ci(
    frame: pd.DataFrame, x: str, y: str, confidence: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct ``x``: the mean of ``y`` over the rows (seeds) and its bootstrap CI.

    Rows are resampled within each ``x`` as the fits resample them (m − 1 of m); a point
    with a single run gets no interval (low = high = mean).
    """
    frame = frame.sort_values(x, kind="stable")
    xs = frame[x].to_numpy(np.float64)
    ys = frame[y].to_numpy(np.float64)
    grid, index = np.unique(xs, return_inverse=True)
    one_hot = np.eye(len(grid))[index]
    sizes = one_hot.sum(axis=0)
    mean = (ys @ one_hot) / sizes
    low, high = mean.copy(), mean.copy()
    counts = case_counts(xs, CI_BOOTSTRAP, np.random.default_rng(seed), hold_singletons=True)
    if counts is not None:
        curves = ((counts * ys) @ one_hot) / (counts @ one_hot)
        for j in np.flatnonzero(sizes >= 2):
            low[j], high[j] = percentile_interval(curves[:, j], confidence)
    return grid, mean, low, high


def _confidence(summary: dict[str, Any]) -> float:
    return float(summary.get("settings", {}).get("confidence", 0.95))


def _sweep_groups(summary: dict[str, Any], axis: str, family: str) -> set[int]:
    """The held values (widths for data scaling, n_train for width scaling) that the summary
    fitted as a sweep of ``family`` along ``axis``."""
    groups = summary.get(f"{axis}_scaling", {}).get(family, {})
    return {int(k.split("=")[1]) for k, g in groups.items() if isinstance(g, dict) and "x" in g}


def _one_sweep(history: pd.DataFrame) -> tuple[str, str, int]:
    """``(varied, held, value)`` of the sweep a training-curve column shows: the width sweep
    at the n_train with most widths (ties: the largest), else the data sweep at the width
    with most n_train."""
    runs = history.drop_duplicates("run_id")
    widths = runs.groupby("n_train")["width"].nunique()
    if widths.max() >= 2:
        return "width", "n_train", int(widths[widths == widths.max()].index.max())
    sizes = runs.groupby("width")["n_train"].nunique()
    return "n_train", "width", int(sizes[sizes == sizes.max()].index.max())


def _mean_spectrum(values: pd.Series) -> np.ndarray:
    """The mean over runs of each spectrum divided by its sum (cut to the shortest)."""
    length = min(len(v) for v in values)
    return np.mean([v[:length] / v.sum() for v in values], axis=0)


def _power_law(fit: dict[str, Any], x: np.ndarray) -> np.ndarray:
    params = fit["params"]
    return params["a"] * x ** -params["alpha"] + (params.get("c") or 0.0)


def _is_fit(fit: dict[str, Any]) -> bool:
    params = fit.get("params", {})
    return params.get("a") is not None and params.get("alpha") is not None


def _label(quantity: str) -> str:
    """``entropy/init`` -> ``entropy at init``; known names get their long label."""
    key, _, stage = quantity.partition("/")
    name = QUANTITY_LABELS.get(key, key.replace("_", " "))
    return f"{name} {STAGE_LABELS[stage]}" if stage else name


def _colors(n: int) -> list[Any]:
    """``n`` colours along a sequential colormap, dark to light (stopping short of yellow)."""
    return list(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, n)))


def _panels(n_rows: int, n_columns: int, *, legend_rows: int = 0) -> tuple[Figure, np.ndarray]:
    """A grid of panels; ``legend_rows`` leaves room below each panel for that many legend
    entries (legends go inside the axes or below them, never beside)."""
    height = PANEL_SIZE[1] + LEGEND_HEIGHT * legend_rows
    figure = Figure(figsize=(PANEL_SIZE[0] * n_columns, height * n_rows), layout="constrained")
    return figure, figure.subplots(n_rows, n_columns, squeeze=False)


def _legend(ax: Axes, *, below: bool = False, columns: int = 1) -> None:
    """The panel's legend, inside it or centred below it (where long fit labels go)."""
    if not ax.get_legend_handles_labels()[0]:
        return
    if below:
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  frameon=False, ncols=columns)  # fmt: skip
    else:
        ax.legend(fontsize="x-small", framealpha=0.85)


def _plain_ticks(ax: Axes) -> None:
    """Plain-number labels on log axes (no mathtext, e.g. 0.2 and 300), dense enough to read
    values off: within one decade minor ticks are labelled too (mantissas 2, 4, 6, 8 on x and
    2, 3, 4, 5, 6, 8 on y),
    within two at 2 and 5; an axis under half a decade gets evenly spaced ticks. Symlog axes
    get plain major labels."""
    for axis, within_decade in ((ax.xaxis, {2, 4, 6, 8}), (ax.yaxis, {2, 3, 4, 5, 6, 8})):
        if axis.get_scale() == "symlog":
            axis.set_major_formatter(ticker.FuncFormatter(_plain_number))
        if axis.get_scale() != "log":
            continue
        low, high = sorted(axis.get_view_interval())
        decades = math.log10(high / low) if low > 0 else math.inf
        if decades < 0.5:
            axis.set_major_locator(ticker.MaxNLocator(nbins=4))
            axis.set_minor_locator(ticker.NullLocator())
        mantissas = within_decade if decades <= 1 else {2, 5} if decades <= 2 else set()
        axis.set_major_formatter(ticker.FuncFormatter(_plain_number))
        axis.set_minor_formatter(
            ticker.FuncFormatter(
                lambda x, _, keep=mantissas: _plain_number(x) if _mantissa(x) in keep else ""
            )
        )


def _plain_number(x: float, _position: int | None = None) -> str:
    return f"{x:g}"


def _mantissa(x: float) -> int:
    """The leading digit of ``x`` > 0 (the ``m`` of ``m·10^k``)."""
    return round(x / 10 ** math.floor(math.log10(x))) if x > 0 else 0


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_axis_off()


def _g(value: float | None) -> str:
    """Three significant digits, or ``nan`` for a missing number."""
    return "nan" if value is None else f"{value:.3g}"

"""Build the report of a results store: summary JSON, PNG/PDF figures and the HTML page.

:func:`build_report` checks its inputs, reads the store once, summarizes it with
:func:`ntklens.analysis.summarize` (unless a summary is given), draws every figure of
:data:`~ntklens.report.figures.FIGURES` and writes::

    OUT/summary.json              every fitted number (also the only file with fmt="json")
    OUT/figures/<name>.png|.pdf   one pair per figure the study can show
    OUT/report.html               self-contained: figures embedded as data URIs
"""

from __future__ import annotations

import inspect
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import ntklens.store
from ntklens.analysis import summarize
from ntklens.analysis.summary import run_table
from ntklens.errors import NtkLensError
from ntklens.report.figures import (
    FIGURES,
    HISTORY_QUANTITIES,
    FigureSpec,
    FigureUnavailable,
    StudyData,
)
from ntklens.report.html import RenderedFigure, render_html
from ntklens.schema import RunSpec
from ntklens.store import Store

FORMATS = ("html", "json")
DPI = 120
OUTCOME_COLUMNS = ("status", "error")
ANALYSIS_OPTIONS = tuple(
    name
    for name, parameter in inspect.signature(summarize).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)


@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` wrote: file paths, the summary, and the figures drawn.

    ``paths`` starts with the main file (``report.html``, or ``summary.json`` alone for
    ``fmt="json"``); ``produced`` lists the ids of the figures drawn and ``skipped`` maps the
    id of each figure the study cannot show to the reason.
    """

    paths: list[Path]
    summary: dict[str, Any]
    produced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def build_report(
    store: str | os.PathLike[str] | Store,
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "html",
    summary: dict[str, Any] | None = None,
    fit_bounded: bool = False,
    variants: dict[str, Any] | None = None,
    **analysis_options: Any,
) -> ReportResult:
    """Write the report of ``store`` into ``out_dir``; ``fmt="json"`` writes only the summary.

    ``analysis_options`` go to :func:`ntklens.analysis.summarize` (e.g. ``n_bootstrap``,
    ``observables``, ``llm_widths``, ``fraction``, ``margin``); pass a ready ``summary``
    instead to skip the analysis. The verdicts come from the summary's ``findings``; the
    report only renders them. ``fit_bounded`` also draws power laws of bounded quantities
    (alignment), which are not drawn by default. ``variants`` (the claim × variant table of
    :func:`ntklens.reproduce.run_variants`) adds the robustness table to the page.
    """
    if fmt not in FORMATS:
        raise NtkLensError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    unknown = sorted(set(analysis_options) - set(ANALYSIS_OPTIONS))
    if unknown:
        raise NtkLensError(f"unknown analysis options {unknown}; valid: {list(ANALYSIS_OPTIONS)}")
    if summary is not None and analysis_options:
        raise NtkLensError("pass either a summary or analysis options, not both")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise NtkLensError(f"{out}: exists and is not a directory; give another --out")
    store = store if isinstance(store, Store) else ntklens.store.open(store)
    runs = _spec_and_outcome(store.runs())
    _check_runs(runs, store)
    records = store.records()
    if summary is None:
        summary = summarize(runs, records, **analysis_options)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json(summary, out / "summary.json")
    if fmt == "json":
        return ReportResult(paths=[json_path], summary=summary)
    observables = tuple(summary.get("settings", {}).get("observables", ()))
    data = study_data(runs, records, store.spectra(), observables, fit_bounded=fit_bounded)
    figures_dir = out / "figures"
    figures_dir.mkdir(exist_ok=True)
    rendered = [_render(spec, data, summary, figures_dir) for spec in FIGURES]
    page = render_html(
        store=str(store.path),
        runs=runs,
        figures=rendered,
        summary=summary,
        variants=variants,
    )
    html_path = _write_text(out / "report.html", page)
    written = [p for figure in rendered for p in figure.files]
    return ReportResult(
        paths=[html_path, json_path, *written],
        summary=summary,
        produced=[f.id for f in rendered if f.note is None],
        skipped={f.id: f.note for f in rendered if f.note is not None},
    )


def write_json(summary: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``summary`` as indented JSON, non-finite numbers as ``null``; returns the path."""
    text = json.dumps(_jsonable(summary), indent=2, allow_nan=False)
    return _write_text(Path(path), text + "\n")


def study_data(
    runs: pd.DataFrame,
    records: pd.DataFrame,
    spectra: pd.DataFrame,
    observables: tuple[str, ...],
    *,
    fit_bounded: bool = False,
) -> StudyData:
    """Per-run quantities (as summarized), probe histories and spectra of the ok runs of the
    store's ``runs()``, ``records()`` and ``spectra()`` tables."""
    families = run_table(_spec_and_outcome(runs), records, observables)
    table = pd.concat(
        [frame.assign(family=name) for name, frame in families.items()], ignore_index=True
    )
    kept = records[records["run_id"].isin(table["run_id"])].sort_values("step", kind="stable")
    infinite = kept[kept["quantity"].str.startswith("infinite_")]
    last = infinite.drop_duplicates(["run_id", "quantity"], keep="last")
    table = table.merge(
        last.pivot(index="run_id", columns="quantity", values="value"),
        left_on="run_id",
        right_index=True,
        how="left",
    )
    if "infinite_test_acc" in table:
        table["infinite_test_error"] = 1.0 - table["infinite_test_acc"]
    keys = table[["run_id", "family", "width", "n_train"]]
    history = kept[kept["quantity"].isin(HISTORY_QUANTITIES)].merge(keys, on="run_id")
    return StudyData(
        runs=table,
        history=history,
        spectra=spectra.merge(keys, on="run_id"),
        observables=observables,
        fit_bounded=fit_bounded,
    )


def _spec_and_outcome(runs: pd.DataFrame) -> pd.DataFrame:
    """The run id, spec fields and outcome of each run (not bookkeeping such as timestamps,
    which would otherwise split runs into families)."""
    return runs[["run_id", *RunSpec.model_fields, *OUTCOME_COLUMNS]]


def _check_runs(runs: pd.DataFrame, store: Store) -> None:
    """One-line errors for a store without runs or without a single finished run."""
    if runs.empty:
        raise NtkLensError(f"{store.path}: the store has no runs; run a sweep into it first")
    failed = runs[runs["status"] != "ok"]
    if len(failed) == len(runs):
        first = str(failed["error"].iloc[0] or "no message").splitlines()[0]
        raise NtkLensError(
            f"{store.path}: none of the {len(runs)} runs finished (first error: {first}); "
            "fix the cause and re-run the sweep"
        )


def _render(
    spec: FigureSpec, data: StudyData, summary: dict[str, Any], directory: Path
) -> RenderedFigure:
    """Draw one figure and save it as PNG and PDF, or say why the study cannot show it (and
    remove the files an earlier report into the same folder left for it)."""
    png_path = directory / f"{spec.filename}.png"
    pdf_path = directory / f"{spec.filename}.pdf"
    try:
        figure = spec.draw(data, summary)
    except FigureUnavailable as reason:
        png_path.unlink(missing_ok=True)
        pdf_path.unlink(missing_ok=True)
        return RenderedFigure(spec.id, spec.title, spec.caption, note=str(reason))
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=DPI)
    figure.set_layout_engine("none")  # keep the layout just computed; the PDF reuses it
    png_path.write_bytes(png.getvalue())
    figure.savefig(pdf_path, format="pdf")
    return RenderedFigure(
        spec.id,
        spec.title,
        spec.caption,
        png=png.getvalue(),
        pdf_href=f"{directory.name}/{pdf_path.name}",
        files=[png_path, pdf_path],
    )


def _jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays as Python values and NaN/inf as ``None``."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file, so readers never see half a file."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)
    return path

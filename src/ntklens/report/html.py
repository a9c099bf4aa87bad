"""The self-contained HTML report: the verdict table first, embedded figures, every fit.

The verdicts are decided in :mod:`ntklens.analysis.findings` and read from the summary's
``findings`` section; this module only renders them. Plain HTML and CSS with no scripts and
no external resources: figures are PNG data URIs, so
the single file can be mailed or archived. All text from the store or the summary passes
through :func:`html.escape`. Tables carry ``data-*`` attributes on each row and a class per
cell, so scripts (and tests) can read them back.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.9em; color: #444; max-width: 60em; }
figure.missing { border-left: 4px solid #c90; padding: 0.2em 1em; background: #fdf6e3; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: right; }
th { background: #f3f3f3; position: sticky; top: 0; text-align: center; }
td.family, td.group, td.quantity, td.axis, td.model, td.signal, td.method, td.note,
td.direction, td.scaling, td.claim, td.statistic, td.rule, td.reason, td.part, td.status,
td.value, td.ci { text-align: left; }
td.verdict { text-align: center; }
#verdict-table { font-size: 0.85em; } #verdict-table td.rule { color: #555; max-width: 28em; }
#verdict-table td.reason { max-width: 30em; }
tr[data-verdict="supported"] td.verdict { background: #e3f2e1; font-weight: bold; }
tr[data-verdict="contradicted"] td.verdict { background: #f8dcdc; font-weight: bold; }
tr[data-verdict="inconclusive"] td.verdict { background: #f3f0e0; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""

_METHODS = {
    "broken_power_law": "broken power law",
    "threshold": "threshold",
    "advantage": "advantage",
}
# the columns of each summary table: cell class -> header
_FIT_COLUMNS = {
    "axis": "axis", "family": "family", "group": "held fixed", "quantity": "quantity",
    "model": "model", "alpha": "α", "alpha-ci": "α CI", "a": "a", "c": "c", "r2": "R²",
    "n-points": "points", "x-range": "x range",
}  # fmt: skip
_TREND_COLUMNS = {
    "axis": "axis", "family": "family", "group": "held fixed", "quantity": "quantity",
    "direction": "direction", "slope": "slope / decade", "slope-ci": "slope CI",
    "spearman": "Spearman ρ", "n-points": "points",
}  # fmt: skip
_COMPARISON_COLUMNS = {
    "family": "family", "quantity": "quantity", "alpha-data": "α data",
    "alpha-data-ci": "α data CI", "alpha-width": "α width", "alpha-width-ci": "α width CI",
    "diff": "α data − α width", "diff-ci": "difference CI", "excludes-zero": "excludes 0",
}  # fmt: skip
_KERNEL_COLUMNS = {
    "family": "family", "group": "held fixed", "quantity": "quantity",
    "alpha-network": "α network", "alpha-kernel": "α step-0 kernel", "diff": "difference",
    "diff-ci": "difference CI", "scaling": "scaling",
}  # fmt: skip
_VERDICT_COLUMNS = {
    "claim": "claim", "family": "family", "statistic": "statistic", "value": "value",
    "ci": "CI", "rule": "rule", "verdict": "verdict", "reason": "reason",
}  # fmt: skip
_PART_COLUMNS = {
    "claim": "claim", "family": "family", "part": "part", "statistic": "statistic",
    "status": "status", "reason": "reason",
}  # fmt: skip
_TRANSITION_COLUMNS = {
    "family": "family", "group": "held fixed", "signal": "signal", "method": "method",
    "w-star": "w* (checked break) or crossing width", "w-star-ci": "CI",
    "llm-ratio": "w* / LLM width", "note": "note",
}  # fmt: skip

Row = tuple[dict[str, str], dict[str, str]]  # (data-* attributes, cell text by column)


@dataclass(frozen=True)
class RenderedFigure:
    """A drawn figure (PNG bytes, link to its PDF) or, with ``note``, why it was not drawn."""

    id: str
    title: str
    caption: str
    png: bytes | None = None
    pdf_href: str | None = None
    files: list[Path] = field(default_factory=list)
    note: str | None = None


def render_html(
    *,
    store: str,
    runs: pd.DataFrame,
    figures: Sequence[RenderedFigure],
    summary: dict[str, Any],
    variants: dict[str, Any] | None = None,
) -> str:
    """The whole report page for the runs of ``store``, its figures and its summary (and the
    claim × variant robustness table, when given)."""
    body = [
        _header(store, runs, summary),
        _verdicts(summary),
        _variants(variants) if variants else "",
        _figure_index(figures),
        '<section id="figures"><h2>Figures</h2>',
        *(_figure(f) for f in figures),
        "</section>",
        _tables(summary),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>ntklens report: {escape(store)}</title>\n<style>{STYLE}</style>\n</head>\n"
        "<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _header(store: str, runs: pd.DataFrame, summary: dict[str, Any]) -> str:
    """Title, run counts, families, the interval convention and the failed runs."""
    settings = summary.get("settings", {})
    failed = runs[runs["status"] != "ok"]
    families = ", ".join(
        f"{name} ({info.get('n_runs', '?')} runs)"
        for name, info in summary.get("families", {}).items()
    )
    lines = [
        "<h1>ntklens report</h1>",
        f"<p>Store <code>{escape(store)}</code>: {len(runs)} runs, {len(runs) - len(failed)} ok, "
        f"{len(failed)} failed. Families: {escape(families)}.</p>",
        "<p>Power laws are <i>y</i> = <i>a</i>·<i>x</i><sup>−α</sup> (+ <i>c</i> for offset "
        f"fits); intervals in brackets are {_percent(settings.get('confidence'))} bootstrap "
        f"percentile intervals over {escape(str(settings.get('n_bootstrap', '?')))} replicates. "
        "Error bars are the same bootstrap intervals of each point's mean over its seeds.</p>",
    ]
    if len(failed):
        items = "".join(
            f"<li><code>{escape(str(row.run_id))}</code> (width={row.width}, "
            f"n_train={row.n_train}): {escape(str(row.error))}</li>"
            for row in failed.itertuples()
        )
        lines.append(
            f"<details><summary>{len(failed)} failed runs (not in the fits)</summary>"
            f"<ul>{items}</ul></details>"
        )
    return "<header>" + "\n".join(lines) + "</header>"


def _figure_index(figures: Sequence[RenderedFigure]) -> str:
    """The list of figures, with the reason for each one the study cannot show."""
    items = []
    for figure in figures:
        if figure.note is None:
            items.append(f'<li><a href="#{figure.id}">{escape(figure.title)}</a></li>')
        else:
            items.append(f"<li>{escape(figure.title)}: not drawn, {escape(figure.note)}</li>")
    drawn = sum(f.note is None for f in figures)
    return (
        f'<nav id="figure-index"><h2>Figures ({drawn} of {len(figures)} drawn)</h2>'
        f"<ul>{''.join(items)}</ul></nav>"
    )


def _figure(figure: RenderedFigure) -> str:
    """A ``<figure>`` with the PNG as a data URI, or a note in its place."""
    if figure.png is None:
        return (
            f'<figure id="{figure.id}" class="missing"><p><strong>{escape(figure.title)}</strong>'
            f": not drawn, {escape(figure.note or '')}.</p></figure>"
        )
    data = base64.b64encode(figure.png).decode("ascii")
    pdf = f' <a href="{escape(figure.pdf_href)}">PDF</a>' if figure.pdf_href else ""
    return (
        f'<figure id="{figure.id}"><img src="data:image/png;base64,{data}" '
        f'alt="{escape(figure.title)}"><figcaption><strong>{escape(figure.title)}.</strong> '
        f"{escape(figure.caption)}{pdf}</figcaption></figure>"
    )


# ---- the verdicts (decided in analysis.findings; rendered here) ------------------------


def _verdicts(summary: dict[str, Any]) -> str:
    """The verdict table: claim, family, statistic, CI, rule, verdict, reason; then the parts."""
    findings = summary.get("findings")
    if not findings:
        return (
            '<section id="verdicts"><h2>Verdicts</h2><p>This summary holds no verdicts '
            "(made by an older ntklens); rebuild the report to derive them.</p></section>"
        )
    settings = findings.get("settings", {})
    fraction = summary.get("settings", {}).get("fraction")
    llm = ", ".join(str(w) for w in settings.get("llm_widths", []))
    rows: list[Row] = []
    parts: list[Row] = []
    for entry in findings.get("verdicts", []):
        family = entry.get("family") or "—"
        statistic = entry.get("statistic") or {}
        attributes = {"claim": entry["claim"], "family": family, "verdict": entry["verdict"]}
        rows.append(
            (
                attributes,
                {
                    "claim": entry.get("title", entry["claim"]),
                    "family": family,
                    "statistic": _statistic_text(statistic),
                    "value": _value_text(statistic),
                    "ci": _ci_text(statistic),
                    "rule": entry.get("rule", ""),
                    "verdict": entry["verdict"],
                    "reason": entry.get("reason", ""),
                },
            )
        )
        for part in entry.get("parts", []):
            part_statistic = part.get("statistic") or {}
            status = part.get("verdict") or part.get("scaling")
            if status is None and "identified" in part:
                status = "identified" if part["identified"] else "not identified"
            parts.append(
                (
                    {**attributes, "part": str(part.get("part", ""))},
                    {
                        "claim": entry["claim"],
                        "family": family,
                        "part": str(part.get("part", "")),
                        "statistic": _part_statistic(part, part_statistic),
                        "status": str(status or ""),
                        "reason": str(part.get("reason", "")),
                    },
                )
            )
    intro = (
        f"<p>Each verdict follows the rule beside it (decided in "
        f"<code>ntklens.analysis.findings</code>, stored in <code>summary.json</code> under "
        f"<code>findings</code>). Equivalence margin m = {escape(_num(settings.get('margin')))} "
        f"in exponent units; fits count only with R² ≥ {escape(_num(settings.get('min_r2')))}; "
        f"intervals {_percent(settings.get('confidence'))} (equivalence tests "
        f"{_percent(settings.get('tost_confidence'))}); LLM widths for w*/LLM: "
        f"{escape(llm or '—')}; threshold fraction of the descriptive w* estimators: "
        f"{escape(_num(fraction))}.</p>"
    )
    return (
        f'<section id="verdicts"><h2>Verdicts</h2>{intro}'
        + _table("verdict-table", _VERDICT_COLUMNS, rows)
        + "<details><summary>Each verdict's parts (per observable, width or estimator)"
        "</summary>" + _table("verdict-parts", _PART_COLUMNS, parts) + "</details></section>"
    )


def _variants(table: dict[str, Any]) -> str:
    """Claim × variant: each variant's verdict with its statistic, and what each variant is."""
    listing = table.get("variants", [])
    names = [v["name"] for v in listing if v.get("status") == "ran"]
    columns = {"claim": "claim", "scope": "scope", **{f"v-{n}": n for n in names}}
    rows: list[Row] = []
    for row in table.get("rows", []):
        cells = {"claim": table.get("claims", {}).get(row["claim"], row["claim"]),
                 "scope": row["scope"]}  # fmt: skip
        for name in names:
            cell = row["cells"].get(name)
            if cell is None:
                cells[f"v-{name}"] = "—"
                continue
            value = cell.get("value")
            number = "" if value is None else f" ({_num(value)} {_interval(cell.get('ci'))})"
            cells[f"v-{name}"] = f"{cell['verdict']}{number}"
        rows.append(({"claim": row["claim"], "family": row["scope"]}, cells))
    items = "".join(
        f"<li><code>{escape(v['name'])}</code> ({escape(v.get('axis', ''))}): "
        f"{escape(v.get('description', ''))} — {escape(v.get('status', ''))}</li>"
        for v in listing
    )
    return (
        '<section id="variants"><h2>Robustness: verdicts under the protocol variants</h2>'
        + _table("variant-table", columns, rows)
        + f"<ul>{items}</ul></section>"
    )


def _statistic_text(statistic: dict[str, Any]) -> str:
    return str(statistic.get("name", "—")) if statistic else "—"


def _value_text(statistic: dict[str, Any]) -> str:
    if not statistic:
        return "—"
    if statistic.get("text"):
        return str(statistic["text"])
    value = statistic.get("value")
    if value is None:
        return "not identified" if "w*" in str(statistic.get("name", "")) else "—"
    text = _num(value)
    ratios = statistic.get("llm_ratio")
    if ratios:
        text += " (" + ", ".join(f"w*/{w} = {_num(r)}" for w, r in ratios.items()) + ")"
    return text


def _ci_text(statistic: dict[str, Any]) -> str:
    if not statistic or statistic.get("value") is None:
        return "—"
    shown = _interval(statistic.get("ci"))
    if shown == "—":
        return shown
    return f"{shown} ({_percent(statistic.get('confidence'))})"


def _part_statistic(part: dict[str, Any], statistic: dict[str, Any]) -> str:
    """One line for a part: its statistic with CI, the w* it located, or the slopes."""
    if "data" in statistic and "width" in statistic:
        data, width = statistic["data"], statistic["width"]
        return (
            f"slope/decade along data ({data['group']}) {_num(data['slope'])} "
            f"{_interval(data['ci'])}; along width ({width['group']}) {_num(width['slope'])} "
            f"{_interval(width['ci'])}"
        )
    if part.get("identified"):
        bounds = part.get("ci") or part.get("bracket")
        label = "CI" if part.get("ci") else "between"
        ratios = ", ".join(f"w*/{w} = {_num(r)}" for w, r in part.get("llm_ratio", {}).items())
        return f"w* = {_num(part['w_star'])}, {label} {_interval(bounds)}; {ratios}"
    if statistic:
        return (
            f"{statistic.get('name', '')} = {_num(statistic.get('value'))} "
            f"{_interval(statistic.get('ci'))}"
        )
    return "—"


# ---- summary tables --------------------------------------------------------------------


def _tables(summary: dict[str, Any]) -> str:
    """Every fitted number of the summary, one table per kind, and what was not fitted."""
    skipped: list[str] = []
    parts = [
        '<section id="summary-tables"><h2>Summary table</h2>',
        "<h3>Power-law fits</h3>",
        _table("fits", _FIT_COLUMNS, list(_fit_rows(summary, skipped))),
        "<h3>Exponents: data scaling vs width scaling</h3>",
        _table("comparisons", _COMPARISON_COLUMNS, list(_comparison_rows(summary))),
        "<h3>Network vs step-0 kernel regression (data-scaling exponents)</h3>",
        _table("kernel-vs-network", _KERNEL_COLUMNS, list(_kernel_rows(summary))),
        "<h3>Transition width w*</h3>",
        _table("transitions", _TRANSITION_COLUMNS, list(_transition_rows(summary, skipped))),
        "<h3>Kernel trends (direction along each axis)</h3>",
        _table("trends", _TREND_COLUMNS, list(_trend_rows(summary, skipped))),
    ]
    if skipped:
        items = "".join(f"<li>{escape(s)}</li>" for s in skipped)
        parts.append(
            f'<details id="not-fitted"><summary>{len(skipped)} entries not fitted, with the '
            f"reason</summary><ul>{items}</ul></details>"
        )
    return "\n".join([*parts, "</section>"])


def _table(table_id: str, columns: dict[str, str], rows: list[Row]) -> str:
    """An HTML table; each row keeps its ``data-*`` attributes, each cell its column class."""
    if not rows:
        return f'<p id="{table_id}">None.</p>'
    head = "".join(f"<th>{escape(label)}</th>" for label in columns.values())
    body = []
    for attributes, cells in rows:
        attrs = "".join(f' data-{k}="{escape(v, quote=True)}"' for k, v in attributes.items())
        tds = "".join(f'<td class="{c}">{escape(cells.get(c, ""))}</td>' for c in columns)
        body.append(f"<tr{attrs}>{tds}</tr>")
    return (
        f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _scaling_entries(
    summary: dict[str, Any], section: str
) -> Iterator[tuple[str, str, str, str, dict[str, Any]]]:
    """``(axis, family, group, quantity)`` and the entry for each quantity of a section."""
    for axis in ("data", "width"):
        source = (
            summary.get(f"{axis}_scaling", {})
            if section == "fits"
            else summary.get("kernel_directions", {}).get(axis, {})
        )
        for family, groups in source.items():
            for group, entries in groups.items():
                if group == "overall":
                    continue
                for quantity, entry in entries.items():
                    if isinstance(entry, dict):
                        yield axis, family, group, quantity, entry
                    elif quantity == "skipped":
                        yield axis, family, group, "", {"skipped": entry}


def _fit_rows(summary: dict[str, Any], skipped: list[str]) -> Iterator[Row]:
    for axis, family, group, quantity, fit in _scaling_entries(summary, "fits"):
        if "params" not in fit:
            skipped.append(f"{axis} scaling, {family}, {group} {quantity}: {fit['skipped']}")
            continue
        shown = f"{quantity} (fit to −y)" if fit.get("sign") == "negative" else quantity
        params = fit["params"]
        yield (
            {"axis": axis, "family": family, "group": group, "quantity": quantity},
            {
                "axis": axis, "family": family, "group": group, "quantity": shown,
                "model": fit["model"], "alpha": _num(params["alpha"]),
                "alpha-ci": _interval(fit["ci"]["alpha"]), "a": _num(params["a"]),
                "c": _num(params.get("c")), "r2": _num(fit["r2"]),
                "n-points": str(fit["n_points"]),
                "x-range": _interval([fit["x_min"], fit["x_max"]]),
            },
        )  # fmt: skip


def _trend_rows(summary: dict[str, Any], skipped: list[str]) -> Iterator[Row]:
    for axis, family, group, quantity, trend in _scaling_entries(summary, "trends"):
        if "direction" not in trend:
            if quantity:  # a skipped group is already listed with the fits
                skipped.append(f"{axis} trend, {family}, {group} {quantity}: {trend['skipped']}")
            continue
        yield (
            {"axis": axis, "family": family, "group": group, "quantity": quantity},
            {
                "axis": axis, "family": family, "group": group, "quantity": quantity,
                "direction": trend["direction"], "slope": _num(trend["slope_per_decade"]),
                "slope-ci": _interval(trend["ci"]), "spearman": _num(trend["spearman"]),
                "n-points": str(trend["n_points"]),
            },
        )  # fmt: skip


def _comparison_rows(summary: dict[str, Any]) -> Iterator[Row]:
    for family, quantities in summary.get("exponent_comparison", {}).items():
        for quantity, entry in quantities.items():
            data, width = entry["data"], entry["width"]
            yield (
                {"family": family, "quantity": quantity},
                {
                    "family": family, "quantity": quantity,
                    "alpha-data": f"{_num(data['alpha'])} ({data['group']})",
                    "alpha-data-ci": _interval(data["ci"]),
                    "alpha-width": f"{_num(width['alpha'])} ({width['group']})",
                    "alpha-width-ci": _interval(width["ci"]), "diff": _num(entry["diff"]),
                    "diff-ci": _interval(entry["ci"]),
                    "excludes-zero": "yes" if entry["excludes_zero"] else "no",
                },
            )  # fmt: skip


def _kernel_rows(summary: dict[str, Any]) -> Iterator[Row]:
    for family, groups in summary.get("kernel_vs_network_data_exponent", {}).items():
        for group, losses in groups.items():
            for quantity, entry in losses.items():
                yield (
                    {"family": family, "group": group, "quantity": quantity},
                    {
                        "family": family, "group": group, "quantity": quantity,
                        "alpha-network": _num(entry["alpha_a"]),
                        "alpha-kernel": _num(entry["alpha_b"]), "diff": _num(entry["diff"]),
                        "diff-ci": _interval(entry["ci"]), "scaling": entry["scaling"],
                    },
                )  # fmt: skip


def _transition_rows(summary: dict[str, Any], skipped: list[str]) -> Iterator[Row]:
    transition = summary.get("transition", {})
    if "skipped" in transition:
        skipped.append(f"transition width: {transition['skipped']}")
        return
    fraction = _num(summary.get("settings", {}).get("fraction"))
    labels = {
        "broken_power_law": "broken power law (checked)",
        "threshold": f"threshold, f = {fraction} (descriptive)",
        "advantage": f"advantage, f = {fraction} (descriptive)",
    }
    for family, groups in transition.items():
        for group, entry in groups.items():
            if "skipped" in entry:
                skipped.append(f"transition width, {family}, {group}: {entry['skipped']}")
                continue
            estimates = [("kernel_change", m, entry[m]) for m in _METHODS if m in entry]
            estimates += [
                (signal, m, estimate)
                for signal, methods in entry.get("signals", {}).items()
                for m, estimate in methods.items()
            ]
            for signal, method, estimate in estimates:
                shown_signal = "loss advantage" if method == "advantage" else signal
                ratios = (
                    entry.get("llm_ratio", {}).get(method) if signal == "kernel_change" else None
                )
                yield (
                    {"family": family, "group": group, "signal": shown_signal, "method": method},
                    {
                        "family": family, "group": group, "signal": shown_signal,
                        "method": labels[method], "w-star": _num(estimate.get("w_star")),
                        "w-star-ci": _interval(estimate.get("ci")),
                        "llm-ratio": ", ".join(
                            f"{_num(r)} (/{w})" for w, r in (ratios or {}).items()
                        ),
                        "note": _transition_note(estimate),
                    },
                )  # fmt: skip


def _transition_note(estimate: dict[str, Any]) -> str:
    """Why an estimate is missing or weak: its skip reason, or the method's own remarks."""
    if "skipped" in estimate:
        return estimate["skipped"]
    details = estimate.get("details", {})
    if estimate.get("identified") is False and estimate.get("reason"):
        return estimate["reason"]
    notes = [details[k] for k in ("reason", "ci_reason") if details.get(k)]
    if details.get("at_grid_edge"):
        notes.append("break at the edge of the width grid")
    return "; ".join(notes)


# ---- numbers ---------------------------------------------------------------------------


def _num(value: float | None) -> str:
    """Four significant digits; an em dash for a missing number."""
    return "—" if value is None else f"{value:.4g}"


def _interval(bounds: Sequence[float | None] | None) -> str:
    """``[low, high]``; an em dash when there is no interval."""
    if not bounds or all(b is None for b in bounds):
        return "—"
    low, high = bounds
    return f"[{_num(low)}, {_num(high)}]"


def _estimate(value: float | None, bounds: Sequence[float | None] | None) -> str:
    """``value [low, high]`` for running text, saying so when the interval is missing."""
    shown = _interval(bounds)
    return f"{_num(value)} {shown if shown != '—' else '(no CI)'}"


def _percent(confidence: float | None) -> str:
    return "?" if confidence is None else f"{confidence:.0%}"

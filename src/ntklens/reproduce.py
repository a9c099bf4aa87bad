"""One-command reproduction of the paper's findings: the sweeps, then the report.

A protocol is a set of study configs shipped with the package (``ntklens/protocols/<dataset>/
<scale>/*.toml``): a data-scaling sweep at one width and width-scaling sweeps under the NTK
parameterization and μP at one training-set size. Their grids share a point (the data
sweep's width at the width sweeps' ``n_train``), so the runs land in one store and the
summary fits data scaling and width scaling over the same family. ``quick`` fits a laptop
(~15 min on 2 cores), ``paper`` locates the transition on a workstation (~2 h on 2
cores), ``full`` is the same shape at paper scale, for a GPU or a Ray cluster.

Robustness: ``<scale>/variants/*.toml`` are the protocol's alternatives (loss,
parameterization, centering, dataset, architecture). Each variant overrides keys of the
protocol's studies; :func:`run_variants` runs every variant into its own store, derives
its verdicts and writes one table claim × variant → verdict (``variants.json``). A variant
that needs a RunSpec field this ntklens lacks (``requires``), or whose overrides do not
validate (an unknown dataset, an unknown option), is listed as skipped with the reason.
A variant file::

    name = "cross-entropy"          # the column of the table
    axis = "loss"                   # one of VARIANT_AXES
    description = "why this alternative is reasonable"
    requires = []                   # RunSpec fields it needs (checked at run time)
    skip = ["*-width-cnn"]          # studies left out of this variant (optional)
    [[override]]                    # applied to every study, or to those matching `studies`
    studies = ["*-width-*"]         # fnmatch patterns of study names (optional)
    set = { train = { loss = "cross_entropy", lr = 0.5 } }
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ntklens.errors import ConfigError, NtkLensError
from ntklens.report import build_report, write_json
from ntklens.schema import RunSpec
from ntklens.sweep.config import StudyConfig, validate_config
from ntklens.sweep.driver import SweepSummary, run_sweep
from ntklens.sweep.progress import make_progress

SCALES = ("quick", "paper", "full")
VARIANT_AXES = ("loss", "parameterization", "centering", "dataset", "architecture")
VARIANT_KEYS = {"name", "axis", "description", "requires", "skip", "override"}
BASE = "base"


@dataclass(frozen=True)
class Variant:
    """One alternative protocol: overrides of the base studies' config keys."""

    name: str
    axis: str
    description: str
    requires: tuple[str, ...] = ()
    overrides: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()  # (patterns, mapping)
    skip: tuple[str, ...] = ()  # patterns of the studies the variant leaves out


@dataclass(frozen=True)
class Reproduction:
    """What a reproduction wrote: the store, the report, and the study's headline numbers."""

    store: Path
    report: Path
    summary_json: Path
    sweeps: dict[str, SweepSummary]
    headline: dict[str, Any]
    variants_json: Path | None = None
    variants: dict[str, Any] = field(default_factory=dict)


def protocol_names() -> list[str]:
    """The datasets that have a shipped protocol."""
    root = resources.files("ntklens") / "protocols"
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir())


def _folder(dataset: str, scale: str) -> Any:
    if dataset not in protocol_names():
        raise ConfigError(
            f"no reproduction protocol for dataset {dataset!r}; choose one of {protocol_names()}"
        )
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of {list(SCALES)}")
    folder = resources.files("ntklens") / "protocols" / dataset / scale
    if not folder.is_dir():
        raise ConfigError(f"no {scale!r} protocol for {dataset!r}; choose another --scale")
    return folder


def _read_toml(entry: Any, label: str) -> dict[str, Any]:
    try:
        return tomllib.loads(entry.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{label}: invalid TOML: {error}; fix the syntax there") from None


def protocol_raw(dataset: str, scale: str) -> list[tuple[str, dict[str, Any]]]:
    """The protocol's study configs as parsed TOML, ``(file name, mapping)``, in run order."""
    folder = _folder(dataset, scale)
    files = sorted((e for e in folder.iterdir() if e.name.endswith(".toml")), key=lambda e: e.name)
    return [(entry.name, _read_toml(entry, entry.name)) for entry in files]


def protocol(dataset: str, scale: str) -> list[StudyConfig]:
    """The validated study configs of one protocol, in the order they run."""
    return [validate_config(raw, label=name) for name, raw in protocol_raw(dataset, scale)]


def variants(dataset: str, scale: str) -> list[Variant]:
    """The protocol's variants (``<scale>/variants/*.toml``), validated, in the order of
    :data:`VARIANT_AXES` (cheap alternatives first, the architecture last); none if no folder."""
    folder = _folder(dataset, scale) / "variants"
    if not folder.is_dir():
        return []
    files = sorted((e for e in folder.iterdir() if e.name.endswith(".toml")), key=lambda e: e.name)
    parsed = [parse_variant(_read_toml(entry, entry.name), entry.name) for entry in files]
    return sorted(parsed, key=lambda v: (VARIANT_AXES.index(v.axis), v.name))


def parse_variant(raw: dict[str, Any], label: str = "variant") -> Variant:
    """A :class:`Variant` from a parsed variant file; one-line ConfigError on a bad one."""
    unknown = sorted(set(raw) - VARIANT_KEYS)
    if unknown:
        raise ConfigError(f"{label}: unknown keys {unknown}; a variant has {sorted(VARIANT_KEYS)}")
    name, axis = raw.get("name"), raw.get("axis")
    if not isinstance(name, str) or not name or name == BASE:
        raise ConfigError(f"{label}: name must be a non-empty string other than {BASE!r}")
    if axis not in VARIANT_AXES:
        raise ConfigError(f"{label}: axis must be one of {list(VARIANT_AXES)}, got {axis!r}")
    requires = raw.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise ConfigError(f"{label}: requires must be a list of RunSpec field names")
    skip = raw.get("skip", [])
    if not isinstance(skip, list) or not all(isinstance(p, str) for p in skip):
        raise ConfigError(f"{label}: skip must be a list of study-name patterns")
    overrides = []
    for index, entry in enumerate(raw.get("override", [])):
        patterns = entry.get("studies", ["*"])
        mapping = entry.get("set")
        if set(entry) - {"studies", "set"} or not isinstance(mapping, dict):
            raise ConfigError(
                f"{label}: override[{index}] needs a `set` table (and optional `studies`)"
            )
        overrides.append((tuple(patterns), mapping))
    if not overrides:
        raise ConfigError(f"{label}: a variant needs at least one [[override]] with a `set` table")
    description = str(raw.get("description", ""))
    return Variant(name, axis, description, tuple(requires), tuple(overrides), tuple(skip))


def variant_studies(
    base: list[tuple[str, dict[str, Any]]], variant: Variant
) -> list[StudyConfig] | str:
    """The base studies, less those the variant skips, with its overrides applied and
    validated, or why the variant cannot run here (a RunSpec field it needs is missing, or
    its config does not validate)."""
    missing = [f for f in variant.requires if f not in RunSpec.model_fields]
    if missing:
        return f"needs RunSpec field(s) {', '.join(missing)}, which this ntklens does not have yet"
    studies = []
    for file_name, raw in base:
        merged = _deep_copy(raw)
        study_name = str(merged.get("name", file_name))
        if any(fnmatch.fnmatch(study_name, p) for p in variant.skip):
            continue
        for patterns, mapping in variant.overrides:
            if any(fnmatch.fnmatch(study_name, p) for p in patterns):
                merged = _merge(merged, mapping)
        merged["name"] = f"{study_name}--{variant.name}"
        try:
            studies.append(validate_config(merged, label=f"{file_name} under {variant.name}"))
        except ConfigError as error:
            return str(error)
    return studies


def reproduce(
    dataset: str,
    scale: str,
    out: str | Path,
    *,
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    quiet: bool = False,
    with_variants: bool = False,
    **analysis_options: Any,
) -> Reproduction:
    """Run a protocol's sweeps into ``out/store`` (resumable), then write the report.

    Each sweep gets its own progress display (log lines when ``quiet``). The report
    (``out/report.html``, ``out/figures/``) and ``out/summary.json`` come from
    :func:`ntklens.report.build_report` with ``analysis_options`` (``llm_widths``,
    ``fraction``, ``margin``, ...). With ``with_variants`` every variant of the protocol
    also runs (``out/variants/<name>/``) and ``out/variants.json`` holds the claim × variant
    table, which the report shows too.
    """
    studies = protocol(dataset, scale)
    chosen = variants(dataset, scale) if with_variants else []
    out = Path(out)
    store = out / "store"
    sweep_options = {"executor": executor, "workers": workers, "address": address}
    sweeps = {
        study.name: run_sweep(study, store, progress=make_progress(quiet=quiet), **sweep_options)
        for study in studies
    }
    summary = build_report(store, out, fmt="json", **analysis_options).summary
    table: dict[str, Any] = {}
    variants_json = None
    if with_variants:
        table = run_variants(
            protocol_raw(dataset, scale), chosen, summary, out,
            quiet=quiet, analysis_options=analysis_options, **sweep_options,
        )  # fmt: skip
        variants_json = write_json(table, out / "variants.json")
    build_report(store, out, fmt="html", summary=summary, variants=table or None)
    summary_json = write_json(summary, out / "summary.json")
    return Reproduction(
        store=store,
        report=out / "report.html",
        summary_json=summary_json,
        sweeps=sweeps,
        headline=headline(summary),
        variants_json=variants_json,
        variants=table,
    )


def run_variants(
    base: list[tuple[str, dict[str, Any]]],
    chosen: list[Variant],
    base_summary: dict[str, Any],
    out: str | Path,
    *,
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    quiet: bool = False,
    analysis_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run each variant's studies into ``out/variants/<name>/store``, summarize each, and
    return the claim × variant table (see :func:`variant_table`)."""
    summaries: dict[str, dict[str, Any]] = {BASE: base_summary}
    status: dict[str, str] = {}
    for variant in chosen:
        studies = variant_studies(base, variant)
        if isinstance(studies, str):
            status[variant.name] = f"skipped: {studies}"
            continue
        folder = Path(out) / "variants" / variant.name
        for study in studies:
            run_sweep(
                study, folder / "store", executor=executor, workers=workers, address=address,
                progress=make_progress(quiet=quiet),
            )  # fmt: skip
        try:
            report = build_report(folder / "store", folder, fmt="json", **(analysis_options or {}))
        except NtkLensError as error:
            status[variant.name] = f"failed: {error}"
            continue
        summaries[variant.name] = report.summary
        status[variant.name] = "ran"
    return variant_table(summaries, chosen, status)


def variant_table(
    summaries: dict[str, dict[str, Any]], chosen: list[Variant], status: dict[str, str]
) -> dict[str, Any]:
    """One row per (claim, scope) with each variant's verdict, statistic and CI.

    ``scope`` is the parameterization part of a verdict's family (``ntk``, ``mup``, ``ntk vs
    mup``), so a CNN variant lines up with the MLP base; where one summary has a claim for
    two models in the same scope (an MLP and a CNN study in one store), their scopes keep
    the model (``mlp/ntk``, ``cnn/ntk``). ``variants`` lists every variant with its axis
    and status (``ran``, ``skipped: …``, ``failed: …``).
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    titles: dict[str, str] = {}
    for name, summary in summaries.items():
        findings = summary.get("findings", {})
        titles.update(findings.get("claims", {}))
        verdicts = findings.get("verdicts", [])
        seen = Counter((e["claim"], _scope(e.get("family"))) for e in verdicts)
        for entry in verdicts:
            key = (entry["claim"], _scope(entry.get("family")))
            if seen[key] > 1:
                key = (entry["claim"], _scope(entry.get("family"), with_model=True))
            statistic = entry.get("statistic") or {}
            row = rows.setdefault(key, {"claim": key[0], "scope": key[1], "cells": {}})
            row["cells"][name] = {
                "verdict": entry["verdict"],
                "reason": entry.get("reason"),
                "statistic": statistic.get("name"),
                "value": statistic.get("value"),
                "ci": statistic.get("ci"),
                "family": entry.get("family"),
            }
    listing = [{"name": BASE, "axis": "—", "description": "the protocol as shipped",
                "status": "ran"}]  # fmt: skip
    listing += [
        {"name": v.name, "axis": v.axis, "description": v.description,
         "status": status.get(v.name, "not run")}
        for v in chosen
    ]  # fmt: skip
    return {"variants": listing, "claims": titles, "rows": list(rows.values())}


def _scope(family: str | None, *, with_model: bool = False) -> str:
    if not family:
        return "—"
    sides = [side.split(";")[0] for side in family.split(" vs ")]
    if not with_model:
        sides = [side.partition("/")[2] or side for side in sides]
    return " vs ".join(sides)


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, tables recursively, other values replaced."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers the paper's claims rest on, from a :func:`~ntklens.analysis.summarize` dict.

    Per family: the test-loss exponents of data scaling and width scaling with their CIs
    and their difference, the direction of every kernel observable under each kind of
    scaling, and the transition width w* by each method; and under ``"verdicts"`` every
    claim's verdict, statistic and reason.
    """
    families = summary.get("families", {})
    result: dict[str, Any] = {}
    for family in families:
        entry: dict[str, Any] = {}
        for axis, key in (("data", "data_scaling"), ("width", "width_scaling")):
            groups = summary.get(key, {}).get(family, {})
            entry[f"{axis}_exponent"] = {
                group: _exponent(fits.get("test_loss"))
                for group, fits in groups.items()
                if isinstance(fits, dict) and _exponent(fits.get("test_loss")) is not None
            }
        entry["exponent_comparison"] = summary.get("exponent_comparison", {}).get(family)
        entry["kernel_directions"] = {
            axis: _fitted_groups(summary.get("kernel_directions", {}).get(axis, {}).get(family))
            for axis in ("data", "width")
        }
        entry["transition_width"] = _fitted_groups(summary.get("transition", {}).get(family))
        result[family] = entry
    result["verdicts"] = [
        {k: v.get(k) for k in ("claim", "family", "verdict", "reason", "statistic")}
        for v in summary.get("findings", {}).get("verdicts", [])
    ]
    return result


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """One line per verdict (``claim [family]: verdict — reason``) after one line of the
    settings the verdicts used (margin, LLM widths, threshold fraction), for the terminal."""
    findings = summary.get("findings", {})
    settings = findings.get("settings", {})
    fraction = summary.get("settings", {}).get("fraction")
    lines = [
        f"verdicts (margin {settings.get('margin')}, LLM widths "
        f"{', '.join(str(w) for w in settings.get('llm_widths', []))}, threshold fraction "
        f"{fraction}):"
    ]
    for entry in findings.get("verdicts", []):
        family = f" [{entry['family']}]" if entry.get("family") else ""
        lines.append(f"  {entry['claim']}{family}: {entry['verdict']} — {entry['reason']}")
    return lines


def _exponent(fit: Any) -> dict[str, Any] | None:
    """α with its CI and R² from a fit dict, or None where the fit was skipped."""
    if not isinstance(fit, dict) or "params" not in fit:
        return None
    return {
        "alpha": fit["params"]["alpha"],
        "ci": fit["ci"]["alpha"],
        "r2": fit.get("r2"),
        "n_points": fit.get("n_points"),
    }


def _fitted_groups(groups: Any) -> dict[str, Any]:
    """The groups of a summary section that hold results, without skipped or empty ones."""
    if not isinstance(groups, dict):
        return {}
    return {
        name: value
        for name, value in groups.items()
        if isinstance(value, dict) and value and "skipped" not in value
    }

"""One-command reproduction of the paper's findings: the sweeps, then the report.

A protocol is a set of study configs shipped with the package (``ntklens/protocols/<dataset>/
<scale>/*.toml``): a data-scaling sweep at one width and width-scaling sweeps under the NTK
parameterization and μP at one training-set size. Their grids share a point (the data
sweep's width at the width sweeps' ``n_train``), so the runs land in one store and the
summary fits data scaling and width scaling over the same family. ``quick`` fits a laptop;
``full`` has the same shape at paper scale, for a GPU or a Ray cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ntklens.errors import ConfigError
from ntklens.report import build_report, write_json
from ntklens.sweep.config import StudyConfig, load_config
from ntklens.sweep.driver import SweepSummary, run_sweep
from ntklens.sweep.progress import make_progress

SCALES = ("quick", "full")


@dataclass(frozen=True)
class Reproduction:
    """What a reproduction wrote: the store, the report, and the study's headline numbers."""

    store: Path
    report: Path
    summary_json: Path
    sweeps: dict[str, SweepSummary]
    headline: dict[str, Any]


def protocol_names() -> list[str]:
    """The datasets that have a shipped protocol."""
    root = resources.files("ntklens") / "protocols"
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir())


def protocol(dataset: str, scale: str) -> list[StudyConfig]:
    """The validated study configs of one protocol, in the order they run."""
    if dataset not in protocol_names():
        raise ConfigError(
            f"no reproduction protocol for dataset {dataset!r}; choose one of {protocol_names()}"
        )
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of {list(SCALES)}")
    folder = resources.files("ntklens") / "protocols" / dataset / scale
    files = sorted(entry for entry in folder.iterdir() if entry.name.endswith(".toml"))
    with resources.as_file(folder) as directory:
        return [load_config(Path(directory) / entry.name) for entry in files]


def reproduce(
    dataset: str,
    scale: str,
    out: str | Path,
    *,
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    quiet: bool = False,
) -> Reproduction:
    """Run a protocol's sweeps into ``out/store`` (resumable), then write the report.

    Each sweep gets its own progress display (log lines when ``quiet``). The report
    (``out/report.html``, ``out/figures/``) and ``out/summary.json`` come from
    :func:`ntklens.report.build_report`; the headline numbers are picked out of the summary.
    """
    studies = protocol(dataset, scale)
    out = Path(out)
    store = out / "store"
    sweeps = {
        study.name: run_sweep(
            study,
            store,
            executor=executor,
            workers=workers,
            address=address,
            progress=make_progress(quiet=quiet),
        )
        for study in studies
    }
    report = build_report(store, out, fmt="html")
    summary_json = write_json(report.summary, out / "summary.json")
    return Reproduction(
        store=store,
        report=out / "report.html",
        summary_json=summary_json,
        sweeps=sweeps,
        headline=headline(report.summary),
    )


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers the paper's claims rest on, from a :func:`~ntklens.analysis.summarize` dict.

    Per family: the test-loss exponents of data scaling and width scaling with their CIs
    and their difference, the direction of every kernel observable under each kind of
    scaling, and the transition width w* by each method.
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
    return result


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

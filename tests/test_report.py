"""The report: figures from a planted study, the self-contained HTML page, JSON, errors.

The planted store follows known power laws (test loss ∝ n^(−α_data)·w^(−α_width)) and a
broken power law of the kernel change in width, so plotted points and fitted lines can be
checked against values computed here, independently of the report.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer

import ntklens.store
from ntklens.errors import NtkLensError
from ntklens.report import FIGURES, ReportResult, build_report, write_json
from ntklens.report.build import study_data
from ntklens.report.figures import fit_label
from ntklens.schema import RunResult, RunSpec, Spectrum

WIDTHS = (16, 32, 64, 128, 256)
N_TRAINS = (100, 200, 400)
SEEDS = (0, 1)
STEPS = (0, 10, 100)
N_PROBE = 12
OBSERVABLES = ("trace", "entropy", "effective_rank", "alignment")
# planted per parameterization: data exponent, width exponent, transition width w*
PLANTED = {"standard": (0.30, 0.20, 48.0), "ntk": (0.25, 0.10, 96.0)}
NOISE = 0.01
FAILED_ERROR = "loss is nan at step 3 <script>alert('lr too high')</script>; lower lr"


def kernel_change(width: float, w_star: float) -> float:
    """A smoothly broken power law: slope −0.1 below w*, −1.0 above it."""
    u = width / w_star
    return 0.5 * u**-0.1 * (1.0 + u) ** -0.9


def planted_test_loss(parameterization: str, width: float, n_train: float) -> float:
    """The noise-free end-of-training test loss: a power law in both n_train and width."""
    alpha_data, alpha_width, _ = PLANTED[parameterization]
    return 2.0 * n_train**-alpha_data * width**-alpha_width


def planted_result(parameterization: str, width: int, n_train: int, seed: int) -> RunResult:
    """One run whose records follow the planted laws, with multiplicative seed noise."""
    spec = RunSpec(
        dataset="digits",
        n_train=n_train,
        width=width,
        seed=seed,
        parameterization=parameterization,
        steps=STEPS[-1],
        n_probe=N_PROBE,
    )
    rng = np.random.default_rng([width, n_train, seed, len(parameterization)])

    def noisy(value: float) -> float:
        return value * float(np.exp(NOISE * rng.standard_normal()))

    w_star = PLANTED[parameterization][2]
    delta = noisy(kernel_change(width, w_star) * (n_train / 100) ** 0.1)
    loss_end = noisy(planted_test_loss(parameterization, width, n_train))
    init = {"trace": 10.0, "entropy": 2.0, "effective_rank": 6.0, "alignment": 0.3}
    init = {k: noisy(v * (1 + 1 / np.sqrt(width))) for k, v in init.items()}
    rows: list[tuple[int, str, float]] = []
    for step in STEPS:
        progress = np.log1p(step) / np.log1p(STEPS[-1])
        loss = loss_end * (1.0 + 3.0 * (1.0 - progress))
        rows += [(step, "train_loss", 0.8 * loss), (step, "test_loss", loss)]
        rows += [(step, "train_acc", 1 - 0.4 * loss), (step, "test_acc", 1 - 0.5 * loss)]
        rows += [(step, "chi_pos", noisy(0.05 * (1 + step) ** -0.3 * (1 + 10 / width)))]
        rows += [(step, "ntk_change", delta * progress)]
        for key, value in init.items():
            shift = progress * delta * (n_train / 100) ** 0.3
            rows += [(step, f"ntk_{key}", value * (1 - 0.2 * shift))]
    rows += [(STEPS[-1], "kernel0_test_loss", loss_end * (1 + w_star / width))]
    rows += [(STEPS[-1], "kernel0_test_acc", 1 - 0.5 * loss_end * (1 + w_star / width))]
    eigen = np.arange(1, N_PROBE + 1, dtype=np.float64)
    spectra = [
        Spectrum(step, "entk", init["trace"] * eigen ** -(1.2 + 0.5 * step / STEPS[-1]))
        for step in STEPS
    ]
    if parameterization == "ntk":
        rows += [(STEPS[-1], "infinite_test_loss", 1.5 * loss_end)]
        rows += [(STEPS[-1], "infinite_test_acc", 1 - 0.75 * loss_end)]
        rows += [(0, "infinite_ntk_trace", 10.0), (0, "infinite_ntk_entropy", 2.0)]
        spectra.append(Spectrum(0, "infinite", 10.0 * eigen**-1.2))
    records = pd.DataFrame(rows, columns=["step", "quantity", "value"])
    return RunResult(spec=spec, run_id=spec.run_id, status="ok", records=records, spectra=spectra)


def write_planted_store(path: Path) -> ntklens.store.Store:
    """Two parameterizations × 5 widths × 3 dataset sizes × 2 seeds, plus one failed run."""
    store = ntklens.store.open(path, create=True)
    grid = itertools.product(PLANTED, WIDTHS, N_TRAINS, SEEDS)
    for parameterization, width, n_train, seed in grid:
        store.write(planted_result(parameterization, width, n_train, seed))
    failed = RunSpec(dataset="digits", n_train=100, width=16, seed=7, steps=STEPS[-1])
    store.write(RunResult(failed, failed.run_id, "failed", error=FAILED_ERROR, failed_step=3))
    return store


N_BOOTSTRAP = 50
# one observable (with an infinite-width value) keeps the kernel figures small and fast
REPORT_OPTIONS = {"n_bootstrap": N_BOOTSTRAP, "observables": ("entropy",)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class TableReader(HTMLParser):
    """Figures (id -> img src) and tables (id -> rows of data-* attributes and cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, str | None] = {}
        self.tables: dict[str, list[tuple[dict[str, str], dict[str, str]]]] = {}
        self.external: list[str] = []
        self.scripts = 0
        self._figure: str | None = None
        self._table: str | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        for key in ("src", "href"):
            if re.match(r"(https?:)?//", attributes.get(key, "")):
                self.external.append(attributes[key])
        if tag == "script" or (tag == "link" and attributes.get("rel") == "stylesheet"):
            self.scripts += 1
        if tag == "figure":
            self._figure = attributes["id"]
            self.figures[self._figure] = None
        elif tag == "img" and self._figure is not None:
            self.figures[self._figure] = attributes["src"]
        elif tag == "table":
            self._table = attributes["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None and "data-family" in attributes:
            data = {
                k.removeprefix("data-"): v for k, v in attributes.items() if k.startswith("data-")
            }
            self.tables[self._table].append((data, {}))
        elif tag == "td" and self._table is not None and self.tables[self._table]:
            self._cell = attributes["class"]
            self.tables[self._table][-1][1][self._cell] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = None
        elif tag == "table":
            self._table = None
        elif tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None and self._table is not None:
            self.tables[self._table][-1][1][self._cell] += data


def read_html(path: Path) -> TableReader:
    reader = TableReader()
    reader.feed(path.read_text(encoding="utf-8"))
    return reader


def shown(value: float | None) -> float:
    """A number as the report shows it (four significant digits), for exact comparison."""
    return float(f"{value:.4g}")


def interval(cell: str) -> list[float]:
    return [float(v) for v in cell.strip("[]").split(",")]


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory: pytest.TempPathFactory) -> ntklens.store.Store:
    return write_planted_store(tmp_path_factory.mktemp("planted") / "store")


@pytest.fixture(scope="module")
def report(
    planted_store: ntklens.store.Store, tmp_path_factory: pytest.TempPathFactory
) -> ReportResult:
    return build_report(planted_store.path, tmp_path_factory.mktemp("report"), **REPORT_OPTIONS)


@pytest.fixture(scope="module")
def html(report: ReportResult) -> TableReader:
    return read_html(report.paths[0])


def test_every_figure_is_written_as_png_and_pdf(report: ReportResult) -> None:
    assert report.produced == [spec.id for spec in FIGURES]
    assert report.skipped == {}
    out = report.paths[0].parent
    for spec in FIGURES:
        png = (out / "figures" / f"{spec.filename}.png").read_bytes()
        pdf = (out / "figures" / f"{spec.filename}.pdf").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000, spec.id
        assert pdf.startswith(b"%PDF") and len(pdf) > 5_000, spec.id
        height, width, _ = matplotlib.image.imread(io.BytesIO(png)).shape
        assert width > 500 and height > 300, spec.id
    assert {p.name for p in report.paths} >= {"report.html", "summary.json"}
    assert all(p.is_file() for p in report.paths)


def test_html_embeds_every_figure_and_loads_nothing_external(
    report: ReportResult, html: TableReader
) -> None:
    out = report.paths[0].parent
    assert set(html.figures) == {spec.id for spec in FIGURES}
    for spec in FIGURES:
        src = html.figures[spec.id]
        assert src is not None and src.startswith("data:image/png;base64,"), spec.id
        embedded = base64.b64decode(src.removeprefix("data:image/png;base64,"))
        assert embedded == (out / "figures" / f"{spec.filename}.png").read_bytes(), spec.id
    assert html.external == [] and html.scripts == 0
    page = report.paths[0].read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(&#x27;lr too high&#x27;)&lt;/script&gt;" in page
    n_ok = len(PLANTED) * len(WIDTHS) * len(N_TRAINS) * len(SEEDS)
    assert f"{n_ok + 1} runs, {n_ok} ok, 1 failed" in page


def _fits(summary: dict[str, Any]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """Every power-law fit of the summary, keyed by (axis, family, group, quantity)."""
    fits = {}
    for axis in ("data", "width"):
        for family, groups in summary[f"{axis}_scaling"].items():
            for group, entries in groups.items():
                for quantity, entry in entries.items():
                    if isinstance(entry, dict) and "params" in entry:
                        fits[(axis, family, group, quantity)] = entry
    return fits


def test_summary_table_shows_every_fitted_number(report: ReportResult, html: TableReader) -> None:
    expected = _fits(report.summary)
    rows = {
        (a["axis"], a["family"], a["group"], a["quantity"]): cells
        for a, cells in html.tables["fits"]
    }
    assert len(expected) > 100 and rows.keys() == expected.keys()
    for key, fit in expected.items():
        cells = rows[key]
        assert float(cells["alpha"]) == shown(fit["params"]["alpha"]), key
        assert interval(cells["alpha-ci"]) == [shown(v) for v in fit["ci"]["alpha"]], key
        assert float(cells["a"]) == shown(fit["params"]["a"]), key
        assert float(cells["r2"]) == shown(fit["r2"]), key
        assert int(cells["n-points"]) == fit["n_points"], key
    transitions = {
        (a["family"], a["group"], a["method"]): cells
        for a, cells in html.tables["transitions"]
        if a["signal"] == "kernel_change"
    }
    for family, groups in report.summary["transition"].items():
        for group, entry in groups.items():
            for method in ("broken_power_law", "threshold"):
                w_star, cells = entry[method]["w_star"], transitions[(family, group, method)]
                if w_star is None:  # a break that failed its checks shows no number
                    assert cells["w-star"] == "—" and cells["note"] == entry[method]["reason"]
                else:
                    assert float(cells["w-star"]) == shown(w_star)
    comparison = {(a["family"], a["quantity"]): c for a, c in html.tables["comparisons"]}
    for family, quantities in report.summary["exponent_comparison"].items():
        for quantity, entry in quantities.items():
            assert float(comparison[(family, quantity)]["diff"]) == shown(entry["diff"])


def test_verdict_table_comes_first_and_renders_every_summary_verdict(
    report: ReportResult, html: TableReader
) -> None:
    """The page opens with the verdicts of summary.json; the planted exponent gap (0.30 vs
    0.20, beyond the 0.05 margin) is a contradiction of 'similar exponents'."""
    page = report.paths[0].read_text(encoding="utf-8")
    assert page.index('id="verdicts"') < page.index('id="figure-index"') < page.index("<figure")
    verdicts = report.summary["findings"]["verdicts"]
    rows = {(a["claim"], a["family"]): cells for a, cells in html.tables["verdict-table"]}
    assert len(rows) == len(verdicts)
    for entry in verdicts:
        cells = rows[(entry["claim"], entry["family"] or "—")]
        assert cells["verdict"] == entry["verdict"] and cells["reason"] == entry["reason"]
        assert cells["rule"] == entry["rule"] and cells["claim"] == entry["title"]
    gap = rows[("similar_exponents", "mlp/standard")]
    assert gap["verdict"] == "contradicted"
    value = report.summary["exponent_comparison"]["mlp/standard"]["test_loss"]["diff"]
    assert float(gap["value"]) == shown(value) and abs(value - 0.10) < 0.02
    assert html.tables["verdict-parts"]
    settings = page[page.index('id="verdicts"') : page.index('id="verdict-table"')]
    assert "4096, 12288" in settings and "threshold fraction" in settings


def test_json_format_writes_only_the_same_numbers(
    planted_store: ntklens.store.Store, report: ReportResult, tmp_path: Path
) -> None:
    result = build_report(planted_store, tmp_path / "json", fmt="json", summary=report.summary)
    assert result.paths == [tmp_path / "json" / "summary.json"]
    assert sorted(p.name for p in (tmp_path / "json").iterdir()) == ["summary.json"]
    loaded = json.loads(result.paths[0].read_text())
    assert loaded == json.loads(json.dumps(report.summary))
    assert json.loads((report.paths[0].parent / "summary.json").read_text()) == loaded


def test_write_json_turns_numpy_and_non_finite_numbers_into_plain_json(tmp_path: Path) -> None:
    summary = {"a": np.float64(0.5), "b": [np.int64(3), float("nan")], "c": {"d": np.inf}}
    path = write_json(summary, tmp_path / "s.json")
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [3, None], "c": {"d": None}}


@pytest.fixture(scope="module")
def planted_data(planted_store: ntklens.store.Store, report: ReportResult):
    observables = tuple(report.summary["settings"]["observables"])
    return study_data(
        planted_store.runs(), planted_store.records(), planted_store.spectra(), observables
    )


def _panel(figure, title: str, ylabel: str):
    (ax,) = [a for a in figure.axes if a.get_title() == title and a.get_ylabel() == ylabel]
    return ax


def test_loss_figure_draws_seed_means_and_the_summary_fits(planted_data, report) -> None:
    """Points are the seed means of the planted losses; each line is a·n^(−α) of its fit."""
    (spec,) = [s for s in FIGURES if s.id == "fig-loss-vs-data"]
    ax = _panel(spec.draw(planted_data, report.summary), "mlp/standard", "test loss")
    results = [planted_result("standard", 64, n, seed) for n in N_TRAINS for seed in SEEDS]
    final = [r.records.query("step == @STEPS[-1] and quantity == 'test_loss'") for r in results]
    means = pd.concat(final).assign(n=[r.spec.n_train for r in results])
    expected = means.groupby("n")["value"].mean()
    colors = {}
    for container in ax.containers:
        assert isinstance(container, ErrorbarContainer)
        x, y = container.lines[0].get_data()
        colors[tuple(container.lines[0].get_color())] = (np.asarray(x), np.asarray(y))
    fit = report.summary["data_scaling"]["mlp/standard"]["width=64"]["test_loss"]
    (line,) = [l for l in ax.get_lines() if l.get_label().startswith("w=64:")]
    assert line.get_label() == f"w=64: {fit_label(fit)}"
    x, y = colors[tuple(line.get_color())]
    np.testing.assert_allclose(x, expected.index)
    np.testing.assert_allclose(y, expected.to_numpy(), rtol=1e-12)
    slope = np.polyfit(np.log(line.get_xdata()), np.log(line.get_ydata()), 1)[0]
    assert slope == pytest.approx(-fit["params"]["alpha"], abs=1e-9)
    assert fit["params"]["alpha"] == pytest.approx(PLANTED["standard"][0], abs=0.02)


def test_kernel_change_figure_overlays_families_and_marks_only_checked_w_star(
    planted_data, report
) -> None:
    """One panel per n_train with every family's sweep; a w* line exactly where the summary
    identified the break, none where it did not; the LLM widths marked."""
    (spec,) = [s for s in FIGURES if s.id == "fig-kernel-change"]
    figure = spec.draw(planted_data, report.summary)
    transition = report.summary["transition"]
    for n_train in N_TRAINS:
        (ax,) = [a for a in figure.axes if a.get_title() == f"n={n_train}"]
        assert "Theta" in ax.get_ylabel()  # mathtext, not Unicode subscripts
        assert {c.get_label() for c in ax.containers} == {f"mlp/{p}" for p in PLANTED}
        marks = {l.get_label().split(":")[0]: l.get_xdata()[0] for l in ax.get_lines()
                 if "w^*" in l.get_label()}  # fmt: skip
        expected = {
            family: groups[f"n_train={n_train}"]["broken_power_law"]["w_star"]
            for family, groups in transition.items()
            if groups[f"n_train={n_train}"]["broken_power_law"]["identified"]
        }
        assert marks == pytest.approx(expected)
        llm = sorted(l.get_xdata()[0] for l in ax.get_lines() if "LLM width" in l.get_label())
        assert llm == [4096, 12288]
    assert any(
        not g["broken_power_law"]["identified"] for gs in transition.values() for g in gs.values()
    )  # fmt: skip  (the planted store has a rejected break)


def test_scaling_panels_show_one_sweep_and_only_fits_that_pass(
    planted_store: ntklens.store.Store, tmp_path: Path
) -> None:
    """Width-sweep runs at other n must not leak into the data-scaling panel as single points,
    and a fit below the R² threshold is not drawn."""
    store = ntklens.store.open(tmp_path / "store", create=True)
    for n_train, seed in itertools.product(N_TRAINS, SEEDS):  # a data sweep at w = 64
        store.write(planted_result("standard", 64, n_train, seed))
    for width, seed in itertools.product(WIDTHS, SEEDS):  # a width sweep at n = 200
        store.write(planted_result("standard", width, 200, seed))
    runs, records = store.runs(), store.records()
    data = study_data(runs, records, store.spectra(), ("entropy",))
    summary = build_report(store, tmp_path / "out", fmt="json", **REPORT_OPTIONS).summary
    (spec,) = [s for s in FIGURES if s.id == "fig-loss-vs-data"]
    ax = _panel(spec.draw(data, summary), "mlp/standard", "test loss")
    assert [c.lines[0].get_color() for c in ax.containers] and len(ax.containers) == 1
    x, _ = ax.containers[0].lines[0].get_data()
    np.testing.assert_allclose(x, N_TRAINS)
    assert any(l.get_label().startswith("w=64:") for l in ax.get_lines())
    strict = {**summary, "settings": {**summary["settings"], "min_r2": 0.9999999}}
    ax = _panel(spec.draw(data, strict), "mlp/standard", "test loss")
    assert not any(":" in l.get_label() for l in ax.get_lines())


def test_error_bars_are_bootstrap_intervals_of_the_seed_mean(planted_data, report) -> None:
    """With two seeds a replicate is one of the two runs: the bar spans exactly their range."""
    (spec,) = [s for s in FIGURES if s.id == "fig-loss-vs-width"]
    ax = _panel(spec.draw(planted_data, report.summary), "mlp/ntk", "test loss")
    runs = planted_data.runs
    rows = runs[(runs["family"] == "mlp/ntk") & (runs["n_train"] == 400)]
    low, high = rows.groupby("width")["test_loss"].min(), rows.groupby("width")["test_loss"].max()
    largest_n = tuple(matplotlib.colormaps["viridis"](0.85))  # the last of the n colours
    (container,) = [c for c in ax.containers if tuple(c.lines[0].get_color()) == largest_n]
    segments = container.lines[2][0].get_segments()
    np.testing.assert_allclose([seg[0][1] for seg in segments], low.to_numpy(), rtol=1e-12)
    np.testing.assert_allclose([seg[1][1] for seg in segments], high.to_numpy(), rtol=1e-12)


def test_training_curves_draw_one_line_per_run(planted_data, report) -> None:
    (spec,) = [s for s in FIGURES if s.id == "fig-training-curves"]
    figure = spec.draw(planted_data, report.summary)
    panels = [a for a in figure.axes if a.get_title() == "mlp/ntk, n=400"]
    assert len(panels) == 4  # train loss, test loss, kernel change, χ_pos
    runs_per_panel = len(WIDTHS) * len(SEEDS)
    for ax in panels:
        assert sum(len(l.get_xdata()) == len(STEPS) for l in ax.get_lines()) == runs_per_panel
    assert any("chi_{pos}" in a.get_ylabel() for a in panels)


def test_missing_or_empty_store_gives_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(NtkLensError, match="no such store") as missing:
        build_report(tmp_path / "nowhere", tmp_path / "out")
    empty = ntklens.store.open(tmp_path / "empty", create=True)
    with pytest.raises(NtkLensError, match="has no runs") as no_runs:
        build_report(empty, tmp_path / "out")
    spec = RunSpec(dataset="digits", n_train=100, width=8, steps=10)
    empty.write(RunResult(spec, spec.run_id, "failed", error="diverged at step 3\ntrace"))
    with pytest.raises(NtkLensError, match=r"none of the 1 runs finished.*diverged") as failed:
        build_report(empty, tmp_path / "out")
    for error in (missing, no_runs, failed):
        assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fmt": "pdf"}, "format must be one of"),
        ({"n_boot": 10}, r"unknown analysis options \['n_boot'\]"),
        ({"summary": {}, "n_bootstrap": 10}, "either a summary or analysis options"),
    ],
)
def test_bad_options_fail_before_reading_the_store(tmp_path: Path, options, message) -> None:
    with pytest.raises(NtkLensError, match=message):
        build_report(tmp_path / "nowhere", tmp_path / "out", **options)


def test_study_without_width_axis_notes_the_figures_it_cannot_draw(tmp_path: Path) -> None:
    store = ntklens.store.open(tmp_path / "store", create=True)
    for n_train, seed in itertools.product(N_TRAINS, SEEDS):
        store.write(planted_result("standard", 64, n_train, seed))
    stale = tmp_path / "out" / "figures" / "kernel-change.png"  # from an earlier report
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_MAGIC)
    result = build_report(store, tmp_path / "out", **REPORT_OPTIONS)
    no_width = {"fig-loss-vs-width", "fig-kernel-vs-width", "fig-kernel-change"}
    assert set(result.skipped) == no_width | {"fig-infinite-reference"}
    assert "sweep width" in result.skipped["fig-loss-vs-width"]
    assert "ntk-parameterized" in result.skipped["fig-infinite-reference"]
    assert set(result.produced) == {s.id for s in FIGURES} - set(result.skipped)
    page = read_html(result.paths[0])
    assert all(page.figures[i] is None for i in result.skipped)
    assert all(page.figures[i].startswith("data:image/png") for i in result.produced)
    text = result.paths[0].read_text(encoding="utf-8")
    assert f"Figures ({len(result.produced)} of {len(FIGURES)} drawn)" in text
    assert not stale.exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it)")
def test_report_opens_in_headless_chromium(report: ReportResult, tmp_path: Path) -> None:
    """No console errors; every figure in the DOM; the figures' colours in the screenshot."""
    shot = tmp_path / "shot.png"
    completed = subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--enable-logging=stderr", "--v=0", "--window-size=1400,3000", f"--screenshot={shot}",
         "--dump-dom", report.paths[0].as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    console = [l for l in completed.stderr.splitlines() if ":CONSOLE" in l or "Uncaught" in l]
    assert console == []
    dom = TableReader()
    dom.feed(completed.stdout)
    assert set(dom.figures) == {spec.id for spec in FIGURES}
    assert all(src.startswith("data:image/png;base64,") for src in dom.figures.values())
    verdicts = dom.tables["verdict-table"]
    assert len(verdicts) == len(report.summary["findings"]["verdicts"])
    assert {a["verdict"] for a, _ in verdicts} <= {"supported", "contradicted", "inconclusive"}
    # only plotted data has colormap colours (a broken image shows an icon and its alt text)
    rgb = np.rint(matplotlib.image.imread(shot)[..., :3] * 255).astype(np.int64)
    codes, counts = np.unique(
        (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2], return_counts=True
    )
    colours = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=1) / 255
    colormap = matplotlib.colormaps["viridis"](np.linspace(0.0, 1.0, 64))[:, :3]
    distance = np.linalg.norm(colours[:, None] - colormap[None], axis=-1).min(axis=1)
    assert counts[distance < 0.05].sum() > 2000


def test_variant_table_renders_each_variant_column(report: ReportResult, tmp_path: Path) -> None:
    """The claim × variant table of reproduce --variants: one column per variant that ran."""
    from ntklens.report.html import render_html

    table = {
        "variants": [
            {"name": "base", "axis": "—", "description": "as shipped", "status": "ran"},
            {"name": "cnn", "axis": "architecture", "description": "CNN", "status": "ran"},
            {"name": "centered", "axis": "centering", "description": "f − f₀",
             "status": "skipped: needs RunSpec field(s) center_output"},
        ],
        "claims": {"similar_exponents": "Similar exponents"},
        "rows": [{"claim": "similar_exponents", "scope": "ntk", "cells": {
            "base": {"verdict": "supported", "value": 0.01, "ci": [-0.02, 0.03]},
            "cnn": {"verdict": "contradicted", "value": 0.2, "ci": [0.15, 0.25]},
        }}],
    }  # fmt: skip
    runs = pd.DataFrame({"status": ["ok"]})
    page = render_html(store="s", runs=runs, figures=[], summary=report.summary, variants=table)
    path = tmp_path / "page.html"
    path.write_text(page, encoding="utf-8")
    ((attributes, cells),) = read_html(path).tables["variant-table"]
    assert attributes == {"claim": "similar_exponents", "family": "ntk"}
    assert cells["v-base"] == "supported (0.01 [-0.02, 0.03])"
    assert cells["v-cnn"] == "contradicted (0.2 [0.15, 0.25])"
    assert "v-centered" not in cells and "skipped: needs RunSpec field(s) center_output" in page
    assert page.index('id="verdicts"') < page.index('id="variants"')

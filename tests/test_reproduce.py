"""The one-command reproduction: its protocols, and the quick run end to end (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import ntklens.store
from ntklens.errors import ConfigError
from ntklens.reproduce import (
    SCALES,
    VARIANT_AXES,
    parse_variant,
    protocol,
    protocol_names,
    protocol_raw,
    variant_studies,
    variant_table,
    variants,
)
from ntklens.schema import RunSpec
from ntklens.sweep.planning import plan

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("scale", SCALES)
def test_protocol_sweeps_share_a_grid_point(scale: str) -> None:
    """Data and width sweeps meet at one run, so both axes are fitted in one family."""
    specs = [spec for study in protocol("fashion-mnist", scale) for spec in plan(study)]
    data = [s for s in specs if s.width == specs[0].width and s.parameterization == "ntk"]
    widths = {s.width for s in specs if s.parameterization == "ntk"}
    n_trains = {s.n_train for s in specs if s.parameterization == "ntk"}
    assert len(n_trains) >= 5 and len(widths) >= 5
    assert {"ntk", "mup"} <= {s.parameterization for s in specs}
    ids = [s.run_id for s in specs]
    shared = len(ids) - len(set(ids))
    assert shared >= 1, "the data sweep's width must sit on the width sweep's grid"
    assert data


@pytest.mark.parametrize(
    ("dataset", "scale", "message"),
    [("imagenet", "quick", "no reproduction protocol"), ("fashion-mnist", "huge", "unknown scale")],
)
def test_protocol_errors_name_the_choices(dataset: str, scale: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        protocol(dataset, scale)
    assert "\n" not in str(error.value)
    assert "fashion-mnist" in str(error.value) or "quick" in str(error.value)


def test_cli_rejects_unknown_dataset_with_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ntklens", "reproduce", "imagenet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert protocol_names() == ["fashion-mnist"]


@pytest.mark.slow
@pytest.mark.skipif(
    not FASHION_MNIST.is_dir(), reason="needs apt-get install dataset-fashion-mnist"
)
def test_quick_reproduction_end_to_end(tmp_path: Path) -> None:
    """`reproduce fashion-mnist --scale quick` completes; its JSON holds the paper's numbers."""
    out = tmp_path / "quick"
    done = subprocess.run(
        [
            sys.executable, "-m", "ntklens", "reproduce", "fashion-mnist",
            "--scale", "quick", "--out", str(out), "--workers", "2", "--quiet",
            "--format", "json",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    headline = json.loads(done.stdout)
    (ntk,) = [entry for family, entry in headline.items() if family.startswith("mlp/ntk")]

    def interval(entry: dict) -> tuple[float, float]:
        low, high = entry["ci"]
        assert math.isfinite(low) and math.isfinite(high) and low <= entry["alpha"] <= high
        return low, high

    assert ntk["data_exponent"] and ntk["width_exponent"]
    for entry in [*ntk["data_exponent"].values(), *ntk["width_exponent"].values()]:
        interval(entry)
    for axis in ("data", "width"):
        groups = ntk["kernel_directions"][axis]
        assert groups, f"no kernel directions under {axis} scaling"
        for group, trends in groups.items():
            key = "majority" if group == "overall" else "direction"
            for trend in trends.values():
                assert trend[key] in ("increases", "decreases", "flat")
    estimates = list(_find_estimates(headline))
    assert estimates, "no transition width estimated"
    assert any(
        e["w_star"] is not None and None not in e["ci"] and e["ci"][0] <= e["w_star"] <= e["ci"][1]
        for e in estimates
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["families"] and (out / "report.html").is_file()
    verdicts = summary["findings"]["verdicts"]
    assert {v["claim"] for v in verdicts} == set(summary["findings"]["claims"])
    for verdict in verdicts:
        assert verdict["verdict"] in ("supported", "contradicted", "inconclusive")
        assert verdict["rule"] and verdict["reason"]
        if verdict["statistic"] is not None:
            assert {"name", "value", "ci", "confidence"} <= set(verdict["statistic"])
    assert headline["verdicts"] == [
        {k: v[k] for k in ("claim", "family", "verdict", "reason", "statistic")} for v in verdicts
    ]


def _find_estimates(node: object):
    """Every transition estimate (a dict with "w_star") anywhere in a JSON tree."""
    if isinstance(node, dict):
        if "w_star" in node:
            yield node
        for value in node.values():
            yield from _find_estimates(value)


# ---- robustness variants --------------------------------------------------------------


def test_shipped_variants_parse_and_cover_the_protocol_alternatives() -> None:
    shipped = variants("fashion-mnist", "quick")
    assert [v.axis for v in shipped] == list(VARIANT_AXES)  # cheap first, architecture last
    base = protocol_raw("fashion-mnist", "quick")
    for variant in shipped:
        studies = variant_studies(base, variant)
        if isinstance(studies, str):  # skipped: the reason names what is missing
            assert "\n" not in studies and studies
            continue
        assert [s.name for s in studies] == [f"{raw['name']}--{variant.name}" for _, raw in base]


def test_a_variant_leaves_out_the_studies_it_skips() -> None:
    base = protocol_raw("fashion-mnist", "paper")
    (mnist,) = variants("fashion-mnist", "paper")
    names = [s.name for s in variant_studies(base, mnist)]
    kept = [raw["name"] for _, raw in base if not raw["name"].endswith("-width-cnn")]
    assert names == [f"{name}--mnist-subset" for name in kept]
    assert len(kept) == len(base) - 1
    with pytest.raises(ConfigError, match="skip must be a list"):
        parse_variant({"name": "v", "axis": "loss", "skip": "*", "override": [{"set": {}}]})


def test_variant_overrides_reach_every_run_and_only_the_matching_studies() -> None:
    base = protocol_raw("fashion-mnist", "quick")
    by_name = {v.name: v for v in variants("fashion-mnist", "quick")}
    cross_entropy = variant_studies(base, by_name["cross-entropy"])
    assert {spec.loss for study in cross_entropy for spec in plan(study)} == {"cross_entropy"}
    cnn = {s.name: s for s in variant_studies(base, by_name["cnn"])}
    assert {spec.model for s in cnn.values() for spec in plan(s)} == {"cnn"}
    assert cnn["fmnist-quick-data--cnn"].sweep.widths == [8]
    assert cnn["fmnist-quick-width-ntk--cnn"].sweep.widths == [2, 4, 8, 16, 32]
    # the data sweep's width stays on the width sweeps' grid: one family, both axes
    assert 8 in cnn["fmnist-quick-width-ntk--cnn"].sweep.widths
    # the base configs are untouched by the overrides
    assert protocol("fashion-mnist", "quick")[0].model.family == "mlp"


def test_variants_needing_missing_options_are_skipped_with_the_reason() -> None:
    base = protocol_raw("fashion-mnist", "quick")
    by_name = {v.name: v for v in variants("fashion-mnist", "quick")}
    uncentered = variant_studies(base, by_name["uncentered"])
    if "center_output" in RunSpec.model_fields:
        assert not isinstance(uncentered, str)
        assert {spec.center_output for s in uncentered for spec in plan(s)} == {False}
    else:
        assert isinstance(uncentered, str) and "center_output" in uncentered
    unknown = parse_variant(
        {"name": "x", "axis": "dataset", "override": [{"set": {"data": {"dataset": "nope"}}}]}
    )
    reason = variant_studies(base, unknown)
    assert isinstance(reason, str) and "data.dataset" in reason and "nope" in reason


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "a", "axis": "colour", "override": [{"set": {}}]}, "axis must be one of"),
        ({"name": "base", "axis": "loss", "override": [{"set": {}}]}, "other than 'base'"),
        ({"name": "a", "axis": "loss"}, "at least one"),
        ({"name": "a", "axis": "loss", "override": [{"sets": {}}]}, "needs a `set` table"),
        ({"name": "a", "axis": "loss", "override": [{"set": {}}], "extra": 1}, "unknown keys"),
    ],
)
def test_bad_variant_files_give_one_line_errors(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        parse_variant(raw, "v.toml")
    assert "\n" not in str(error.value)


def _summary_with(verdicts: list[tuple[str, str | None, str, float | None]]) -> dict:
    rows = [
        {"claim": c, "family": f, "verdict": v, "reason": "r",
         "statistic": {"name": "s", "value": x, "ci": [None, None]}}
        for c, f, v, x in verdicts
    ]  # fmt: skip
    return {"findings": {"claims": {"similar_exponents": "Similar"}, "verdicts": rows}}


def test_variant_table_lines_up_claims_by_parameterization_scope() -> None:
    chosen = [parse_variant({"name": "cnn", "axis": "architecture",
                             "override": [{"set": {"model": {"family": "cnn"}}}]}),
              parse_variant({"name": "centered", "axis": "centering", "requires": ["nope"],
                             "override": [{"set": {}}]})]  # fmt: skip
    fades = ("feature_learning_fades", "mlp/ntk vs mlp/mup", "supported", -0.4)
    summaries = {
        "base": _summary_with([("similar_exponents", "mlp/ntk", "supported", 0.01), fades]),
        "cnn": _summary_with([("similar_exponents", "cnn/ntk", "contradicted", 0.2)]),
    }
    table = variant_table(summaries, chosen, {"cnn": "ran", "centered": "skipped: needs nope"})
    rows = {(r["claim"], r["scope"]): r["cells"] for r in table["rows"]}
    assert rows[("similar_exponents", "ntk")]["base"]["verdict"] == "supported"
    assert rows[("similar_exponents", "ntk")]["cnn"]["verdict"] == "contradicted"
    assert rows[("similar_exponents", "ntk")]["cnn"]["value"] == 0.2
    assert set(rows[("feature_learning_fades", "ntk vs mup")]) == {"base"}
    status = {v["name"]: v["status"] for v in table["variants"]}
    assert status == {"base": "ran", "cnn": "ran", "centered": "skipped: needs nope"}


def test_variant_table_keeps_two_models_of_one_store_apart() -> None:
    """An MLP and a CNN study in one store: their verdicts on one claim are two rows."""
    both = _summary_with(
        [("max_width", "mlp/ntk", "inconclusive", None), ("max_width", "cnn/ntk", "supported", 8.0)]
    )
    table = variant_table({"base": both}, [], {})
    rows = {(r["claim"], r["scope"]): r["cells"]["base"]["verdict"] for r in table["rows"]}
    assert rows == {("max_width", "mlp/ntk"): "inconclusive", ("max_width", "cnn/ntk"): "supported"}


TINY_STUDY = {
    "name": "tiny-width",
    "data": {"dataset": "teacher", "n_test": 64, "teacher": {"input_dim": 8}},
    "probe": {"n": 8, "points_per_decade": 1},
    "model": {"family": "mlp", "depth": 1},
    "train": {"lr": 0.5, "loss": "mse", "steps": 10, "batch_size": 32},
    "sweep": {"widths": [8, 16, 32], "n_train": [64], "seeds": [0], "parameterizations": ["ntk"]},
}


@pytest.mark.slow
def test_run_variants_end_to_end_on_a_tiny_teacher_sweep(tmp_path: Path) -> None:
    """Base and one variant run, one variant is skipped; the table has both columns."""
    from ntklens.report import build_report
    from ntklens.reproduce import run_variants
    from ntklens.sweep.config import validate_config
    from ntklens.sweep.driver import run_sweep

    base = [("tiny.toml", TINY_STUDY)]
    run_sweep(validate_config(TINY_STUDY), tmp_path / "store", workers=1)
    options = {"n_bootstrap": 50}
    summary = build_report(tmp_path / "store", tmp_path, fmt="json", **options).summary
    chosen = [
        parse_variant({"name": "ce", "axis": "loss",
                       "override": [{"set": {"train": {"loss": "cross_entropy"}}}]}),
        parse_variant({"name": "centered", "axis": "centering", "requires": ["no_such_field"],
                       "override": [{"set": {}}]}),
    ]  # fmt: skip
    table = run_variants(base, chosen, summary, tmp_path, workers=1, quiet=True,
                         analysis_options=options)  # fmt: skip
    status = {v["name"]: v["status"] for v in table["variants"]}
    assert status["ce"] == "ran" and status["centered"].startswith("skipped: needs RunSpec")
    assert (tmp_path / "variants" / "ce" / "summary.json").is_file()
    for row in table["rows"]:
        assert set(row["cells"]) == {"base", "ce"}
        assert all(c["verdict"] in ("supported", "contradicted", "inconclusive")
                   for c in row["cells"].values())  # fmt: skip
    ce_store = ntklens.store.open(tmp_path / "variants" / "ce" / "store")
    assert set(ce_store.runs()["loss"]) == {"cross_entropy"}


@pytest.mark.slow
def test_reproduce_with_variants_writes_the_table_and_shows_it_in_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reproduce(..., with_variants=True) on a tiny teacher protocol: variants.json, the
    report's variant table and the verdicts of summary.json."""
    import ntklens.reproduce as reproduction
    from ntklens.sweep.config import validate_config

    tiny = [("tiny.toml", TINY_STUDY)]
    ce = parse_variant({"name": "ce", "axis": "loss",
                        "override": [{"set": {"train": {"loss": "cross_entropy"}}}]})  # fmt: skip
    monkeypatch.setattr(reproduction, "protocol_raw", lambda dataset, scale: tiny)
    monkeypatch.setattr(reproduction, "protocol", lambda d, s: [validate_config(TINY_STUDY)])
    monkeypatch.setattr(reproduction, "variants", lambda dataset, scale: [ce])
    result = reproduction.reproduce(
        "fashion-mnist", "quick", tmp_path, workers=1, quiet=True, with_variants=True,
        n_bootstrap=50, llm_widths=(1024,),
    )  # fmt: skip
    table = json.loads(result.variants_json.read_text())
    assert [v["name"] for v in table["variants"]] == ["base", "ce"]
    page = result.report.read_text(encoding="utf-8")
    assert 'id="variant-table"' in page and page.index('id="verdicts"') < page.index(
        "variant-table"
    )
    summary = json.loads(result.summary_json.read_text())
    assert summary["findings"]["settings"]["llm_widths"] == [1024]
    assert result.headline["verdicts"]

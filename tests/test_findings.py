"""Verdicts of analysis.findings on planted studies: each rule gives the verdict planted.

Every study is built here as the store's ``runs`` and ``records`` tables from closed-form
laws with multiplicative seed noise, so the right verdict is known before the analysis.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from ntklens.analysis import summarize
from ntklens.analysis.findings import VERDICTS, advantage_by_width
from ntklens.errors import NtkLensError
from ntklens.schema import RunSpec

WIDTHS = (16, 32, 64, 128, 256, 512, 1024)
SIZES = (250, 500, 1000, 2000, 4000)
SEEDS = (0, 1, 2)
DATA_WIDTH, WIDTH_N = 256, 1000  # the data sweep's width, the width sweep's n_train
NOISE = 0.03
LAST = 100
OPTIONS = {"n_bootstrap": 200, "observables": ("entropy",)}

Law = Callable[[float, float], float]  # (width, n_train) -> value


def broken(w_star: float) -> Law:
    """Kernel change with a break at ``w_star``: slope −0.05 below, −1 above (s = 0.5)."""

    def law(width: float, n_train: float) -> float:
        ratio = width / w_star
        return 0.6 * ratio**-0.05 * (1 + ratio**2) ** (-0.95 / 2)

    return law


def flat(width: float, n_train: float) -> float:
    """A μP-like kernel change: the same at every width."""
    return 0.3


def study(
    laws: dict[str, dict[str, Law]],
    *,
    widths: tuple[int, ...] = WIDTHS,
    sizes: tuple[int, ...] = SIZES,
    data_widths: tuple[int, ...] = (DATA_WIDTH,),
    seeds: tuple[int, ...] = SEEDS,
    noise: float = NOISE,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A data sweep at each of ``data_widths`` and a width sweep at WIDTH_N, per family.

    ``laws[parameterization]`` maps a recorded quantity (``test_loss``, ``kernel0_test_loss``,
    ``ntk_change``, ``entropy_change``) to its noise-free law; missing ones are not recorded.
    """
    rng = np.random.default_rng(seed)
    points = {(w, n) for w in data_widths for n in sizes} | {(w, WIDTH_N) for w in widths}
    runs, records = [], []
    for param, family_laws in laws.items():
        for (width, n_train), replicate in ((p, s) for p in sorted(points) for s in seeds):
            spec = RunSpec(n_train=n_train, width=width, seed=replicate, parameterization=param)
            runs.append({**spec.model_dump(), "run_id": spec.run_id, "status": "ok"})

            def value(
                quantity: str, width=width, n_train=n_train, family_laws=family_laws
            ) -> float:
                law = family_laws[quantity]
                return law(width, n_train) * float(np.exp(noise * rng.standard_normal()))

            end = {q: value(q) for q in ("test_loss", "kernel0_test_loss") if q in family_laws}
            if "ntk_change" in family_laws:
                end["ntk_change"] = value("ntk_change")
            rows = [(spec.run_id, 0, "ntk_entropy", 2.0)]
            if "entropy_change" in family_laws:
                rows.append((spec.run_id, LAST, "ntk_entropy", 2.0 + value("entropy_change")))
            rows += [(spec.run_id, LAST, q, v) for q, v in end.items()]
            records += rows
    return pd.DataFrame(runs), pd.DataFrame(
        records, columns=["run_id", "step", "quantity", "value"]
    )


def verdict_rows(summary: dict, claim: str) -> dict[str | None, dict]:
    """The rows of one claim, keyed by family."""
    rows = [r for r in summary["findings"]["verdicts"] if r["claim"] == claim]
    assert rows, claim
    return {r["family"]: r for r in rows}


def power(scale: float, p_n: float, p_w: float) -> Law:
    return lambda width, n_train: scale * n_train**p_n * width**p_w


@pytest.mark.parametrize(("alpha_width", "verdict"), [(0.3, "supported"), (0.1, "contradicted")])
def test_planted_exponents_give_equivalence_or_difference(alpha_width: float, verdict: str) -> None:
    laws = {"ntk": {"test_loss": power(3.0, -0.3, -alpha_width)}}
    summary = summarize(*study(laws), **OPTIONS)
    row = verdict_rows(summary, "similar_exponents")["mlp/ntk"]
    assert row["verdict"] == verdict, row["reason"]
    assert row["statistic"]["value"] == pytest.approx(0.3 - alpha_width, abs=0.03)
    assert row["statistic"]["confidence"] == pytest.approx(0.90)
    assert "(−0.05, 0.05)" in row["rule"]


def test_an_exponent_whose_fit_fails_its_checks_is_not_compared() -> None:
    """A loss that rises with width (α < 0) is no basis for 'similar exponents'."""
    laws = {"ntk": {"test_loss": power(3.0, -0.3, 0.2)}}
    row = verdict_rows(summarize(*study(laws), **OPTIONS), "similar_exponents")["mlp/ntk"]
    assert row["verdict"] == "inconclusive"
    assert "≤ 0" in row["reason"] and "does not fall" in row["reason"]


def test_a_wide_margin_turns_a_small_gap_into_equivalence() -> None:
    laws = {"ntk": {"test_loss": power(3.0, -0.3, -0.2)}}
    tables = study(laws)
    strict = verdict_rows(summarize(*tables, **OPTIONS), "similar_exponents")["mlp/ntk"]
    loose = verdict_rows(summarize(*tables, margin=0.2, **OPTIONS), "similar_exponents")
    assert strict["verdict"] == "contradicted"
    assert loose["mlp/ntk"]["verdict"] == "supported"
    assert "(−0.2, 0.2)" in loose["mlp/ntk"]["rule"]


@pytest.mark.parametrize(
    ("width_power", "verdict"), [(-0.4, "supported"), (0.3, "contradicted"), (0.0, "inconclusive")]
)
def test_planted_kernel_trends_give_the_opposite_dynamics_verdict(
    width_power: float, verdict: str
) -> None:
    """The entropy change rises with data; with width it falls, rises or stays flat."""
    laws = {
        "ntk": {
            "test_loss": power(3.0, -0.3, -0.3),
            "entropy_change": power(0.05, 0.3, width_power),
        }
    }
    row = verdict_rows(summarize(*study(laws), **OPTIONS), "opposite_kernel_dynamics")["mlp/ntk"]
    assert row["verdict"] == verdict, row["reason"]
    (part,) = [p for p in row["parts"] if p["part"] == "entropy/change"]
    assert part["verdict"] == verdict
    assert part["statistic"]["data"]["ci"][0] > 0  # rises with data in every case


@pytest.fixture(scope="module")
def break_study() -> dict:
    """NTK: kernel change broken at w* = 128; μP: flat. Advantage fades by w = 256 under NTK."""

    def ntk_kernel0(width: float, n_train: float) -> float:
        return 0.5 * (1 + 0.5 * max(0.0, 1 - np.log2(width / 16) / 4))  # 0 gap from w = 256

    laws = {
        "ntk": {
            "test_loss": lambda w, n: 0.5 * (n / WIDTH_N) ** -0.3,
            "kernel0_test_loss": lambda w, n: ntk_kernel0(w, n) * (n / WIDTH_N) ** -0.3,
            "ntk_change": broken(128.0),
        },
        "mup": {
            "test_loss": lambda w, n: 0.4 * (n / WIDTH_N) ** -0.3,
            "kernel0_test_loss": lambda w, n: 0.8 * (n / WIDTH_N) ** -0.1,
            "ntk_change": flat,
        },
    }
    return summarize(*study(laws, noise=0.02), **OPTIONS)


def test_planted_break_is_located_within_its_ci(break_study: dict) -> None:
    row = verdict_rows(break_study, "max_feature_learning_width")["mlp/ntk"]
    assert row["verdict"] == "supported", row["reason"]
    (bpl,) = [p for p in row["parts"] if p["part"].startswith("kernel-change break")]
    assert bpl["identified"] and all(bpl["checks"].values())
    assert bpl["ci"][0] <= 128.0 <= bpl["ci"][1] and bpl["ci"][0] > 16 and bpl["ci"][1] < 1024
    assert bpl["llm_ratio"] == {"4096": pytest.approx(bpl["w_star"] / 4096),
                                "12288": pytest.approx(bpl["w_star"] / 12288)}  # fmt: skip
    (advantage,) = [p for p in row["parts"] if p["part"].startswith("loss advantage")]
    # the planted gap is 0.25·(1 − log2(w/16)/4): positive up to w = 128, zero from w = 256
    assert advantage["identified"] and advantage["bracket"] == [128, 256]


def test_flat_mup_curve_gives_not_identified_and_no_number(break_study: dict) -> None:
    row = verdict_rows(break_study, "max_feature_learning_width")["mlp/mup"]
    assert row["verdict"] == "inconclusive"
    assert row["reason"].startswith("not identified within [16, 1024]")
    assert row["statistic"]["value"] is None
    estimate = break_study["transition"]["mlp/mup"][f"n_train={WIDTH_N}"]["broken_power_law"]
    assert estimate["w_star"] is None and estimate["ci"] == [None, None]
    assert not estimate["identified"] and "not identified within [16, 1024]" in estimate["reason"]
    assert "w_star" not in json.dumps([p for p in row["parts"] if p.get("identified")])


def test_fading_under_ntk_and_not_under_mup_is_supported(break_study: dict) -> None:
    (row,) = verdict_rows(break_study, "feature_learning_fades").values()
    assert row["family"] == "mlp/ntk vs mlp/mup"
    assert row["verdict"] == "supported", row["reason"]
    assert row["statistic"]["ci"][1] < 0


def test_fading_is_contradicted_when_the_ntk_change_does_not_fall() -> None:
    laws = {"ntk": {"ntk_change": flat}, "mup": {"ntk_change": flat}}
    runs, records = study(laws, sizes=(1000,))
    (row,) = verdict_rows(summarize(runs, records, **OPTIONS), "feature_learning_fades").values()
    assert row["verdict"] in ("inconclusive", "contradicted")
    rising = {"ntk": {"ntk_change": lambda w, n: 0.01 * w**0.3}, "mup": {"ntk_change": flat}}
    (row,) = verdict_rows(
        summarize(*study(rising, sizes=(1000,)), **OPTIONS), "feature_learning_fades"
    ).values()
    assert row["verdict"] == "contradicted"


def test_a_pure_power_law_has_no_break() -> None:
    laws = {"ntk": {"ntk_change": lambda w, n: 2.0 * w**-0.5}}
    summary = summarize(*study(laws, sizes=(1000,)), **OPTIONS)
    estimate = summary["transition"]["mlp/ntk"][f"n_train={WIDTH_N}"]["broken_power_law"]
    assert not estimate["identified"] and estimate["w_star"] is None
    assert estimate["details"]["delta_bic"] < 10
    assert "ΔBIC" in estimate["reason"]
    row = verdict_rows(summary, "max_feature_learning_width")["mlp/ntk"]
    assert row["verdict"] == "inconclusive" and row["statistic"]["value"] is None


def test_three_width_toy_sweep_never_reports_a_width() -> None:
    laws = {"ntk": {"ntk_change": broken(50.0), "test_loss": power(1.0, 0, -0.1),
                    "kernel0_test_loss": power(1.2, 0, -0.1)}}  # fmt: skip
    summary = summarize(
        *study(laws, widths=(32, 64, 128), sizes=(1000,), data_widths=(64,)), **OPTIONS
    )
    row = verdict_rows(summary, "max_feature_learning_width")["mlp/ntk"]
    assert row["verdict"] == "inconclusive" and row["statistic"]["value"] is None
    assert row["reason"].startswith("not identified within [32, 128]")
    assert "at least 5 distinct widths" in row["reason"]


def test_kernel_and_feature_driven_widths_meet_where_planted() -> None:
    """Below w = 256 the network's data exponent is 0.4 against its kernel's 0.2; from 256 on
    both are 0.3."""

    def network(width: float, n_train: float) -> float:
        return n_train ** (-0.4 if width < 256 else -0.3)

    def kernel0(width: float, n_train: float) -> float:
        return 1.3 * n_train ** (-0.2 if width < 256 else -0.3)

    laws = {"ntk": {"test_loss": network, "kernel0_test_loss": kernel0}}
    tables = study(laws, data_widths=(64, 128, 256, 512), widths=(64, 128, 256, 512), noise=0.01)
    row = verdict_rows(summarize(*tables, **OPTIONS), "kernel_vs_feature_scaling")["mlp/ntk"]
    assert row["verdict"] == "supported", row["reason"]
    assert row["statistic"]["value"] == 256
    assert [p["scaling"] for p in row["parts"]] == [
        "feature-driven", "feature-driven", "kernel-driven", "kernel-driven"
    ]  # fmt: skip


def test_one_data_width_cannot_locate_the_meeting_width() -> None:
    laws = {"ntk": {"test_loss": power(1.0, -0.3, 0), "kernel0_test_loss": power(1.0, -0.3, 0)}}
    row = verdict_rows(summarize(*study(laws), **OPTIONS), "kernel_vs_feature_scaling")["mlp/ntk"]
    assert row["verdict"] == "inconclusive" and row["reason"].startswith("needs data sweeps")


def test_missing_axes_give_inconclusive_needs_not_errors() -> None:
    """A data sweep alone, without kernel baselines or kernel change: every claim that needs
    a width axis or a baseline says what it needs."""
    laws = {"ntk": {"test_loss": power(1.0, -0.3, 0)}}
    runs, records = study(laws, widths=(DATA_WIDTH,))
    summary = summarize(runs, records, **OPTIONS)
    json.dumps(summary, allow_nan=False)
    for claim in (
        "similar_exponents",
        "feature_learning_fades",
        "max_feature_learning_width",
        "kernel_vs_feature_scaling",
    ):
        (row,) = verdict_rows(summary, claim).values()
        assert row["verdict"] == "inconclusive", claim
        assert row["reason"].startswith("needs "), (claim, row["reason"])
        assert row["statistic"] is None
    assert {r["verdict"] for r in summary["findings"]["verdicts"]} <= set(VERDICTS)


@pytest.mark.parametrize("step", [0, LAST])  # training runs record n_params at step 0
def test_parameter_count_comparison_where_runs_record_it(step: int) -> None:
    """With n_params = w² (a deep-MLP count) the width exponent halves against parameters."""
    laws = {"ntk": {"test_loss": power(3.0, -0.3, -0.6)}}
    runs, records = study(laws)
    widths = runs.set_index("run_id")["width"]
    extra = pd.DataFrame(
        {"run_id": widths.index, "step": step, "quantity": "n_params",
         "value": widths.to_numpy(np.float64) ** 2}
    )  # fmt: skip
    row = verdict_rows(
        summarize(runs, pd.concat([records, extra]), **OPTIONS), "similar_exponents"
    )["mlp/ntk"]
    assert row["verdict"] == "contradicted"  # 0.3 vs 0.6 against width
    (params,) = [p for p in row["parts"] if p["part"] == "vs parameters"]
    assert params["verdict"] == "supported", params["reason"]
    assert params["alpha_params"]["alpha"] == pytest.approx(0.3, abs=0.02)


def test_parameter_count_comparison_without_n_params_says_what_it_needs() -> None:
    laws = {"ntk": {"test_loss": power(3.0, -0.3, -0.6)}}
    row = verdict_rows(summarize(*study(laws), **OPTIONS), "similar_exponents")["mlp/ntk"]
    (params,) = [p for p in row["parts"] if p["part"] == "vs parameters"]
    assert params["verdict"] == "inconclusive" and "n_params" in params["reason"]
    assert "statistic" not in params


def test_advantage_by_width_matches_the_seed_means() -> None:
    widths = np.repeat([16.0, 32.0, 64.0], 3)
    advantage = np.array([1.0, 2.0, 3.0, 0.0, 0.1, -0.1, 5.0, 5.0, 5.0])
    table = advantage_by_width(widths, advantage, n_bootstrap=100, confidence=0.95, seed=0)
    np.testing.assert_allclose(table["mean"], [2.0, 0.0, 5.0])
    # replicates are means of 2 draws from {1, 2, 3}: the interval lies within [1, 3]
    assert 1.0 <= table["low"].iloc[0] < 2.0 < table["high"].iloc[0] <= 3.0
    assert table["low"].iloc[2] == table["high"].iloc[2] == 5.0


@pytest.mark.parametrize(("option", "value"), [("margin", 0.0), ("min_r2", 1.0)])
def test_bad_decision_settings_fail_in_one_line(option: str, value: float) -> None:
    laws = {"ntk": {"test_loss": power(1.0, -0.3, 0)}}
    with pytest.raises(NtkLensError, match=option) as error:
        summarize(*study(laws, widths=(DATA_WIDTH,)), **{option: value}, **OPTIONS)
    assert "\n" not in str(error.value)


def test_claims_use_the_fullest_width_sweep_not_a_thin_grid_at_larger_n() -> None:
    """Data sweeps at three widths leave 3-width 'sweeps' at every n up to 4000; the break
    must be read off the 7-width sweep at n = 1000, not the 3 widths at n = 4000."""
    laws = {"ntk": {"ntk_change": broken(128.0), "test_loss": power(3.0, -0.3, -0.3)}}
    summary = summarize(*study(laws, data_widths=(64, 256, 1024), noise=0.02), **OPTIONS)
    row = verdict_rows(summary, "max_feature_learning_width")["mlp/ntk"]
    assert row["verdict"] == "supported", row["reason"]
    assert f"n_train={WIDTH_N}" in row["statistic"]["name"]
    similar = verdict_rows(summary, "similar_exponents")["mlp/ntk"]
    assert f"α_width (n_train={WIDTH_N})" in similar["statistic"]["name"]
    assert "α_data (width=1024)" in similar["statistic"]["name"]  # 5 sizes each: the widest

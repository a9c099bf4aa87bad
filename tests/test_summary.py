"""summarize(): planted exponents, directions and transition widths come back out."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ntklens.analysis import summarize
from ntklens.errors import NtkLensError
from ntklens.schema import RunSpec

WIDTHS = (32, 64, 128, 256, 512, 1024)
SIZES = (250, 500, 1000, 2000, 4000)
SEEDS = (0, 1, 2)
W_STAR = 200.0
NOISE = 0.03
LAST_STEP = 100

# Each planted quantity is C · n^p · w^q, so its data exponent is −p and width exponent −q.
# family → (network test-loss exponent in n, step-0 kernel regression's exponent in n)
DATA_EXPONENTS = {"ntk": (0.3, 0.3), "mup": (0.3, 0.1)}
PLANTED = {  # quantity: (C, p, q)
    "test_loss": (2.0, -0.3, -0.1),
    "test_error": (0.5, -0.2, -0.05),
    "entropy/change": (0.5, 0.2, -0.3),
    "trace/change": (-2.0, 0.1, -0.5),
    "effective_rank/change": (5.0, 0.3, -0.4),
    "alignment/change": (0.05, 0.25, -0.5),
}
INIT = {  # observable: (C, q) of its step-0 value C · w^q
    "entropy": (3.0, 0.05),
    "trace": (10.0, 0.0),
    "effective_rank": (20.0, 0.1),
    "alignment": (0.1, 0.0),
}


def kernel_change(width: float, n_train: float) -> float:
    """A smoothly broken power law in width with its break at W_STAR, times n^0.1."""
    ratio = width / W_STAR
    return 0.6 * ratio**-0.05 * (1 + ratio**2) ** (-(1.0 - 0.05) / 2) * n_train**0.1


def synthetic_study(rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs and records of a width × size × seed sweep for two parameterizations."""
    runs, records = [], []
    for param, (net_alpha, kernel_alpha) in DATA_EXPONENTS.items():
        for width in WIDTHS:
            for n_train in SIZES:
                for seed in SEEDS:
                    spec = RunSpec(n_train=n_train, width=width, seed=seed, parameterization=param)
                    bookkeeping = {  # differs per run; must not split families
                        "run_id": spec.run_id,
                        "status": "ok",
                        "wall_time_s": float(rng.uniform(1, 2)),
                        "finished_at": pd.Timestamp("2026-01-01") + pd.Timedelta(len(runs), "s"),
                    }
                    runs.append({**spec.model_dump(), **bookkeeping})
                    records += run_records(
                        rng, spec.run_id, width, n_train, net_alpha, kernel_alpha
                    )
    # a failed run whose absurd numbers must not leak into any fit
    spec = RunSpec(n_train=1000, width=128, seed=99, parameterization="ntk")
    runs.append({**spec.model_dump(), "run_id": spec.run_id, "status": "failed"})
    records += [(spec.run_id, LAST_STEP, "test_loss", 1e6), (spec.run_id, 0, "ntk_trace", -5.0)]
    columns = ["run_id", "step", "quantity", "value"]
    return pd.DataFrame(runs), pd.DataFrame(records, columns=columns)


def run_records(
    rng: np.random.Generator,
    run_id: str,
    width: int,
    n_train: int,
    net_alpha: float,
    kernel_alpha: float,
) -> list[tuple[str, int, str, float]]:
    def noisy(value: float) -> float:
        return value * float(np.exp(NOISE * rng.standard_normal()))

    def planted(quantity: str) -> float:
        scale, p, q = PLANTED[quantity]
        return noisy(scale * n_train**p * width**q)

    test_loss = noisy(2.0 * n_train**-net_alpha * width**-0.1)
    end = {
        "test_loss": test_loss,
        "test_acc": 1.0 - planted("test_error"),
        "kernel0_test_loss": noisy(2.0 * n_train**-kernel_alpha),
        "kernel0_test_acc": 1.0 - noisy(0.6 * n_train**-0.15),
        "ntk_change": noisy(kernel_change(width, n_train)),
    }
    init = {"test_loss": 2.5, "test_acc": 0.1, "ntk_change": 0.0}
    for key, (scale, q) in INIT.items():
        init[f"ntk_{key}"] = noisy(scale * width**q)
        end[f"ntk_{key}"] = init[f"ntk_{key}"] + planted(f"{key}/change")
    rows = [(run_id, 0, k, v) for k, v in init.items()]
    # an intermediate probe with the step-0 values: "end" must mean the last step
    rows += [(run_id, LAST_STEP // 2, k, v) for k, v in init.items()]
    rows += [(run_id, LAST_STEP, k, v) for k, v in end.items()]
    return rows


@pytest.fixture(scope="module")
def study() -> tuple[pd.DataFrame, pd.DataFrame]:
    return synthetic_study(np.random.default_rng(0))


@pytest.fixture(scope="module")
def summary(study) -> dict:
    runs, records = study
    return summarize(runs, records, n_bootstrap=200, seed=0)


def test_summary_is_json_with_all_sections(summary: dict) -> None:
    decoded = json.loads(json.dumps(summary, allow_nan=False))
    for section in (
        "data_scaling",
        "width_scaling",
        "exponent_comparison",
        "transition",
        "kernel_vs_network_data_exponent",
    ):
        assert set(decoded[section]) == {"mlp/ntk", "mlp/mup"}, section
    for axis in ("data", "width"):
        assert set(decoded["kernel_directions"][axis]) == {"mlp/ntk", "mlp/mup"}
    assert decoded["families"]["mlp/ntk"]["n_runs"] == len(WIDTHS) * len(SIZES) * len(SEEDS)


def test_planted_exponents_are_recovered_within_ci(summary: dict) -> None:
    hits, total = 0, 0
    for family, (net_alpha, _) in DATA_EXPONENTS.items():
        for axis, groups, index in (("data_scaling", WIDTHS, 1), ("width_scaling", SIZES, 2)):
            for group in groups:
                key = f"width={group}" if axis == "data_scaling" else f"n_train={group}"
                fits = summary[axis][f"mlp/{family}"][key]
                for quantity, planted in PLANTED.items():
                    truth = -planted[index]
                    if quantity == "test_loss" and axis == "data_scaling":
                        truth = net_alpha
                    fit = fits[quantity]
                    low, high = fit["ci"]["alpha"]
                    assert abs(fit["params"]["alpha"] - truth) < 0.1, (family, key, quantity)
                    hits += low <= truth <= high
                    total += 1
    assert hits / total >= 0.85


def test_signed_changes_are_fitted_by_magnitude(summary: dict) -> None:
    trace = summary["data_scaling"]["mlp/ntk"]["width=64"]["trace/change"]
    entropy = summary["data_scaling"]["mlp/ntk"]["width=64"]["entropy/change"]
    assert (trace["sign"], entropy["sign"]) == ("negative", "positive")
    # the initial trace does not depend on n: flat along data, no power-law exponent
    flat = summary["kernel_directions"]["data"]["mlp/ntk"]["width=64"]["trace/init"]
    assert flat["direction"] == "flat"


def test_kernel_directions_oppose_between_data_and_width(summary: dict) -> None:
    directions = summary["kernel_directions"]
    for family in ("mlp/ntk", "mlp/mup"):
        data, width = directions["data"][family]["overall"], directions["width"][family]["overall"]
        assert data["entropy/change"]["majority"] == "increases"
        assert width["entropy/change"]["majority"] == "decreases"
        assert data["trace/change"]["majority"] == "decreases"  # more negative with n
        assert width["trace/change"]["majority"] == "increases"  # toward zero with w
        assert width["kernel_change"] == {
            "increases": 0,
            "decreases": len(SIZES),
            "flat": 0,
            "majority": "decreases",
        }


def test_exponent_comparison_recovers_planted_gap(summary: dict) -> None:
    comparison = summary["exponent_comparison"]["mlp/ntk"]["test_loss"]
    assert comparison["data"]["group"] == f"width={max(WIDTHS)}"
    assert comparison["width"]["group"] == f"n_train={max(SIZES)}"
    assert comparison["ci"][0] < 0.3 - 0.1 < comparison["ci"][1]
    assert comparison["excludes_zero"]


def test_network_versus_step0_kernel_data_exponent(summary: dict) -> None:
    comparisons = summary["kernel_vs_network_data_exponent"]
    feature_driven = comparisons["mlp/mup"]
    assert all(v["test_loss"]["scaling"] == "feature-driven" for v in feature_driven.values())
    kernel_driven = comparisons["mlp/ntk"]
    covered = [
        v["test_loss"]["ci"][0] <= 0.0 <= v["test_loss"]["ci"][1] for v in kernel_driven.values()
    ]
    assert len(covered) == len(WIDTHS) and sum(covered) >= len(WIDTHS) - 1


def test_transition_recovers_planted_break(summary: dict) -> None:
    transition = summary["transition"]["mlp/ntk"]
    assert set(transition) == {f"n_train={n}" for n in SIZES}
    covered = 0
    for entry in transition.values():
        estimate = entry["broken_power_law"]
        covered += estimate["ci"][0] <= W_STAR <= estimate["ci"][1]
        assert 1 / 1.5 < estimate["w_star"] / W_STAR < 1.5
        assert set(entry["llm_ratio"]["broken_power_law"]) == {"4096", "12288"}
        assert entry["threshold"]["w_star"] is not None
        assert set(entry["signals"]) == {"entropy_change", "trace_change"}
    assert covered >= len(SIZES) - 1


def test_failed_runs_are_ignored(study) -> None:
    runs, records = study
    runs = runs[runs["parameterization"] == "ntk"]
    options = {"n_bootstrap": 50, "transition": False, "observables": ("trace",)}
    ok_only = summarize(runs[runs["status"] == "ok"], records, **options)
    with_failed = summarize(runs, records, **options)
    assert ok_only["width_scaling"] == with_failed["width_scaling"]
    assert ok_only["families"] == with_failed["families"]


def test_groups_with_too_few_sizes_are_skipped(study) -> None:
    runs, records = study
    keep = (runs["width"] != 1024) | runs["n_train"].isin([250, 500])
    options = {"n_bootstrap": 50, "transition": False, "observables": ("trace",)}
    result = summarize(runs[keep], records, **options)
    assert "only 2 distinct n_train" in result["data_scaling"]["mlp/ntk"]["width=1024"]["skipped"]
    assert "test_loss" in result["data_scaling"]["mlp/ntk"]["width=512"]
    assert result["transition"] == {"skipped": "not requested (transition=False)"}


def test_transition_without_width_axis(study) -> None:
    runs, records = study
    one_width = runs[runs["width"] == 256]
    result = summarize(one_width, records, n_bootstrap=50)
    assert "no width axis" in result["transition"]["skipped"]
    with pytest.raises(NtkLensError, match="needs a width sweep") as info:
        summarize(one_width, records, n_bootstrap=50, transition=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda runs, records: (runs.drop(columns="width"), records), "runs lacks columns"),
        (lambda runs, records: (runs, records.drop(columns="value")), "records lacks columns"),
        (lambda runs, records: (runs.assign(status="failed"), records), "status 'ok'"),
    ],
)
def test_bad_tables_give_one_line_errors(study, mutate, message) -> None:
    runs, records = mutate(*study)
    with pytest.raises(NtkLensError, match=message) as info:
        summarize(runs, records, n_bootstrap=50)
    assert "\n" not in str(info.value)


def test_bad_arguments_fail_before_any_work(study) -> None:
    runs, records = study
    with pytest.raises(NtkLensError, match="fraction"):
        summarize(runs, records, fraction=1.5)
    with pytest.raises(NtkLensError, match="llm_widths"):
        summarize(runs, records, llm_widths=(0,))
    with pytest.raises(NtkLensError, match="n_bootstrap"):
        summarize(runs, records, n_bootstrap=3)


def test_runs_of_different_studies_share_a_family(study) -> None:
    """A data sweep and a width sweep of one recipe, planned by two studies, are one family."""
    runs, records = study
    runs = runs.assign(study=np.where(runs["width"] == max(WIDTHS), "data-sweep", "width-sweep"))
    result = summarize(runs, records, n_bootstrap=50, seed=0)
    assert set(result["families"]) == {"mlp/ntk", "mlp/mup"}
    assert "mlp/ntk" in result["exponent_comparison"]


def test_families_are_named_by_the_fields_that_vary_within_a_model() -> None:
    """A field that differs only between models (the CNN study's missing kernel baseline),
    between parameterizations or with width alone (a width-dependent lr rule) splits
    nothing; one with two values at one width (two swept lrs) names all of that model's
    families, so that NTK and μP families still pair up."""
    from ntklens.analysis.summary import _family_labels

    runs = pd.DataFrame(
        {
            "model": ["mlp", "mlp", "mlp", "mlp", "cnn", "cnn", "cnn"],
            "parameterization": ["ntk", "ntk", "mup", "mup", "ntk", "ntk", "mup"],
            "kernel0_baseline": [True, True, True, True, False, False, False],
            "lr": [0.5, 0.1, 0.5, 0.5, 0.04, 0.07, 0.001],
            "width": [64, 64, 64, 128, 4, 8, 8],
        }
    )
    assert list(_family_labels(runs)) == [
        "mlp/ntk;lr=0.5",
        "mlp/ntk;lr=0.1",
        "mlp/mup;lr=0.5",
        "mlp/mup;lr=0.5",
        "cnn/ntk",
        "cnn/ntk",
        "cnn/mup",
    ]

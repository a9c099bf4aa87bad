"""The one-command reproduction: its protocols, and the quick run end to end (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ntklens.errors import ConfigError
from ntklens.reproduce import SCALES, protocol, protocol_names
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


def _find_estimates(node: object):
    """Every transition estimate (a dict with "w_star") anywhere in a JSON tree."""
    if isinstance(node, dict):
        if "w_star" in node:
            yield node
        for value in node.values():
            yield from _find_estimates(value)

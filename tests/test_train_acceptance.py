"""Acceptance tests of the training runs on the teacher task: lazy (``ntk``) versus feature
learning (``mup``) as width grows, and the network's approach to its step-0 kernel
regression. Several widths and seeds; a one-hidden-layer MLP trained with full-batch SGD on
MSE to convergence, at one learning rate for every width."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ntklens.schema import RunSpec
from ntklens.train.run import run

pytestmark = pytest.mark.slow

WIDTHS = (64, 256, 1024)
SEEDS = (0, 1, 2)
STEPS = 800


def final_values(parameterization: str, width: int, seed: int) -> dict[str, float]:
    """The quantities recorded at the last step of one teacher run."""
    spec = RunSpec(
        dataset="teacher",
        n_train=64,
        n_test=500,
        n_probe=20,
        width=width,
        depth=1,
        parameterization=parameterization,
        loss="mse",
        lr=1.0,
        steps=STEPS,
        probe_points_per_decade=0,
        spectral_position_batch=16,
        seed=seed,
    )
    result = run(spec)
    assert result.status == "ok", result.error
    last = result.records[result.records["step"] == STEPS]
    return dict(zip(last["quantity"], last["value"], strict=True))


@pytest.fixture(scope="module")
def finals() -> dict[tuple[str, int, int], dict[str, float]]:
    # Small networks: one thread is faster than several competing for shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            (parameterization, width, seed): final_values(parameterization, width, seed)
            for parameterization in ("ntk", "mup")
            for width in WIDTHS
            for seed in SEEDS
        }
    finally:
        torch.set_num_threads(threads)


def mean_over_seeds(finals, parameterization: str, quantity) -> np.ndarray:
    """Per width, the mean over seeds of ``quantity(values)``."""
    return np.array(
        [
            np.mean([quantity(finals[(parameterization, width, seed)]) for seed in SEEDS])
            for width in WIDTHS
        ]
    )


def log_log_slope(values: np.ndarray) -> float:
    return float(np.polyfit(np.log(WIDTHS), np.log(values), 1)[0])


def test_kernel_change_fades_with_width_under_ntk_but_not_under_mup(finals) -> None:
    ntk_change = mean_over_seeds(finals, "ntk", lambda v: v["ntk_change"])
    mup_change = mean_over_seeds(finals, "mup", lambda v: v["ntk_change"])
    assert np.all(np.diff(ntk_change) < 0), ntk_change
    assert log_log_slope(ntk_change) < -0.3, ntk_change
    assert mup_change[-1] >= 0.5 * mup_change[0], mup_change
    assert log_log_slope(mup_change) > -0.15, mup_change
    assert mup_change[-1] > 5 * ntk_change[-1]


def test_wide_ntk_network_approaches_its_step0_kernel_regression(finals) -> None:
    train_loss = mean_over_seeds(finals, "ntk", lambda v: v["train_loss"])
    assert np.all(train_loss < 1e-2), train_loss  # trained to convergence, like the kernel
    gap = mean_over_seeds(finals, "ntk", lambda v: abs(v["test_loss"] - v["kernel0_test_loss"]))
    assert gap[-1] < gap[0], gap
    assert log_log_slope(gap) < -0.3, gap

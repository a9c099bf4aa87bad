"""Tests of :class:`ntklens.train.probes.Probe`, the public unit of measurement.

The acceptance test trains a model that is not one of ntklens's families (a residual network
with LayerNorm) in a plain torch loop and checks every record against the same quantity
computed directly with ``ntklens.ntk`` and ``ntklens.observables``, and the spectral position
against an explicit full kernel and autograd.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntklens import flatten, ntk
from ntklens.errors import NtkLensError
from ntklens.observables import (
    OBSERVABLE_KEYS,
    kernel_observables,
    spectral_position,
)
from ntklens.schema import RunSpec
from ntklens.train.losses import one_hot
from ntklens.train.probes import Probe, position_batch, probe_steps
from ntklens.train.run import build_run_model, load_run_data, run


class ResidualNet(nn.Module):
    """d → h, one residual tanh block with LayerNorm, → k: not an ntklens model."""

    def __init__(self, d: int, h: int, k: int) -> None:
        super().__init__()
        self.embed = nn.Linear(d, h)
        self.block = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, h))
        self.head = nn.Linear(h, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.embed(x))
        return self.head(hidden + self.block(hidden))


def toy_data(n: int, d: int = 5, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, labels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def explicit_full_kernel(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N*K, N*K) from per-output-scalar backward passes, independent of ntklens.kernel."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    outputs = model(x)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params, retain_graph=True)])
        for out in outputs.reshape(-1)
    ]
    model.train()
    jacobian = torch.stack(rows)
    return jacobian @ jacobian.T


@pytest.mark.parametrize("output", ["trace", "full"])
def test_probe_in_a_plain_loop_matches_ntk_and_observables(output: str) -> None:
    torch.manual_seed(0)
    model = ResidualNet(5, 12, 3).double()
    x_train, y_train = toy_data(40)
    x_probe, y_probe = toy_data(9, seed=1)
    probe = Probe(model, x_probe, y_probe, output=output)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    batch_size, steps = 8, 12
    schedule = probe_steps(steps, 2)
    expected: dict[int, dict[str, float]] = {}
    reference = theta0 = None
    for step in range(steps + 1):
        index = torch.arange(step * batch_size, (step + 1) * batch_size) % len(x_train)
        xb, yb = x_train[index], y_train[index]
        if step in schedule:
            got = probe(step, batch=(xb, yb), loss_fn=F.cross_entropy)
            # The same quantities, directly.
            kernel = ntk(model, x_probe, output=output)
            reference = kernel if reference is None else reference
            targets = one_hot(y_probe, 3, torch.float64)
            direct = {
                f"ntk_{key}": value
                for key, value in kernel_observables(
                    kernel, targets.reshape(-1) if output == "full" else targets, reference
                ).items()
            }
            theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            theta0 = theta.clone() if theta0 is None else theta0
            direct["param_change"] = float((theta - theta0).norm() / theta0.norm())
            outputs = model.eval()(xb)
            model.train()
            g = torch.autograd.grad(F.cross_entropy(outputs, yb), outputs)[0]
            raw = spectral_position(explicit_full_kernel(model, xb), g)
            direct |= {
                "chi_loss": raw.chi_loss * batch_size,
                "chi_net": raw.chi_net / batch_size,
                "chi_pos": raw.chi_pos,
                "chi_loss_raw": raw.chi_loss,
                "chi_net_raw": raw.chi_net,
                "chi_batch_size": float(batch_size),
            }
            assert set(got) == set(direct)
            for key, value in direct.items():
                assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
            expected[step] = direct
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    history = probe.history
    assert list(history["step"]) == schedule
    assert history.columns[0] == "step"
    for row in history.itertuples(index=False):
        for key, value in expected[row.step].items():
            assert getattr(row, key) == pytest.approx(value, rel=1e-12, abs=1e-12)
    assert history["ntk_change"].iloc[0] == 0.0 and history["ntk_change"].iloc[-1] > 0
    assert [s.step for s in probe.spectra] == schedule
    size = 9 * (3 if output == "full" else 1)
    assert all(s.values.shape == (size,) for s in probe.spectra)


def test_spectral_position_normalization_is_mean_per_example() -> None:
    """χ̃_loss is the mean over examples of ‖∂ℓ_i/∂f_i‖²; χ̃_net the mean of Tr Θ_ii."""
    torch.manual_seed(1)
    model = ResidualNet(5, 8, 3).double()
    x, y = toy_data(10)
    values = Probe(model, x, observables=())(0, batch=(x, y), loss_fn=F.cross_entropy)
    outputs = model(x).detach()
    per_example = torch.softmax(outputs, 1) - F.one_hot(y, 3)  # ∂ℓ_i/∂f_i for cross-entropy
    assert values["chi_loss"] == pytest.approx(float(per_example.square().sum(1).mean()))
    diagonal = explicit_full_kernel(model, x).diagonal().reshape(10, 3).sum(1)
    assert values["chi_net"] == pytest.approx(float(diagonal.mean()), rel=1e-12)
    summed = Probe(model, x, observables=(), loss_reduction="sum")
    raw = summed(0, batch=(x, y), loss_fn=lambda f, t: F.cross_entropy(f, t, reduction="sum"))
    assert (
        raw["chi_loss"] == raw["chi_loss_raw"] == pytest.approx(float(per_example.square().sum()))
    )
    assert raw["chi_pos"] == pytest.approx(values["chi_pos"], rel=1e-12)


def test_probe_options_select_what_is_measured() -> None:
    torch.manual_seed(2)
    model = ResidualNet(5, 8, 3).double()
    x, y = toy_data(6)
    only = Probe(model, x, observables=("trace", "change"), spectral_position=False)
    assert set(only(0)) == {"ntk_trace", "ntk_change", "param_change"}
    no_kernel = Probe(model, x, observables=(), spectral_position=False)
    assert set(no_kernel(0)) == {"param_change"} and no_kernel.spectra == []
    unlabeled = Probe(model, x, spectral_position=False)
    assert set(unlabeled(0)) == {f"ntk_{k}" for k in OBSERVABLE_KEYS if "alignment" not in k} | {
        "param_change"
    }
    hutchinson = Probe(model, x, spectral_position=8, observables=())
    values = hutchinson(0, batch=(x, y), loss_fn=F.cross_entropy)
    exact = Probe(model, x, observables=())(0, batch=(x, y), loss_fn=F.cross_entropy)
    assert values["chi_net_stderr"] > 0
    assert abs(values["chi_net"] - exact["chi_net"]) < 5 * values["chi_net_stderr"]
    # Integer labels and their one-hot floats give the same alignment.
    from_labels = Probe(model, x, y, spectral_position=False)(0)
    from_floats = Probe(model, x, F.one_hot(y, 3).double(), spectral_position=False)(0)
    assert from_labels["ntk_alignment"] == pytest.approx(from_floats["ntk_alignment"], rel=1e-12)


@pytest.mark.parametrize(
    ("arguments", "call", "words"),
    [
        ({"x_probe": torch.zeros(1, 5)}, {}, "at least 2"),
        ({"output": "diag"}, {}, "output"),
        ({"observables": ("entropy", "rank")}, {}, "'rank'"),
        ({"observables": ("alignment",), "y_probe": None}, {}, "y_probe"),
        ({"y_probe": torch.tensor([0, 1, 5, 0, 1, 2])}, {}, "[0, 3)"),
        ({"y_probe": torch.tensor([0, 1])}, {}, "rows"),
        ({"spectral_position": 1}, {}, "Hutchinson"),
        ({"loss_reduction": "none"}, {}, "loss_reduction"),
        ({}, {"step": -1}, "step"),
        ({}, {"step": 0}, "batch=(x, y)"),
    ],
)
def test_probe_rejects_bad_arguments(arguments: dict, call: dict, words: str) -> None:
    model = ResidualNet(5, 4, 3).double()
    x, y = toy_data(6)
    with pytest.raises(NtkLensError) as caught:
        probe = Probe(model, **{"x_probe": x, "y_probe": y, **arguments})
        probe(**call)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_the_built_in_run_records_what_a_probe_measures() -> None:
    """One code path: a run's step-0 records are those of a Probe on the run's own model."""
    spec = RunSpec(
        dataset="teacher",
        n_train=20,
        n_test=30,
        n_probe=8,
        width=16,
        steps=2,
        parameterization="ntk",
        loss="mse",
        probe_points_per_decade=0,
        spectral_position_batch=32,
        dtype="float64",
    )
    result = run(spec)
    records = result.records[result.records["step"] == 0]
    recorded = dict(zip(records["quantity"], records["value"], strict=True))
    data = load_run_data(spec)
    model = build_run_model(spec, data)
    batch = position_batch(data.train, spec.spectral_position_batch)
    assert len(batch.x) == 20  # min(spectral_position_batch, n_train)
    probe = Probe(
        model,
        data.probe_x,
        data.probe_labels,
        loss_fn=lambda f, t: 0.5 * ((f - t).square().sum(1).mean()),
    )
    values = probe(0, batch=(batch.x, batch.targets))
    for key, value in values.items():
        assert recorded[key] == pytest.approx(value, rel=1e-12), key
    assert recorded["chi_batch_size"] == 20
    assert recorded["chi_loss"] == pytest.approx(20 * recorded["chi_loss_raw"])
    assert math.isfinite(recorded["chi_pos"])
    np.testing.assert_allclose(
        result.spectra[0].values, probe.spectra[0].values, rtol=1e-12, atol=1e-14
    )
    full = flatten(ntk(model, data.probe_x))
    assert recorded["ntk_trace"] == pytest.approx(float(full.trace()), rel=1e-12)


def test_probe_leaves_a_batchnorm_model_as_it_was() -> None:
    """The probe measures in eval mode: training flags and running statistics are untouched."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model = model.double().train()
    x, y = toy_data(10)
    stats = [b.clone() for b in model.buffers()]
    values = Probe(model, x, y)(0, batch=(x, y), loss_fn=F.cross_entropy)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers(), strict=True))
    model.eval()
    direct = kernel_observables(ntk(model, x, output="trace"), one_hot(y, 3, torch.float64))
    assert values["ntk_trace"] == pytest.approx(direct["trace"], rel=1e-12)

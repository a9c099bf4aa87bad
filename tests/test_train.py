"""Tests of one training run: probe schedule, records, determinism, failures, user errors,
the training loop, and the kernel baselines against an explicit-Jacobian computation."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from ntklens.analysis.summary import run_table
from ntklens.errors import DataError, DataNotFoundError, NtkLensError
from ntklens.infinite import analytic_ntk
from ntklens.kernel import ntk
from ntklens.models.centering import CenteredModel
from ntklens.observables import kernel_observables
from ntklens.schema import RunResult, RunSpec
from ntklens.sweep.config import validate_config
from ntklens.sweep.planning import plan
from ntklens.train import probes as probes_module
from ntklens.train.baselines import ridge_solve
from ntklens.train.losses import cross_entropy_loss, mse_loss
from ntklens.train.probes import Prober, Split, evaluate, probe_steps
from ntklens.train.run import (
    TrainingLoop,
    build_optimizer,
    build_run_model,
    load_run_data,
    run,
    total_steps,
)
from ntklens.train.stopping import StoppingRule

PROBE_QUANTITIES = (
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "param_change",
    "chi_loss",
    "chi_net",
    "chi_pos",
)
# The observable keys come from the observables module itself, not from ntklens.train.
_eye = torch.eye(3, dtype=torch.float64)
NTK_KEYS = tuple(kernel_observables(_eye, targets=_eye, reference=_eye))


def tiny_spec(**overrides) -> RunSpec:
    """A run on the teacher task small enough for the default suite."""
    fields = {
        "dataset": "teacher",
        "n_train": 48,
        "n_test": 60,
        "n_probe": 8,
        "width": 24,
        "depth": 2,
        "steps": 12,
        "parameterization": "ntk",
        "loss": "mse",
        "lr": 0.5,
        "probe_points_per_decade": 2,
        "spectral_position_batch": 16,
        "dtype": "float64",
    }
    return RunSpec(**{**fields, **overrides})


def by_step(result: RunResult) -> dict[int, dict[str, float]]:
    """Records as {step: {quantity: value}}."""
    return {
        int(step): dict(zip(group["quantity"], group["value"], strict=True))
        for step, group in result.records.groupby("step")
    }


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run faster on one thread than on several competing for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_result() -> RunResult:
    return run(tiny_spec())


# --- probe schedule --------------------------------------------------------------------


def test_probe_schedule_is_log_spaced_with_start_and_end() -> None:
    steps = probe_steps(1000, 4)
    assert steps[0] == 0 and steps[-1] == 1000
    assert steps == sorted(set(steps))
    assert {1, 10, 100, 1000} <= set(steps)
    for low in (10, 100):
        assert sum(low <= s < 10 * low for s in steps) == 4
    ratios = np.diff(np.log10([s for s in steps if s >= 10]))
    np.testing.assert_allclose(ratios, 0.25, atol=0.02)
    odd_end = probe_steps(37, 3)
    assert odd_end[-1] == 37 and max(odd_end[:-1]) < 37


def test_probe_schedule_without_points_per_decade_is_start_and_end() -> None:
    assert probe_steps(250, 0) == [0, 250]
    assert probe_steps(1, 5) == [0, 1]


# --- records and spectra ---------------------------------------------------------------


def test_every_quantity_is_recorded_at_every_probe(tiny_result: RunResult) -> None:
    spec = tiny_result.spec
    assert tiny_result.status == "ok" and tiny_result.error is None
    records = tiny_result.records
    assert list(records.columns) == ["step", "quantity", "value"]
    assert records["step"].dtype == np.int64 and records["value"].dtype == np.float64
    values = by_step(tiny_result)
    assert sorted(values) == probe_steps(spec.steps, spec.probe_points_per_decade)
    expected = set(PROBE_QUANTITIES) | {f"ntk_{key}" for key in NTK_KEYS}
    for step, quantities in values.items():
        assert expected <= set(quantities), step
        assert all(math.isfinite(quantities[q]) for q in expected)
    last = spec.steps
    end_only = {"kernel0_test_loss", "kernel0_test_acc", "infinite_test_loss", "infinite_test_acc"}
    assert end_only <= set(values[last])
    assert not any(end_only & set(values[s]) for s in values if s != last)
    infinite_keys = {f"infinite_ntk_{key}" for key in NTK_KEYS}
    assert infinite_keys <= set(values[0])
    assert not any(infinite_keys & set(values[s]) for s in values if s != 0)


def test_spectra_are_stored_per_probe(tiny_result: RunResult) -> None:
    spec = tiny_result.spec
    entk = [s for s in tiny_result.spectra if s.kind == "entk"]
    infinite = [s for s in tiny_result.spectra if s.kind == "infinite"]
    assert [s.step for s in entk] == probe_steps(spec.steps, spec.probe_points_per_decade)
    assert [s.step for s in infinite] == [0]
    values = by_step(tiny_result)
    for spectrum in [*entk, *infinite]:
        assert spectrum.values.shape == (spec.n_probe,)
        assert np.all(np.diff(spectrum.values) <= 0) and spectrum.values.min() >= 0
    for spectrum in entk:  # the spectrum is that of the recorded kernel
        assert spectrum.values.sum() == pytest.approx(values[spectrum.step]["ntk_trace"])


def test_kernel_and_parameters_start_unchanged_then_move(tiny_result: RunResult) -> None:
    values = by_step(tiny_result)
    assert values[0]["ntk_change"] == 0.0
    assert values[0]["param_change"] == 0.0
    last = values[tiny_result.spec.steps]
    assert last["ntk_change"] > 0 and last["param_change"] > 0
    assert last["train_loss"] < values[0]["train_loss"]


def test_on_probe_sees_every_probe() -> None:
    seen: list[tuple[int, float]] = []
    spec = tiny_spec(steps=4, probe_points_per_decade=1, width=8)
    result = run(spec, on_probe=lambda step, values: seen.append((step, values["train_loss"])))
    assert [step for step, _ in seen] == probe_steps(4, 1)
    recorded = by_step(result)
    assert all(recorded[step]["train_loss"] == loss for step, loss in seen)


def test_full_kernel_run_agrees_with_the_trace_run() -> None:
    spec = tiny_spec(steps=2, probe_points_per_decade=0, width=16)
    full = run(spec.model_copy(update={"kernel_output": "full"}))
    traced = run(spec)
    assert full.status == "ok"
    n_classes = spec.teacher_n_classes
    full_spectra = {(s.step, s.kind): s.values for s in full.spectra}
    trace_spectra = {(s.step, s.kind): s.values for s in traced.spectra}
    assert full_spectra[(0, "entk")].shape == (spec.n_probe * n_classes,)
    # Tr of the full kernel is Tr of the output-traced one.
    full_values, trace_values = by_step(full), by_step(traced)
    for step in (0, 2):
        assert full_values[step]["ntk_trace"] == pytest.approx(trace_values[step]["ntk_trace"])
    # Θ∞ ⊗ I_K repeats each eigenvalue of Θ∞ K times; the trace layout holds K · Θ∞.
    np.testing.assert_allclose(
        full_spectra[(0, "infinite")][::n_classes],
        trace_spectra[(0, "infinite")] / n_classes,
        rtol=1e-10,
        atol=1e-12,
    )


# --- determinism and failures ----------------------------------------------------------


def test_same_spec_gives_identical_records() -> None:
    spec = tiny_spec(
        dtype="float32",
        loss="cross_entropy",
        batch_size=10,
        momentum=0.9,
        schedule="cosine",
        lr=0.1,
        steps=9,
    )
    first, second = run(spec), run(spec)
    assert first.status == second.status == "ok"
    pd.testing.assert_frame_equal(first.records, second.records)
    assert len(first.spectra) == len(second.spectra)
    for a, b in zip(first.spectra, second.spectra, strict=True):
        assert (a.step, a.kind) == (b.step, b.kind)
        np.testing.assert_array_equal(a.values, b.values)
    other_seed = run(spec.model_copy(update={"seed": 1}))
    assert not first.records["value"].equals(other_seed.records["value"])


def test_diverging_run_fails_with_step_and_reason() -> None:
    spec = tiny_spec(lr=1e6, steps=50, probe_points_per_decade=0)
    result = run(spec)
    assert result.status == "failed"
    assert isinstance(result.failed_step, int) and 0 < result.failed_step <= spec.steps
    assert "non-finite" in result.error and f"step {result.failed_step}" in result.error
    assert spec.run_id in result.error and "\n" not in result.error
    assert set(result.records["step"]) == {0}  # the step-0 probe, nothing after


def test_exception_during_training_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    measure = Prober.measure

    def broken_after_start(self, model, step):
        if step > 0:
            raise RuntimeError("probe exploded\nsecond line")
        return measure(self, model, step)

    monkeypatch.setattr(Prober, "measure", broken_after_start)
    spec = tiny_spec(steps=3, probe_points_per_decade=0, width=8)
    result = run(spec)
    assert result.status == "failed" and result.failed_step == 3
    assert "RuntimeError" in result.error and "probe exploded" in result.error
    assert "\n" not in result.error
    assert set(result.records["step"]) == {0}


# --- user errors, before any training --------------------------------------------------


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def advance(self, to_step):
        raise AssertionError("training started before the spec was checked")

    monkeypatch.setattr(TrainingLoop, "advance", advance)


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize(
    ("overrides", "error", "words"),
    [
        ({"dataset": "imagenet-42"}, DataError, ("imagenet-42",)),
        ({"dataset": "digits", "n_train": 5000}, DataError, ("n_train=5000", "digits")),
        ({"n_test": 30, "n_probe": 40}, DataError, ("n_probe=40",)),
        ({"model": "cnn"}, NtkLensError, ("cnn", "mlp")),
        ({"optimizer": "adam", "momentum": 0.9}, NtkLensError, ("momentum",)),
        ({"device": "gpu"}, NtkLensError, ("device='gpu'",)),
    ],
)
def test_bad_spec_raises_before_training(overrides, error, words) -> None:
    with pytest.raises(error) as caught:
        run(tiny_spec(**overrides))
    message = str(caught.value)
    assert "\n" not in message
    assert all(word in message for word in words), message


@pytest.mark.usefixtures("no_training")
def test_missing_dataset_files_say_where_to_get_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NTKLENS_DATA", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError) as caught:
        run(tiny_spec(dataset="mnist", data_path=str(tmp_path)))
    message = str(caught.value)
    assert "mnist" in message and "download" in message and "\n" not in message


def test_width_must_be_positive() -> None:
    for width in (0, -4):
        with pytest.raises(ValidationError, match="width"):
            tiny_spec(width=width)


# --- training loop and optimizers ------------------------------------------------------


def test_minibatches_cover_every_example_once_per_epoch() -> None:
    n, batch_size = 23, 5
    x = torch.arange(n, dtype=torch.float64)[:, None]
    seen: list[torch.Tensor] = []

    def recording_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(targets.clone())
        return outputs.sum() * 0.0

    model = nn.Linear(1, 1).double()
    loop = TrainingLoop(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        None,
        recording_loss,
        Split(x=x, labels=torch.zeros(n, dtype=torch.long), targets=x[:, 0]),
        batch_size=batch_size,
        seed=3,
    )
    batches_per_epoch = math.ceil(n / batch_size)
    loop.advance(3 * batches_per_epoch)
    assert loop.step == 3 * batches_per_epoch
    epochs = [
        torch.cat(seen[e * batches_per_epoch : (e + 1) * batches_per_epoch]) for e in range(3)
    ]
    for epoch in epochs:
        assert sorted(epoch.long().tolist()) == list(range(n))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_epochs_count_steps_with_a_short_last_batch() -> None:
    spec = tiny_spec(steps=None, epochs=3, batch_size=20)
    assert total_steps(spec, 48) == 3 * 3
    assert total_steps(tiny_spec(steps=None, epochs=2), 48) == 2  # full batch


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_uses_the_parameterization_lr_and_cosine_decays_to_zero(optimizer) -> None:
    spec = tiny_spec(
        parameterization="mup",
        optimizer=optimizer,
        momentum=0.5 if optimizer == "sgd" else 0.0,
        schedule="cosine",
        lr=0.2,
    )
    model = build_run_model(spec, load_run_data(spec))
    expected = {
        id(p): group["lr"]
        for group in model.param_groups(spec.lr, optimizer)
        for p in group["params"]
    }
    opt, scheduler = build_optimizer(model, spec, n_steps=10)
    assert isinstance(opt, torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)

    def lr_per_parameter() -> dict[int, float]:
        return {id(p): group["lr"] for group in opt.param_groups for p in group["params"]}

    assert lr_per_parameter().keys() == expected.keys()
    assert lr_per_parameter() == pytest.approx(expected)
    assert len(opt.param_groups) == len(set(expected.values()))  # one group per lr
    if optimizer == "sgd":
        assert all(group["momentum"] == 0.5 for group in opt.param_groups)
    for _ in range(5):
        opt.step()
        scheduler.step()
    assert lr_per_parameter() == pytest.approx({k: lr / 2 for k, lr in expected.items()})
    for _ in range(5):
        opt.step()
        scheduler.step()
    assert lr_per_parameter() == pytest.approx({k: 0.0 for k in expected})


def test_chunked_evaluation_matches_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 4).double()
    x = torch.randn(29, 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (29,), generator=generator)
    monkeypatch.setattr(probes_module, "EVAL_CHUNK", 6)
    outputs = model(x).detach()
    for loss_fn, targets in (
        (cross_entropy_loss, labels),
        (mse_loss, torch.nn.functional.one_hot(labels, 4).double()),
    ):
        loss, accuracy = evaluate(model, Split(x=x, labels=labels, targets=targets), loss_fn)
        assert loss == pytest.approx(float(loss_fn(outputs, targets)))
        assert accuracy == pytest.approx(float((outputs.argmax(1) == labels).double().mean()))
    assert model.training  # left as it was


# --- kernel baselines ------------------------------------------------------------------


def explicit_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J of shape (N, K, P), one backward pass per output scalar."""
    params = [p for p in model.parameters() if p.requires_grad]
    outputs = model(x)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params, retain_graph=True)])
        for out in outputs.reshape(-1)
    ]
    return torch.stack(rows).reshape(*outputs.shape, -1)


def test_kernel_baselines_match_an_explicit_jacobian_regression() -> None:
    spec = tiny_spec(
        n_train=24,
        n_test=30,
        width=16,
        depth=1,
        steps=1,
        probe_points_per_decade=0,
        ridge=1e-3,
    )
    values = by_step(run(spec))
    data = load_run_data(spec)
    model = build_run_model(spec, data)  # the run's initial network, same seed
    n_classes = data.n_classes
    j_train = explicit_jacobian(model, data.train.x).detach().numpy()
    j_test = explicit_jacobian(model, data.test.x).detach().numpy()
    k_train = np.einsum("iap,jap->ij", j_train, j_train) / n_classes
    k_test = np.einsum("iap,jap->ij", j_test, j_train) / n_classes
    with torch.no_grad():
        f0_train, f0_test = model(data.train.x).numpy(), model(data.test.x).numpy()
    y_train = np.eye(n_classes)[data.train.labels.numpy()]
    y_test = np.eye(n_classes)[data.test.labels.numpy()]

    def score(k_tr, k_te, f_tr, f_te):
        lam = spec.ridge * np.trace(k_tr) / len(k_tr)
        pred = f_te + k_te @ np.linalg.solve(k_tr + lam * np.eye(len(k_tr)), y_train - f_tr)
        loss = 0.5 * np.mean(np.sum((pred - y_test) ** 2, axis=1))
        return loss, np.mean(pred.argmax(1) == data.test.labels.numpy())

    loss, accuracy = score(k_train, k_test, f0_train, f0_test)
    assert values[1]["kernel0_test_loss"] == pytest.approx(loss, rel=1e-6)
    assert values[1]["kernel0_test_acc"] == pytest.approx(accuracy)

    infinite = {"depth": 1, "weight_std": math.sqrt(2.0), "bias_std": 0.1}
    k_inf_train = analytic_ntk(data.train.x, **infinite).numpy()
    k_inf_test = analytic_ntk(data.test.x, data.train.x, **infinite).numpy()
    zeros_train, zeros_test = np.zeros_like(f0_train), np.zeros_like(f0_test)
    loss, accuracy = score(k_inf_train, k_inf_test, zeros_train, zeros_test)
    assert values[1]["infinite_test_loss"] == pytest.approx(loss, rel=1e-6)
    assert values[1]["infinite_test_acc"] == pytest.approx(accuracy)

    # The step-0 probe: the eNTK trace on the probe set and the MSE of f₀.
    j_probe = explicit_jacobian(model, data.probe_x).detach()
    assert values[0]["ntk_trace"] == pytest.approx(float(j_probe.square().sum()), rel=1e-9)
    train_mse = 0.5 * np.mean(np.sum((f0_train - y_train) ** 2, axis=1))
    assert values[0]["train_loss"] == pytest.approx(train_mse, rel=1e-9)


def test_ridge_solve_is_a_scaled_ridge_and_falls_back_when_singular() -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((30, 3))
    rhs = rng.standard_normal((30, 2))
    positive = features @ features.T + np.eye(30)
    scaled = positive + 0.1 * np.mean(np.diag(positive)) * np.eye(30)
    np.testing.assert_allclose(
        ridge_solve(positive, rhs, 0.1), np.linalg.solve(scaled, rhs), rtol=1e-10
    )
    singular = features @ features.T  # rank 3: Cholesky fails without a ridge
    nearly_singular = singular + 5e-15 * np.eye(30)  # Cholesky may pass, its pivots do not
    for kernel in (singular, nearly_singular):
        np.testing.assert_allclose(
            ridge_solve(kernel, rhs, 0.0),
            np.linalg.pinv(singular, rcond=1e-10) @ rhs,
            rtol=1e-6,
            atol=1e-8,
        )


# --- protocol options: stopping rule, output centering, lr rules, baseline toggles -----


def test_stopping_rule_on_the_train_loss_ends_the_run_at_its_check() -> None:
    spec = tiny_spec(steps=400, stop_train_loss=0.05, stop_check_every=7)
    result = run(spec)
    values = by_step(result)
    last = max(values)
    assert result.status == "ok" and last < spec.steps and last % 7 == 0
    final = values[last]
    assert final["stop_met"] == 1.0 and final["stopped_step"] == last
    assert final["train_loss"] < 0.05  # the final probe's loss is the one the rule saw
    assert {"kernel0_test_loss", "infinite_test_loss"} <= set(final)
    # The rule fires at its first check below the tolerance: the run without it was above
    # the tolerance at the check before, and earlier probes follow the schedule.
    capped = by_step(run(spec.model_copy(update={"stop_train_loss": None, "steps": last - 7})))
    assert capped[last - 7]["train_loss"] >= 0.05
    schedule = probe_steps(spec.steps, spec.probe_points_per_decade)
    assert sorted(values)[:-1] == [s for s in schedule if s < last]


def test_stopping_rule_not_met_runs_to_the_cap_and_says_so() -> None:
    spec = tiny_spec(steps=30, stop_train_loss=1e-9)
    values = by_step(run(spec))
    assert max(values) == 30
    assert values[30]["stop_met"] == 0.0 and values[30]["stopped_step"] == 30
    no_rule = by_step(run(tiny_spec(steps=30)))
    assert "stop_met" not in no_rule[30] and no_rule[30]["stopped_step"] == 30


def test_plateau_rule_stops_a_run_that_no_longer_learns() -> None:
    spec = tiny_spec(lr=1e-7, steps=200, stop_plateau_steps=20, stop_plateau_tolerance=1e-3)
    values = by_step(run(spec))
    assert max(values) == 20 and values[20]["stop_met"] == 1.0
    learning = by_step(run(spec.model_copy(update={"lr": 0.5})))
    assert max(learning) > 20


def test_plateau_rule_compares_best_losses_a_window_apart() -> None:
    rule = StoppingRule(plateau_steps=20, plateau_tolerance=0.1, check_every=10)
    # best losses: 1.0 (step 0), 0.5 (10), 0.46 (20), 0.45 (30)
    checks = [(0, 1.0), (10, 0.5), (20, 0.46), (30, 0.45), (40, 0.7)]
    met = [rule.check(step, loss) for step, loss in checks]
    # step 20: best then 1.0 -> now 0.46, fell 54%; step 30: 0.5 -> 0.45, 10% <= 10%: met
    assert met == [False, False, False, True, True]
    assert not StoppingRule(train_loss=0.1).check(0, math.nan)


def test_centered_model_starts_at_zero_and_keeps_the_ntk() -> None:
    torch.manual_seed(0)
    layers = (nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    base = nn.Sequential(*layers).double()
    centered = CenteredModel(base)
    x = torch.randn(7, 4, dtype=torch.float64)
    assert torch.equal(centered(x), torch.zeros(7, 3, dtype=torch.float64))
    assert [p for p in centered.parameters() if p.requires_grad] == list(base.parameters())
    optimizer = torch.optim.SGD(base.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        (centered(x) - 1.0).square().sum().backward()
        optimizer.step()
    with torch.no_grad():
        assert torch.equal(centered(x), base(x) - centered.initial(x))
        assert centered(x).abs().max() > 0
    for output in ("trace", "full"):
        for method in ("jacobian", "layerwise", "vector-products"):
            torch.testing.assert_close(
                ntk(centered, x, output=output, method=method),
                ntk(base, x, output=output, method="jacobian"),
                rtol=1e-12,
                atol=1e-12,
            )
    # The frozen copy follows the wrapper's dtype.
    assert centered.float()(x.float()).abs().max() > 0


def test_centered_run_starts_at_zero_output_with_the_same_kernel() -> None:
    spec = tiny_spec(steps=20, probe_points_per_decade=1)
    plain = by_step(run(spec))
    centered = by_step(run(spec.model_copy(update={"center_output": True})))
    assert centered[0]["train_loss"] == 0.5  # ½‖0 − onehot‖²: the outputs are zero
    for key in ("ntk_trace", "ntk_entropy", "ntk_alignment", "chi_net"):
        assert centered[0][key] == pytest.approx(plain[0][key], rel=1e-12)
    assert centered[20]["train_loss"] < centered[0]["train_loss"]
    assert centered[20]["param_change"] > 0 and centered[20]["ntk_change"] > 0
    # The kernel-regression baseline of a zero initial function is that with f₀ = 0.
    assert centered[20]["kernel0_test_loss"] != pytest.approx(plain[20]["kernel0_test_loss"])


def test_standard_parameterization_with_a_width_scaled_lr_in_a_study() -> None:
    config = validate_config(
        {
            "name": "standard-lr",
            "data": {"dataset": "teacher", "n_test": 60},
            "probe": {"n": 8, "points_per_decade": 0, "spectral_position_batch": 16},
            "model": {"depth": 1, "center_output": True},
            "train": {
                "loss": "mse",
                "lr": 0.4,
                "lr_rule": "inverse_width",
                "base_width": 16,
                "steps": 25,
                "dtype": "float64",
                "stop_train_loss": 1e-4,
                "stop_check_every": 5,
            },
            "sweep": {"widths": [16, 64, 256], "n_train": [32], "parameterizations": ["standard"]},
        }
    )
    specs = plan(config)
    assert [s.lr for s in specs] == pytest.approx([0.4, 0.1, 0.025])
    for spec in specs:
        assert spec.center_output and spec.stop_train_loss == 1e-4 and spec.stop_check_every == 5
    for spec in specs:
        values = by_step(run(spec))
        assert values[25]["train_loss"] < 0.5 * values[0]["train_loss"], spec.width
        # Standard init: the kernel grows with width, so η ∝ 1/width keeps η·Tr Θ bounded.
    traces = [by_step(run(s.model_copy(update={"steps": 1})))[0]["ntk_trace"] for s in specs]
    ratios = [lr * trace for lr, trace in zip([s.lr for s in specs], traces, strict=True)]
    assert max(ratios) / min(ratios) < 2


def mlp_parameter_count(d: int, width: int, depth: int, k: int) -> int:
    """Weights and biases of d → W → … → W → K with ``depth`` hidden layers, in closed form."""
    return d * width + width + (depth - 1) * (width * width + width) + width * k + k


def test_run_records_its_trainable_parameter_count(tiny_result: RunResult) -> None:
    spec = tiny_result.spec
    expected = mlp_parameter_count(
        spec.teacher_input_dim, spec.width, spec.depth, spec.teacher_n_classes
    )
    values = by_step(tiny_result)
    assert values[0]["n_params"] == expected
    assert not any("n_params" in values[s] for s in values if s != 0)
    # the summary's run table reads it as the run's parameter count
    runs = pd.DataFrame([{**spec.model_dump(), "run_id": spec.run_id, "status": "ok"}])
    records = tiny_result.records.assign(run_id=spec.run_id)
    (table,) = run_table(runs, records, ("entropy",)).values()
    assert table["n_params"].tolist() == [expected]


def test_centered_run_counts_only_the_trained_network() -> None:
    spec = tiny_spec(steps=1, probe_points_per_decade=0, width=8, depth=3)
    spec = spec.model_copy(update={"center_output": True})
    values = by_step(run(spec))
    expected = mlp_parameter_count(spec.teacher_input_dim, 8, 3, spec.teacher_n_classes)
    assert values[0]["n_params"] == expected  # the frozen initial copy is not counted


def test_baseline_toggles_leave_out_their_records() -> None:
    spec = tiny_spec(steps=2, probe_points_per_decade=0)
    no_baselines = {"kernel0_baseline": False, "infinite_baseline": False}
    off = by_step(run(spec.model_copy(update=no_baselines)))
    quantities = set(off[0]) | set(off[2])
    assert not any(q.startswith(("kernel0_", "infinite_")) for q in quantities)
    only_kernel0 = by_step(run(spec.model_copy(update={"infinite_baseline": False})))
    assert "kernel0_test_loss" in only_kernel0[2]
    assert not any(q.startswith("infinite_") for q in set(only_kernel0[0]) | set(only_kernel0[2]))


def test_new_fields_at_their_default_keep_the_run_id() -> None:
    spec = tiny_spec()
    added = (
        "stop_train_loss",
        "stop_plateau_steps",
        "stop_plateau_tolerance",
        "stop_check_every",
        "center_output",
        "kernel0_baseline",
        "infinite_baseline",
        "model_options",
        "data_options",
        "study",
    )
    before = {k: v for k, v in spec.model_dump(mode="json").items() if k not in added}
    text = json.dumps(before, sort_keys=True, separators=(",", ":"))
    assert spec.run_id == hashlib.sha256(text.encode()).hexdigest()[:16]
    changed = {
        spec.model_copy(update={name: value}).run_id
        for name, value in (
            ("stop_train_loss", 0.1),
            ("center_output", True),
            ("kernel0_baseline", False),
        )
    }
    assert len(changed) == 3 and spec.run_id not in changed


def test_ridge_solve_leaves_its_kernel_unchanged() -> None:
    """The solve factors a copy in place; the caller's kernel is not that copy."""
    a = np.random.default_rng(3).standard_normal((6, 6))
    kernel = a @ a.T
    before = kernel.copy()
    ridge_solve(kernel, np.ones((6, 2)), 0.1)
    np.testing.assert_array_equal(kernel, before)

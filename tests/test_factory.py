"""Own models in studies: factories, the parameterized building blocks and plan-time checks."""

from __future__ import annotations

import json
import math
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ntklens.cli import app
from ntklens.errors import ConfigError
from ntklens.models import build_model, build_spec_model, layers, model_from_factory, param_groups
from ntklens.schema import RunSpec
from ntklens.sweep.config import load_config
from ntklens.sweep.planning import plan, plan_table
from test_sweep_e2e import start_sweep, stored_runs

FACTORIES = """
import torch
from torch import nn
from ntklens.models import layers


class Net(nn.Module):
    def __init__(self, width, parameterization, n_classes, input_shape, depth=1):
        super().__init__()
        p = {"width": width, "parameterization": parameterization}
        d = 1
        for s in input_shape:
            d *= s
        self.body = nn.Sequential(
            nn.Flatten(), layers.Linear(d, width, kind="input", **p), nn.ReLU(),
            *[m for _ in range(depth - 1) for m in (layers.Linear(width, width, **p), nn.ReLU())],
        )
        self.head = layers.readout(width, n_classes, **p)

    def forward(self, x):
        return self.head(self.body(x))


def good(width, parameterization, n_classes, input_shape, depth=1):
    return Net(width, parameterization, n_classes, input_shape, depth)


def standard_only(width, n_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, n_classes))


def no_width(n_classes, input_shape, parameterization):
    return nn.Linear(64, n_classes)


def wrong_outputs(width, parameterization, n_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, n_classes + 1))


def wrong_inputs(width, parameterization, n_classes, input_shape):
    return nn.Linear(3, n_classes)


def raising(width, parameterization, n_classes, input_shape):
    raise RuntimeError("out of coffee")


def not_a_module(width, parameterization, n_classes, input_shape):
    return 42
"""

STUDY = """
    name = "own"
    [data]
    dataset = "digits"
    n_test = 100
    [probe]
    n = 20
    points_per_decade = 1
    [model]
    factory = "{factory}"
    {extra}
    [train]
    steps = 4
    lr = 0.05
    [sweep]
    widths = [8, 16]
    n_train = [60]
    parameterizations = {params}
"""


@pytest.fixture
def factories(tmp_path: Path) -> Path:
    path = tmp_path / "my_factories.py"
    path.write_text(FACTORIES)
    return path


def study(
    tmp_path: Path, factory: str, params: str = '["standard", "mup"]', extra: str = ""
) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(textwrap.dedent(STUDY.format(factory=factory, params=params, extra=extra)))
    return path


def test_factory_runs_are_planned_with_their_reference_options_and_study(
    tmp_path: Path, factories: Path
) -> None:
    config = load_config(study(tmp_path, f"{factories}:good", extra="options = {depth = 2}"))
    specs = plan(config)
    assert [(s.parameterization, s.width) for s in specs] == [
        ("standard", 8), ("standard", 16), ("mup", 8), ("mup", 16)
    ]  # fmt: skip
    assert {s.model for s in specs} == {f"{factories.resolve()}:good"}
    assert specs[0].model_kwargs == {"depth": 2}
    assert {s.study for s in specs} == {"own"}
    table = plan_table(specs)
    # 64 inputs, two hidden layers of width n, 10 classes
    expected = [64 * n + n + n * n + n + n * 10 + 10 for n in (8, 16, 8, 16)]
    assert table["params"].tolist() == expected
    assert (table["gflop"] > 0).all()


def test_study_name_does_not_change_the_run_id() -> None:
    spec = RunSpec(n_train=10, width=4)
    assert spec.model_copy(update={"study": "a"}).run_id == spec.run_id
    assert spec.model_copy(update={"model_options": '{"x":1}'}).run_id != spec.run_id


@pytest.mark.parametrize(
    ("factory", "params", "message"),
    [
        ("no_such_module_xyz:fn", '["standard"]', "cannot import no_such_module_xyz"),
        ("{file}:missing", '["standard"]', "has no attribute 'missing'"),
        ("{file}:no_width", '["standard"]', "cannot be called as factory"),
        ("{file}:standard_only", '["standard", "mup"]', "supports 'standard' only"),
        ("{file}:wrong_outputs", '["standard"]', "outputs of shape (2, 11)"),
        ("{file}:wrong_inputs", '["standard"]', "fails on inputs of shape (2, 1, 8, 8)"),
        ("{file}:raising", '["standard"]', "raised RuntimeError: out of coffee"),
        ("{file}:not_a_module", '["standard"]', "returned a int, not a torch.nn.Module"),
    ],
)
def test_bad_factories_fail_at_plan_time_with_one_line_and_store_nothing(
    tmp_path: Path, factories: Path, factory: str, params: str, message: str
) -> None:
    config = study(tmp_path, factory.format(file=factories), params)
    store = tmp_path / "store"
    for command in (["plan", str(config)], ["sweep", str(config), "--store", str(store)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert line.startswith("error: ") and "\n" not in line
        assert message in line
    assert not (store / "runs").exists() or not any((store / "runs").iterdir())


def test_standard_only_factory_is_fine_for_standard(tmp_path: Path, factories: Path) -> None:
    specs = plan(load_config(study(tmp_path, f"{factories}:standard_only", '["standard"]')))
    assert len(specs) == 2


@pytest.mark.parametrize(
    ("extra", "key"),
    [('family = "cnn"', "model.family"), ("depth = 3", "model.depth")],
)
def test_factory_refuses_family_keys(tmp_path: Path, factories: Path, extra: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(study(tmp_path, f"{factories}:good", extra=extra))


def test_factory_reference_must_be_well_formed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a factory reference"):
        load_config(study(tmp_path, "no colon here"))


@pytest.mark.parametrize("parameterization", ["standard", "ntk", "mup"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_layers_rebuild_the_builtin_mlp_exactly(parameterization: str, optimizer: str) -> None:
    """An MLP from layers.Linear with the same generator equals the built-in family: the same
    parameters, the same outputs and the same per-layer learning rates."""
    width, d, k, seed = 32, 12, 5, 3
    builtin = build_model(
        "mlp", width=width, depth=2, in_shape=(d,), n_outputs=k,
        parameterization=parameterization, seed=seed,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    p = {"width": width, "parameterization": parameterization, "generator": generator}
    own = nn.Sequential(
        layers.Linear(d, width, kind="input", **p), nn.ReLU(),
        layers.Linear(width, width, **p), nn.ReLU(),
        layers.readout(width, k, **p),
    )  # fmt: skip
    builtin_params = list(builtin.parameters())
    own_params = list(own.parameters())
    assert len(own_params) == len(builtin_params)
    for a, b in zip(own_params, builtin_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = torch.randn(7, d)
    torch.testing.assert_close(own(x), builtin(x))
    own_lrs = [g["lr"] for g in param_groups(own, 0.1, optimizer)]
    builtin_lrs = [g["lr"] for g in builtin.param_groups(0.1, optimizer)]
    assert own_lrs == pytest.approx(builtin_lrs)


def test_conv_init_std_and_multipliers_follow_the_abc_rules() -> None:
    """ntk: W ~ N(0, 1) and the multiplier σ_w/√fan_in; standard: W ~ N(0, σ_w²/fan_in)."""
    c_in, width, ksize = 64, 64, 3
    fan_in = c_in * ksize**2
    ntk = layers.Conv2d(c_in, width, ksize, width=width, parameterization="ntk", bias_std=0.0)
    standard = layers.Conv2d(c_in, width, ksize, width=width, bias_std=0.0)
    assert ntk.layer.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert standard.layer.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.02)
    x = torch.randn(2, c_in, 5, 5)
    expected = nn.functional.conv2d(x, ntk.layer.weight) * math.sqrt(2.0) / math.sqrt(fan_in)
    torch.testing.assert_close(ntk(x), expected)


def test_batchnorm_lr_scales_are_those_of_a_vector_like_parameter() -> None:
    width = 16
    for parameterization, sgd, adam in (("standard", 1, 1), ("ntk", 1, 1), ("mup", width, 1)):
        norm = layers.BatchNorm2d(width, width=width, parameterization=parameterization)
        model = nn.Sequential(norm, nn.Flatten(), nn.Linear(width, 2))
        lrs = {g["name"]: g["lr"] for g in param_groups(model, 0.5, "sgd")}
        assert lrs == pytest.approx({"0.weight": 0.5 * sgd, "0.bias": 0.5 * sgd,
                                     "2.weight": 0.5, "2.bias": 0.5})  # fmt: skip
        adam_lrs = [g["lr"] for g in param_groups(model, 0.5, "adam")]
        assert adam_lrs[:2] == pytest.approx([0.5 * adam] * 2)


def test_factory_seed_fixes_the_init_and_spares_the_global_rng(factories: Path) -> None:
    reference = f"{factories}:good"
    state = torch.random.get_rng_state()
    a, b, c = (
        model_from_factory(
            reference, width=8, parameterization="mup", n_classes=10, input_shape=(1, 8, 8), seed=s
        )
        for s in (1, 1, 2)
    )
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own_model_sweep.toml"


def test_the_example_study_plans_the_resnet_over_widths_and_parameterizations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)
    specs = plan(load_config(EXAMPLE))
    widths = sorted({s.width for s in specs})
    assert len(widths) >= 3
    assert {(s.parameterization, s.width) for s in specs} == {
        (p, w) for p in ("standard", "mup") for w in widths
    }
    assert {s.model for s in specs} == {f"{REPO / 'examples' / 'resnet_factory.py'}:resnet"}
    model = build_spec_model(specs[-1], (1, 28, 28), 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.slow
def test_the_example_sweep_runs_resumes_and_is_reported_by_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example at small sizes (digits, 3 widths × standard and μP, a few steps): killed
    after its first stored run, resumed, then reported by its factory."""
    monkeypatch.chdir(REPO)
    text = EXAMPLE.read_text()
    for old, new in (
        ('dataset = "fashion-mnist"', 'dataset = "digits"'),
        ("n_test = 500", "n_test = 60"),
        ("n = 50", "n = 20"),
        ("n_train = [256]", "n_train = [40]"),
        ("steps = 200", "steps = 4"),
        ("batch_size = 64", "batch_size = 20"),
        ("widths = [8, 16, 32, 64]", "widths = [4, 8, 16]"),
    ):
        assert old in text
        text = text.replace(old, new)
    config = tmp_path / "small.toml"
    config.write_text(text)
    store = tmp_path / "store"
    runner = CliRunner()
    killed = start_sweep(config, store, workers=1)  # killed once it has stored a run
    try:
        deadline = time.monotonic() + 300
        while not stored_runs(store):
            assert killed.poll() is None, killed.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    done = len(stored_runs(store))
    assert 1 <= done < 6, "kill the sweep while it still has runs to do"
    resumed = runner.invoke(app, ["sweep", str(config), "--store", str(store), "-w", "2", "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert f"6 runs, {done} already stored, {6 - done} ok, 0 failed" in resumed.output
    assert len(stored_runs(store)) == 6
    again = runner.invoke(app, ["sweep", str(config), "--store", str(store), "-q"])
    assert "6 runs, 6 already stored" in again.output
    report = runner.invoke(app, ["report", str(store), "--format", "json"])
    assert report.exit_code == 0, report.output
    families = set(json.loads(report.output)["families"])
    reference = f"{REPO / 'examples' / 'resnet_factory.py'}:resnet"
    assert families == {f"{reference}/standard", f"{reference}/mup"}

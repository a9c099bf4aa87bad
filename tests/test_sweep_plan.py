"""The plan: grid expansion, stable run ids, the width lr rule and the cost estimate."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ntklens.schema import RunSpec
from ntklens.sweep import load_config, plan, plan_table
from ntklens.sweep.planning import estimate_flops, estimate_memory, model_cost, spec_cost
from ntklens.train.baselines import KERNEL_WORK_BYTES

STUDY = """
name = "plan-test"
[data]
dataset = "digits"
n_test = 200
subset_seed = 3
[probe]
n = 30
seed = 5
points_per_decade = 2
[model]
depth = 2
activation = "erf"
[train]
lr = 0.4
lr_rule = "inverse_width"
base_width = 32
steps = 50
batch_size = 25
[sweep]
widths = [32, 128]
n_train = [100, 300]
seeds = [0, 1]
parameterizations = ["standard", "ntk"]
"""


def load(tmp_path: Path, text: str = STUDY, name: str = "study.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return load_config(path)


def test_plan_is_the_cartesian_product_in_a_stable_order(tmp_path: Path) -> None:
    specs = plan(load(tmp_path))
    assert len(specs) == 2 * 2 * 2 * 2
    coordinates = [(s.parameterization, s.width, s.n_train, s.seed) for s in specs]
    assert coordinates == sorted(coordinates, key=lambda c: (c[0] != "standard", *c[1:]))
    assert len(set(coordinates)) == len(specs)


def test_planned_spec_equals_the_hand_written_one(tmp_path: Path) -> None:
    specs = plan(load(tmp_path))
    by_coordinates = {(s.parameterization, s.width, s.n_train, s.seed): s for s in specs}
    expected = RunSpec(
        dataset="digits",
        n_train=300,
        subset_seed=3,
        n_test=200,
        n_probe=30,
        probe_seed=5,
        probe_points_per_decade=2,
        depth=2,
        activation="erf",
        width=128,
        parameterization="ntk",
        seed=1,
        lr=0.4 * 32 / 128,  # inverse_width from base_width 32
        steps=50,
        batch_size=25,
        study="plan-test",  # recorded, but not part of the run id
    )
    planned = by_coordinates[("ntk", 128, 300, 1)]
    assert planned == expected
    assert planned.run_id == expected.run_id


def test_run_ids_are_stable_and_follow_every_field(tmp_path: Path) -> None:
    first = [s.run_id for s in plan(load(tmp_path))]
    again = [s.run_id for s in plan(load(tmp_path, name="copy.toml"))]
    assert first == again and len(set(first)) == len(first)
    assert all(len(run_id) == 16 and int(run_id, 16) >= 0 for run_id in first)

    longer = [s.run_id for s in plan(load(tmp_path, STUDY.replace("steps = 50", "steps = 60")))]
    assert set(longer).isdisjoint(first)

    reordered = STUDY.replace("widths = [32, 128]", "widths = [128, 32]")
    assert sorted(s.run_id for s in plan(load(tmp_path, reordered))) == sorted(first)

    # Changing one axis value changes exactly the runs at that value.
    widened = {s.run_id for s in plan(load(tmp_path, STUDY.replace("[32, 128]", "[32, 256]")))}
    kept = {s.run_id for s in plan(load(tmp_path)) if s.width == 32}
    assert widened & set(first) == kept


def test_lrs_axis_multiplies_the_runs(tmp_path: Path) -> None:
    text = STUDY.replace("lr = 0.4\n", "").replace(
        "seeds = [0, 1]", "seeds = [0]\nlrs = [0.1, 1.0]"
    )
    specs = plan(load(tmp_path, text))
    assert len(specs) == 2 * 2 * 2 * 2
    assert {(s.width, s.lr) for s in specs} == {
        (32, 0.1),
        (32, 1.0),
        (128, 0.1 * 32 / 128),
        (128, 1.0 * 32 / 128),
    }


def test_default_steps_without_steps_or_epochs(tmp_path: Path) -> None:
    specs = plan(load(tmp_path, STUDY.replace("steps = 50\n", "")))
    assert {s.steps for s in specs} == {RunSpec.model_fields["steps"].default}
    by_epochs = plan(load(tmp_path, STUDY.replace("steps = 50", "epochs = 2")))
    assert {(s.steps, s.epochs) for s in by_epochs} == {(None, 2)}
    table = plan_table(by_epochs)
    assert set(zip(table["n_train"], table["steps"], strict=True)) == {(100, 8), (300, 24)}


def test_mlp_forward_cost_matches_the_closed_form() -> None:
    d, width, k = 64, 48, 10  # digits: 8×8 inputs, 10 classes; depth 2
    cost = model_cost("mlp", width, 2, (1, 8, 8), k)
    assert cost.forward == 2 * (d * width + width * width + width * k)
    assert cost.params == d * width + width + width * width + width + width * k + k


def test_training_cost_is_linear_in_steps(tmp_path: Path) -> None:
    text = STUDY.replace("points_per_decade = 2", "points_per_decade = 0")
    short = plan(load(tmp_path, text))[0]
    long = short.model_copy(update={"steps": 150})
    forward = 2 * (64 * 32 + 32 * 32 + 32 * 10)
    # with probes only at the start and the end, 100 more steps add 3·F·B per step
    assert estimate_flops(long) - estimate_flops(short) == pytest.approx(3 * forward * 25 * 100)


def test_cost_grows_with_width_and_data(tmp_path: Path) -> None:
    table = plan_table(plan(load(tmp_path)))
    assert list(table.columns) == [
        "run_id",
        "model",
        "parameterization",
        "width",
        "n_train",
        "lr",
        "seed",
        "steps",
        "params",
        "gflop",
    ]
    gflop = table.set_index(["parameterization", "width", "n_train", "seed"])["gflop"]
    assert (gflop > 0).all()
    assert gflop["standard", 128, 100, 0] > gflop["standard", 32, 100, 0]
    assert gflop["standard", 32, 300, 0] > gflop["standard", 32, 100, 0]


@pytest.mark.parametrize(
    ("family", "in_shape", "depth"), [("mlp", (1, 8, 8), 3), ("cnn", (3, 8, 8), 2)]
)
def test_wide_models_are_sized_exactly_without_being_built(
    family: str, in_shape: tuple[int, ...], depth: int
) -> None:
    from ntklens.sweep.planning import BUILT_WIDTH_LIMIT, _measured_shape, model_shape

    width = BUILT_WIDTH_LIMIT + 45
    assert model_shape(family, width, depth, in_shape, 10) == _measured_shape(
        family, width, depth, in_shape, 10
    )


def test_baselines_table_reaches_the_specs_and_the_estimates(tmp_path: Path) -> None:
    on = plan(load(tmp_path))
    off = plan(load(tmp_path, STUDY + "[baselines]\nkernel0 = false\ninfinite = false\n"))
    assert {(s.kernel0_baseline, s.infinite_baseline) for s in on} == {(True, True)}
    assert {(s.kernel0_baseline, s.infinite_baseline) for s in off} == {(False, False)}
    assert {s.run_id for s in on}.isdisjoint(s.run_id for s in off)
    for with_baselines, without in zip(on, off, strict=True):
        n, n_test = with_baselines.n_train, 200
        assert estimate_flops(with_baselines) - estimate_flops(without) > n * (n + n_test)
        # float64 kernels train × (train + test) and the factor, and the kernel's cached
        # features, (1 + K) activations per sample, capped by its working budget
        features = 8 * n * (10 + 1) * spec_cost(with_baselines).fan_out
        assert sum(estimate_memory(with_baselines)) - sum(estimate_memory(without)) == (
            pytest.approx(8 * (2 * n * n + n * n_test) + min(KERNEL_WORK_BYTES, features))
        )


def test_wall_time_estimate_adds_up_per_worker(tmp_path: Path) -> None:
    from ntklens.sweep.planning import FIXED_COST_S, WORKER_START_S, estimate_wall_time

    specs = plan(load(tmp_path))
    one = estimate_wall_time(specs[:1], workers=1)
    rate = one.gflops
    assert one.seconds == pytest.approx(
        WORKER_START_S + FIXED_COST_S + estimate_flops(specs[0]) / 1e9 / rate
    )
    same = [specs[0]] * 4
    two = estimate_wall_time(same, workers=2)
    run_s = FIXED_COST_S + estimate_flops(specs[0]) / 1e9 / two.gflops
    assert two.seconds == pytest.approx(WORKER_START_S + 2 * run_s)  # 4 equal runs, 2 workers

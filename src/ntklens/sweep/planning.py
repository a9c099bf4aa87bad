"""The plan: a study config expanded into one :class:`RunSpec` per point of its sweep grid.

The grid is the cartesian product of parameterizations × widths × n_train × learning
rates × seeds, in that (stable) order. Each run's learning rate is the base rate put
through the config's width rule. A run's id is :attr:`RunSpec.run_id`, a hash of the
normalized spec, so equal runs in two configs share an id and a store.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache

import pandas as pd
from torch import nn

from ntklens.models import build_model, count_flops, count_parameters
from ntklens.schema import RunSpec
from ntklens.sweep.config import DATASET_FACTS, StudyConfig
from ntklens.train.probes import probe_steps
from ntklens.train.run import total_steps

DEFAULT_STEPS = 500  # when the config gives neither steps nor epochs
PLAN_COLUMNS = ("run_id", "parameterization", "width", "n_train", "lr", "seed", "steps", "gflop")


def plan(config: StudyConfig) -> list[RunSpec]:
    """Every run of the study, in a stable order."""
    data, probe, model, train, sweep = (
        config.data, config.probe, config.model, config.train, config.sweep
    )  # fmt: skip
    teacher = data.teacher
    fixed = {
        "dataset": data.dataset,
        "data_path": data.path,
        "subset_seed": data.subset_seed,
        "n_test": data.n_test,
        "n_probe": probe.n,
        "probe_split": probe.split,
        "probe_seed": probe.seed,
        "model": model.family,
        "depth": model.depth,
        "activation": model.activation,
        "weight_std": model.weight_std,
        "bias_std": model.bias_std,
        "optimizer": train.optimizer,
        "momentum": train.momentum,
        "loss": train.loss,
        "batch_size": train.batch_size,
        "steps": DEFAULT_STEPS if train.steps is None and train.epochs is None else train.steps,
        "epochs": train.epochs,
        "schedule": train.schedule,
        "stop_train_loss": train.stop_train_loss,
        "stop_plateau_steps": train.stop_plateau_steps,
        "stop_plateau_tolerance": train.stop_plateau_tolerance,
        "stop_check_every": train.stop_check_every,
        "center_output": model.center_output,
        "probe_points_per_decade": probe.points_per_decade,
        "kernel_output": probe.kernel_output,
        "spectral_position_batch": probe.spectral_position_batch,
        "ridge": train.ridge,
        "dtype": train.dtype,
        "device": train.device,
    }
    if teacher is not None:
        fixed |= {
            "teacher_input_dim": teacher.input_dim,
            "teacher_difficulty": teacher.difficulty,
            "teacher_n_classes": teacher.n_classes,
        }
    grid = itertools.product(
        sweep.parameterizations, sweep.widths, sweep.n_train, config.base_lrs, sweep.seeds
    )
    return [
        RunSpec(
            **fixed,
            parameterization=parameterization,
            width=width,
            n_train=n_train,
            lr=config.lr_for(base_lr, width),
            seed=seed,
        )
        for parameterization, width, n_train, base_lr, seed in grid
    ]


def data_shape(spec: RunSpec) -> tuple[tuple[int, ...], int, int]:
    """(example shape, number of classes, test-set size) of the run's dataset."""
    facts = DATASET_FACTS[spec.dataset]
    if facts.in_shape is None or facts.n_classes is None or facts.n_test is None:
        return (spec.teacher_input_dim,), spec.teacher_n_classes, spec.n_test or 2000
    return facts.in_shape, facts.n_classes, spec.n_test or facts.n_test


@dataclass(frozen=True)
class ModelCost:
    """FLOPs of one architecture: a forward pass, and one pair of examples of an eNTK."""

    forward: float
    pair_trace: float
    pair_full: float


@cache
def model_cost(
    family: str, width: int, depth: int, in_shape: tuple[int, ...], n_outputs: int
) -> ModelCost:
    """The costs of an architecture, from the model itself (built once per architecture).

    An eNTK entry contracts K Jacobian rows over all P parameters (2·K·P FLOPs; K² rows for
    a full kernel), except that a Linear layer's share is a product of Grams of its inputs
    and output gradients, 2·(in + K·out) (the layerwise method picks the cheaper).
    """
    model = build_model(family, width=width, depth=depth, in_shape=in_shape, n_outputs=n_outputs)
    params = count_parameters(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    linear_params = sum(count_parameters(m) for m in linears)
    fan_in = sum(m.in_features for m in linears)
    fan_out = sum(m.out_features for m in linears)

    def pair(rows: int) -> float:
        layerwise = fan_in + rows * fan_out + rows * (params - linear_params)
        return 2.0 * min(rows * params, layerwise)

    return ModelCost(count_flops(model, in_shape), pair(n_outputs), pair(n_outputs**2))


def estimate_flops(spec: RunSpec) -> float:
    """A rough FLOP count of one run: training, probes and the kernel-regression baseline.

    With F forward FLOPs per example, K outputs, B the batch and N probe points: training
    costs 3·F·B per step; each probe evaluates the train and test sets (F each), builds
    N·K Jacobian rows (3·F each), contracts N² pairs (:func:`model_cost`), diagonalizes
    the kernel and computes the spectral position on a batch; the step-0 kernel baseline
    builds the eNTK on train × (train + test) and solves it (n³/3).
    """
    in_shape, k, n_test = data_shape(spec)
    cost = model_cost(spec.model, spec.width, spec.depth, in_shape, k)
    full = spec.kernel_output == "full"
    steps = total_steps(spec, spec.n_train)
    batch = min(spec.batch_size or spec.n_train, spec.n_train)
    n, n_probe = spec.n_train, spec.n_probe
    training = 3.0 * cost.forward * batch * steps
    per_probe = (
        cost.forward * (n + n_test)
        + 3.0 * cost.forward * n_probe * k
        + n_probe**2 * (cost.pair_full if full else cost.pair_trace)
        + (n_probe * (k if full else 1)) ** 3
        + 3.0 * cost.forward * spec.spectral_position_batch * k
    )
    baseline = 3.0 * cost.forward * (n + n_test) * k + n * (n + n_test) * cost.pair_trace
    baseline += n**3 / 3
    return training + len(probe_steps(steps, spec.probe_points_per_decade)) * per_probe + baseline


def plan_table(specs: list[RunSpec]) -> pd.DataFrame:
    """One row per run: id, swept coordinates, steps and estimated GFLOP."""
    rows = [
        {
            "run_id": spec.run_id,
            "parameterization": spec.parameterization,
            "width": spec.width,
            "n_train": spec.n_train,
            "lr": spec.lr,
            "seed": spec.seed,
            "steps": total_steps(spec, spec.n_train),
            "gflop": estimate_flops(spec) / 1e9,
        }
        for spec in specs
    ]
    return pd.DataFrame(rows, columns=list(PLAN_COLUMNS))

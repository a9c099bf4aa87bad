"""The plan: a study config expanded into one :class:`RunSpec` per point of its sweep grid.

The grid is the cartesian product of parameterizations × widths × n_train × learning
rates × seeds, in that (stable) order. Each run's learning rate is the base rate put
through the config's width rule. A run's id is :attr:`RunSpec.run_id`, a hash of the
normalized spec, so equal runs in two configs share an id and a store.

Before any run, :func:`check_specs` reads each dataset's real shape (an ``.npz`` file or a
data factory is loaded), builds each model (built-in family or factory) at the smallest
width of the sweep and checks that it maps those inputs to one logit per class; a bad
factory or file becomes one :class:`~ntklens.errors.NtkLensError` line.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cache

import pandas as pd
from torch import nn

from ntklens.data import load_dataset
from ntklens.errors import ConfigError, DataError
from ntklens.models import build_model, build_spec_model, count_flops, count_parameters
from ntklens.models.factory import check_output_shape
from ntklens.schema import RunSpec, is_reference
from ntklens.sweep.config import DATASET_FACTS, StudyConfig
from ntklens.train.baselines import KERNEL_WORK_BYTES
from ntklens.train.probes import probe_steps
from ntklens.train.run import total_steps

DEFAULT_STEPS = 500  # when the config gives neither steps nor epochs
PLAN_COLUMNS = (
    "run_id", "model", "parameterization", "width", "n_train", "lr", "seed", "steps", "params",
    "gflop",
)  # fmt: skip


def plan(config: StudyConfig, *, check: bool = True) -> list[RunSpec]:
    """Every run of the study, in a stable order; ``check`` runs :func:`check_specs` on them."""
    data, probe, model, train, sweep = (
        config.data, config.probe, config.model, config.train, config.sweep
    )  # fmt: skip
    teacher = data.teacher
    fixed = {
        "dataset": data.factory or data.dataset,
        "data_path": data.path,
        "data_options": data.options,
        "subset_seed": data.subset_seed,
        "n_test": data.n_test,
        "n_probe": probe.n,
        "probe_split": probe.split,
        "probe_seed": probe.seed,
        "model": model.factory or model.family,
        "model_options": model.options,
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
        "kernel0_baseline": config.baselines.kernel0,
        "infinite_baseline": config.baselines.infinite,
        "dtype": train.dtype,
        "device": train.device,
        "study": config.name,
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
    specs = [
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
    if check:
        check_specs(specs)
    return specs


@cache
def _external_facts(
    dataset: str, path: str | None, options: str
) -> tuple[tuple[int, ...], int, int, int]:
    """(example shape, classes, train size, test size) of an .npz file or data factory."""
    loaded = load_dataset(dataset, path=path, **json.loads(options))
    shape = tuple(loaded.x_train.shape[1:])
    return shape, loaded.n_classes, len(loaded.y_train), len(loaded.y_test)


def _is_external(spec: RunSpec) -> bool:
    return spec.dataset == "npz" or is_reference(spec.dataset)


def data_shape(spec: RunSpec) -> tuple[tuple[int, ...], int, int]:
    """(example shape, number of classes, test-set size) of the run's dataset."""
    if _is_external(spec):
        shape, k, _, n_test = _external_facts(spec.dataset, spec.data_path, spec.data_options)
        return shape, k, min(spec.n_test or n_test, n_test)
    facts = DATASET_FACTS[spec.dataset]
    if facts.in_shape is None or facts.n_classes is None or facts.n_test is None:
        return (spec.teacher_input_dim,), spec.teacher_n_classes, spec.n_test or 2000
    return facts.in_shape, facts.n_classes, spec.n_test or facts.n_test


def check_specs(specs: list[RunSpec]) -> None:
    """Check every dataset and model of ``specs`` before any run (see the module docstring).

    A model is built once per architecture, at the smallest width it is planned at (a
    built-in family at most at :data:`BUILT_WIDTH_LIMIT`: its output shape does not depend
    on the width, and a very wide one would not fit in memory).
    """
    for spec in {(s.dataset, s.data_path, s.data_options): s for s in specs}.values():
        if not _is_external(spec):
            continue
        try:
            _, _, n_train, n_test = _external_facts(spec.dataset, spec.data_path, spec.data_options)
        except DataError as error:
            raise DataError(f"data {spec.data_path or spec.dataset}: {error}") from None
        same = [s for s in specs if (s.dataset, s.data_path) == (spec.dataset, spec.data_path)]
        sizes = {"train": n_train, "test": n_test}
        largest = max(s.n_train for s in same)
        if largest > n_train:
            raise ConfigError(
                f"sweep.n_train: {largest} exceeds the {n_train} training examples of "
                f"{spec.data_path or spec.dataset}; use at most {n_train}"
            )
        if spec.n_test is not None and spec.n_test > n_test:
            raise ConfigError(
                f"data.n_test: {spec.n_test} exceeds the {n_test} test examples of "
                f"{spec.data_path or spec.dataset}; use at most {n_test} or 'all'"
            )
        available = sizes[spec.probe_split]
        if spec.probe_split == "test" and spec.n_test is not None:
            available = min(available, spec.n_test)
        if spec.n_probe > available:
            raise ConfigError(
                f"probe.n: {spec.n_probe} probe points but the {spec.probe_split} split has "
                f"only {available}; use at most {available}"
            )
    architectures: dict[tuple[object, ...], RunSpec] = {}
    for spec in sorted(specs, key=lambda s: s.width):
        key = (spec.model, spec.model_options, spec.parameterization, spec.depth,
               spec.activation, spec.weight_std, spec.bias_std, spec.dataset, spec.data_path,
               spec.data_options, spec.teacher_input_dim, spec.teacher_n_classes)  # fmt: skip
        architectures.setdefault(key, spec)
    for spec in architectures.values():
        in_shape, k, _ = data_shape(spec)
        if not is_reference(spec.model):
            spec = spec.model_copy(update={"width": min(spec.width, BUILT_WIDTH_LIMIT)})
        model = build_spec_model(spec, in_shape, k)
        check_output_shape(model, spec.model, in_shape, k)


@dataclass(frozen=True)
class ModelCost:
    """FLOPs of one architecture: a forward pass, and one pair of examples of an eNTK;
    and its number of trainable parameters."""

    forward: float
    pair_trace: float
    pair_full: float
    params: int = 0
    fan_out: int = 0  # summed outputs of the Linear layers (activations per example)


@dataclass(frozen=True)
class ModelShape:
    """Sizes of one architecture: parameters (all, and in Linear layers), summed Linear
    fan-in and fan-out, and forward FLOPs per example."""

    params: int
    linear_params: int
    fan_in: int
    fan_out: int
    forward: int


BUILT_WIDTH_LIMIT = 256  # wider built-in models are sized from small ones, never built


def _shape(model: nn.Module, in_shape: tuple[int, ...]) -> ModelShape:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return ModelShape(
        params=count_parameters(model),
        linear_params=sum(count_parameters(m) for m in linears),
        fan_in=sum(m.in_features for m in linears),
        fan_out=sum(m.out_features for m in linears),
        forward=count_flops(model, in_shape),
    )


def _measured_shape(
    family: str, width: int, depth: int, in_shape: tuple[int, ...], n_outputs: int
) -> ModelShape:
    model = build_model(family, width=width, depth=depth, in_shape=in_shape, n_outputs=n_outputs)
    return _shape(model, in_shape)


@cache
def model_shape(
    family: str, width: int, depth: int, in_shape: tuple[int, ...], n_outputs: int
) -> ModelShape:
    """The sizes of a built-in architecture without allocating a wide model.

    Every size of the MLP and CNN families is a polynomial of degree ≤ 2 in the width
    (width × width hidden weights, width-long biases and fan-ins), so past
    :data:`BUILT_WIDTH_LIMIT` the sizes are interpolated exactly from the models of width
    1, 2 and 3, after checking the interpolation against the model of width 4.
    """
    if width <= BUILT_WIDTH_LIMIT:
        return _measured_shape(family, width, depth, in_shape, n_outputs)
    small = [_measured_shape(family, w, depth, in_shape, n_outputs) for w in (1, 2, 3, 4)]

    def at(w: int) -> ModelShape:
        def value(name: str) -> int:
            f1, f2, f3 = (getattr(shape, name) for shape in small[:3])
            twice = f1 * (w - 2) * (w - 3) - 2 * f2 * (w - 1) * (w - 3) + f3 * (w - 1) * (w - 2)
            return twice // 2  # Lagrange through widths 1, 2, 3; exact in integers

        return ModelShape(**{field.name: value(field.name) for field in fields(ModelShape)})

    if at(4) != small[3]:
        raise AssertionError(f"the sizes of {family} are not quadratic in the width")
    return at(width)


def model_cost(
    family: str, width: int, depth: int, in_shape: tuple[int, ...], n_outputs: int
) -> ModelCost:
    """The costs of a built-in architecture, from its sizes (:func:`model_shape`).

    An eNTK entry contracts K Jacobian rows over all P parameters (2·K·P FLOPs; K² rows for
    a full kernel), except that a Linear layer's share is a product of Grams of its inputs
    and output gradients, 2·(in + K·out) (the layerwise method picks the cheaper).
    """
    return _cost_of(model_shape(family, width, depth, in_shape, n_outputs), n_outputs)


@cache
def _spec_model_cost(spec: RunSpec, in_shape: tuple[int, ...], n_outputs: int) -> ModelCost:
    return _cost(build_spec_model(spec, in_shape, n_outputs), in_shape, n_outputs)


def _cost(model: nn.Module, in_shape: tuple[int, ...], n_outputs: int) -> ModelCost:
    return _cost_of(_shape(model, in_shape), n_outputs)


def _cost_of(shape: ModelShape, n_outputs: int) -> ModelCost:
    def pair(rows: int) -> float:
        other_params = shape.params - shape.linear_params
        layerwise = shape.fan_in + rows * shape.fan_out + rows * other_params
        return 2.0 * min(rows * shape.params, layerwise)

    return ModelCost(
        float(shape.forward), pair(n_outputs), pair(n_outputs**2), shape.params, shape.fan_out
    )


def spec_cost(spec: RunSpec) -> ModelCost:
    """The :class:`ModelCost` of the run's architecture."""
    in_shape, k, _ = data_shape(spec)
    if not is_reference(spec.model) and not spec.model_kwargs:
        return model_cost(spec.model, spec.width, spec.depth, in_shape, k)
    architecture = {"seed": 0, "lr": 1.0, "n_train": 1, "steps": 1, "epochs": None,
                    "study": None}  # fmt: skip
    return _spec_model_cost(spec.model_copy(update=architecture), in_shape, k)


def estimate_flops(spec: RunSpec) -> float:
    """A rough FLOP count of one run: training, probes and the kernel-regression baseline.

    With F forward FLOPs per example, K outputs, B the batch and N probe points: training
    costs 3·F·B per step; each probe evaluates the train and test sets (F each), builds
    N·K Jacobian rows (3·F each), contracts N² pairs (:func:`model_cost`), diagonalizes
    the kernel and computes the spectral position on a batch; the step-0 kernel baseline
    builds the eNTK on train × (train + test) and solves it (n³/3), the infinite-width one
    evaluates its closed form there and solves it too (each only if the spec asks).
    """
    cost = spec_cost(spec)
    in_shape, k, n_test = data_shape(spec)
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
    baseline = 0.0
    if spec.kernel0_baseline:
        baseline += 3.0 * cost.forward * (n + n_test) * k + n * (n + n_test) * cost.pair_trace
        baseline += n**3 / 3
    if spec.infinite_baseline:  # a closed-form kernel: about a forward pass per pair
        baseline += n * (n + n_test) * 2.0 * math.prod(in_shape) + n**3 / 3
    return training + len(probe_steps(steps, spec.probe_points_per_decade)) * per_probe + baseline


def plan_table(specs: list[RunSpec]) -> pd.DataFrame:
    """One row per run: id, swept coordinates, steps and estimated GFLOP."""
    rows = [
        {
            "run_id": spec.run_id,
            "model": spec.model,
            "parameterization": spec.parameterization,
            "width": spec.width,
            "n_train": spec.n_train,
            "lr": spec.lr,
            "seed": spec.seed,
            "steps": total_steps(spec, spec.n_train),
            "params": spec_cost(spec).params,
            "gflop": estimate_flops(spec) / 1e9,
        }
        for spec in specs
    ]
    return pd.DataFrame(rows, columns=list(PLAN_COLUMNS))


GiB = 1024**3


def estimate_memory(spec: RunSpec) -> tuple[float, float]:
    """Rough peak bytes of one run, split as (width-driven, data-driven).

    Width-driven: the parameters with their gradients, optimizer state and the initial copy
    in the run's dtype, plus the float64 copy of the kernel baseline; the Linear layers'
    activations on the train and test sets. Data-driven: the dataset in float32 (raw and
    standardized), the float64 kernels of the baseline on train × (train + test) and its
    factor with the kernel's working memory, and the probe kernel.
    """
    in_shape, k, n_test = data_shape(spec)
    shape = spec_cost(spec)
    itemsize = 8 if spec.dtype == "float64" else 4
    states = 3 + {"sgd": int(spec.momentum > 0), "adam": 2}[spec.optimizer]
    n = spec.n_train
    features = math.prod(in_shape)
    if _is_external(spec):
        _, _, n_train_all, n_test_all = _external_facts(
            spec.dataset, spec.data_path, spec.data_options
        )
        n_examples = n_train_all + n_test_all
    else:
        facts = DATASET_FACTS[spec.dataset]
        n_examples = (facts.n_train or n) + (facts.n_test or n_test)
    activations = (n + n_test) * max(shape.fan_out, 1) * itemsize * 2
    width_driven = shape.params * (states * itemsize + 2 * 8) + activations
    rows = spec.n_probe * (k if spec.kernel_output == "full" else 1)
    baselines = spec.kernel0_baseline or spec.infinite_baseline
    # the kernel's cached layer-wise features: about (1 + K) activations per sample
    cached = min(KERNEL_WORK_BYTES, 8 * n * (k + 1) * max(shape.fan_out, 1))
    kernels = 8 * (2 * n * n + n * n_test) + cached if baselines else 0
    data_driven = 2 * n_examples * features * 4 + kernels + 3 * 8 * rows**2
    return float(width_driven), float(data_driven)


def machine_memory(device: str) -> int:
    """Bytes of memory of the device runs use: RAM for the CPU, else the GPU's own."""
    import torch

    target = torch.device(device)
    if target.type == "cuda":
        return int(torch.cuda.get_device_properties(target).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


def check_device(device: str) -> None:
    """Raise a one-line ConfigError if ``device`` is not on this machine."""
    import torch

    target = torch.device(device)
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = target.index or 0
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            fix = "use 'cpu' or 'cuda:0'" if count else "use 'cpu'"
            raise ConfigError(
                f"train.device: {device!r} is not available (this machine has {have}); {fix}"
            )
    elif target.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device: {device!r} is not available here; use 'cpu'")


def check_runs(specs: Sequence[RunSpec], label: str = "config") -> None:
    """Refuse, before any run starts, what every run would fail on: a device this machine
    does not have, or a run that needs more memory than the machine has (estimated from
    shapes, see :func:`estimate_memory`). One ConfigError line naming the key."""
    for device in sorted({spec.device for spec in specs}):
        try:
            check_device(device)
        except ConfigError as error:
            raise ConfigError(f"{label}: {error}") from None
    for device in sorted({spec.device for spec in specs}):
        total = machine_memory(device)
        on_device = [spec for spec in specs if spec.device == device]
        worst = max(on_device, key=lambda spec: sum(estimate_memory(spec)))
        width_driven, data_driven = estimate_memory(worst)
        if width_driven + data_driven > total:
            key, value, fix = (
                ("sweep.widths", f"width {worst.width}", "use smaller widths")
                if width_driven >= data_driven
                else ("sweep.n_train", f"n_train {worst.n_train}", _data_fix(worst))
            )
            raise ConfigError(
                f"{label}: {key}: a run at {value} needs ~{_size(width_driven + data_driven)} "
                f"of memory (estimated from shapes), more than the {_size(total)} of this "
                f"machine ({device}); {fix}"
            )


def _data_fix(spec: RunSpec) -> str:
    if spec.kernel0_baseline or spec.infinite_baseline:
        return (
            "use a smaller n_train, or switch off the kernel baselines "
            "([baselines] kernel0 = false, infinite = false), whose n × n kernels dominate"
        )
    return "use a smaller n_train"


def _size(n_bytes: float) -> str:
    for unit, scale in (("TiB", 1024**4), ("GiB", GiB), ("MiB", 1024**2)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes / 1024:.1f} KiB"


#: per-run cost outside the run's own arithmetic in a warm worker (data standardization and
#: subsets, store writes; benchmarks/sweep_speed.py), and the rate at which one worker thread
#: gets through :func:`estimate_flops` (calibrated on the quick reproduction: 19,248
#: estimated GFLOP in 3 min 55 s on 2 idle cores, 2 workers)
FIXED_COST_S = 1.0
GFLOPS_PER_THREAD = 40.0
WORKER_START_S = 8.0  # spawn, imports and the first decode of a worker


@dataclass(frozen=True)
class WallTime:
    """A sweep's estimated wall time on local workers, and the figures it assumes."""

    seconds: float
    workers: int
    fixed_s: float
    gflops: float


def estimate_wall_time(specs: Sequence[RunSpec], *, workers: int | None = None) -> WallTime:
    """Rough wall time of ``specs`` on ``workers`` local processes (default: all cores):
    each run costs :data:`FIXED_COST_S` plus its FLOPs at :data:`GFLOPS_PER_THREAD` per
    thread; runs go to the least loaded worker, longest first."""
    from ntklens.sweep.executors import available_cores

    cores = available_cores()
    workers = workers or cores
    rate = GFLOPS_PER_THREAD * max(1, cores // workers)
    costs = sorted(
        (FIXED_COST_S + estimate_flops(spec) / 1e9 / rate for spec in specs), reverse=True
    )
    loads = [0.0] * min(workers, max(1, len(costs)))
    for cost in costs:
        loads[loads.index(min(loads))] += cost
    return WallTime(WORKER_START_S + max(loads), workers, FIXED_COST_S, rate)

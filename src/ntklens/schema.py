"""The records that cross floors, and the vocabulary of choices every signature uses.

This is the bottom floor (with :mod:`ntklens.errors`): it imports nothing else of ntklens.
A :class:`RunSpec` holds everything that decides a run's numbers; two equal specs give
identical records on the same machine. Its :attr:`RunSpec.run_id` is a stable hash of the
normalized spec, so a sweep can tell finished runs from new ones. :class:`RunResult` and
:class:`Spectrum` are what a run hands to the store and the report.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ntklens.errors import ConfigError, describe

VERSION = "0.1.0"  # of the package (pyproject.toml): ``ntklens.__version__``, stamped on runs

Parameterization = Literal["standard", "ntk", "mup"]
KernelOutput = Literal["full", "trace"]
KernelMethod = Literal["auto", "jacobian", "vector-products", "layerwise"]
LossName = Literal["cross_entropy", "mse"]
ActivationName = Literal["relu", "erf", "tanh", "gelu"]
OptimizerName = Literal["sgd", "adam"]
ModelFamily = Literal["mlp", "cnn"]
RunStatus = Literal["ok", "failed"]

PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)
KERNEL_OUTPUTS: tuple[str, ...] = get_args(KernelOutput)
KERNEL_METHODS: tuple[str, ...] = get_args(KernelMethod)
LOSS_NAMES: tuple[str, ...] = get_args(LossName)
ACTIVATION_NAMES: tuple[str, ...] = get_args(ActivationName)

MODEL_FAMILIES: tuple[str, ...] = get_args(ModelFamily)

RECORD_COLUMNS = ("step", "quantity", "value")

#: "package.module:function" (importable) or "path/to/file.py:function"
REFERENCE_PATTERN = re.compile(
    r"(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*|[^:]+\.py):[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
)
#: RunSpec fields added after run ids were first stored: left out of the id at their default,
#: so a run keeps the id it had in a store written before they existed.
_ID_OMITTED_AT_DEFAULT = (
    "stop_train_loss",
    "stop_plateau_steps",
    "stop_plateau_tolerance",
    "stop_check_every",
    "center_output",
    "kernel0_baseline",
    "infinite_baseline",
    "model_options",
    "data_options",
)
#: RunSpec fields that describe a run without deciding its numbers: never in the id
_ID_EXCLUDED = frozenset({"study"})


def is_reference(text: object) -> bool:
    """Whether ``text`` names a callable: "package.module:function" or "file.py:function"."""
    return isinstance(text, str) and REFERENCE_PATTERN.fullmatch(text) is not None


def load_reference(reference: str, what: str) -> Callable[..., Any]:
    """The callable that ``reference`` names, importing its module (a file path is loaded
    from that file); one-line :class:`ConfigError` naming ``what`` if it cannot be."""
    module_name, _, attribute = reference.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"{what} {reference!r}: no file {path}; check the path")
            key = f"ntklens_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
            module = sys.modules.get(key)
            if module is None:
                spec = importlib.util.spec_from_file_location(key, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[key] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[key]
                    raise
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(
            f"{what} {reference!r}: cannot import {module_name} ({describe(error)}); "
            "put it on PYTHONPATH or give 'path/to/file.py:function'"
        ) from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(
                f"{what} {reference!r}: {module_name} has no attribute {attribute!r}; "
                "check the name after the colon"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{what} {reference!r} is a {type(target).__name__}, not a callable")
    return target


def reference_of(function: Callable[..., Any], what: str) -> str:
    """The "module:qualname" reference of a module-level ``function``, checked to resolve
    back to it (runs in other processes import it by that name)."""
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", "")
    reference = f"{module}:{qualname}"
    if module is None or "<" in qualname or not is_reference(reference):
        raise ConfigError(
            f"{what} {function!r} is not importable by name; define it at module level "
            "(not a lambda or a local function) or pass 'package.module:function'"
        )
    if module != "__main__" and load_reference(reference, what) is not function:
        raise ConfigError(f"{what} {reference!r} does not import as the same object")
    return reference


def _canonical_options(value: Any) -> Any:
    """Options as sorted-key JSON text (a dict is converted; text is normalized)."""
    if isinstance(value, str):
        value = json.loads(value) if value else {}
    if not isinstance(value, dict):
        raise ValueError(f"options must be a table/dict, got {type(value).__name__}")
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class StoppingRule(BaseModel):
    """When training stops before its cap (steps/epochs): the train loss below
    ``stop_train_loss``, or a plateau (relative fall <= ``stop_plateau_tolerance`` over
    ``stop_plateau_steps``), checked on the whole training subset every ``stop_check_every``
    steps. One declaration for a run (RunSpec) and a config's training table."""

    stop_train_loss: float | None = Field(default=None, gt=0)
    stop_plateau_steps: int | None = Field(default=None, gt=0)
    stop_plateau_tolerance: float = Field(default=1e-3, ge=0)
    stop_check_every: int = Field(default=10, gt=0)


class RunSpec(StoppingRule):
    """One run: data subset, model, optimizer and probe schedule."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # data: a built-in name, "npz" (the file is ``data_path``) or a factory reference
    dataset: str = "fashion-mnist"
    data_path: str | None = None
    data_options: str = "{}"
    n_train: int = Field(gt=0)
    subset_seed: int = 0
    n_test: int | None = Field(default=2000, gt=0)
    n_probe: int = Field(default=100, gt=1)
    probe_split: Literal["train", "test"] = "test"
    probe_seed: int = 0
    teacher_input_dim: int = Field(default=16, gt=0)
    teacher_difficulty: float = Field(default=1.0, gt=0)
    teacher_n_classes: int = Field(default=4, gt=1)

    # model: a built-in family or a factory reference "package.module:function"
    model: str = "mlp"
    model_options: str = "{}"
    depth: int = Field(default=2, gt=0)
    width: int = Field(gt=0)
    activation: ActivationName = "relu"
    parameterization: Parameterization = "standard"
    weight_std: float | None = Field(default=None, gt=0)
    bias_std: float | None = Field(default=None, ge=0)
    center_output: bool = False  # train f(x; θ) − f(x; θ₀), θ₀ a frozen copy of the init

    # training
    seed: int = 0
    optimizer: OptimizerName = "sgd"
    lr: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    loss: LossName = "cross_entropy"
    batch_size: int | None = Field(default=None, gt=0)
    steps: int | None = Field(default=500, gt=0)
    epochs: int | None = Field(default=None, gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    # the stopping rule's fields come from StoppingRule

    # probes and baselines
    probe_points_per_decade: int = Field(default=4, ge=0)
    kernel_output: KernelOutput = "trace"
    spectral_position_batch: int = Field(default=256, gt=0)
    ridge: float = Field(default=1e-6, ge=0)
    kernel0_baseline: bool = True
    infinite_baseline: bool = True
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"

    # bookkeeping: the study that planned the run (not part of the run id)
    study: str | None = None

    @field_validator("model")
    @classmethod
    def _family_or_factory(cls, value: str) -> str:
        if value not in MODEL_FAMILIES and not is_reference(value):
            raise ValueError(
                f"model {value!r} is neither a family ({', '.join(MODEL_FAMILIES)}) nor a "
                "factory reference 'package.module:function'"
            )
        return value

    @field_validator("model_options", "data_options", mode="before")
    @classmethod
    def _options_as_json(cls, value: Any) -> Any:
        return _canonical_options(value)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """``model_options`` as a dict: the family's options or the factory's ``**options``."""
        return json.loads(self.model_options)

    @property
    def data_kwargs(self) -> dict[str, Any]:
        """``data_options`` as a dict: the options of a data factory."""
        return json.loads(self.data_options)

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> RunSpec:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of 'steps' or 'epochs'")
        return self

    def canonical_json(self) -> str:
        """The spec as sorted-key JSON, the input of :attr:`run_id`.

        ``study`` is left out, and so are fields added later while at their default, so a
        run keeps the id it had in a store written before they existed.
        """
        fields = self.model_dump(mode="json", exclude=set(_ID_EXCLUDED))
        for name in _ID_OMITTED_AT_DEFAULT:
            if fields[name] == type(self).model_fields[name].default:
                del fields[name]
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @property
    def run_id(self) -> str:
        """16 hex characters of the SHA-256 of the canonical JSON."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues (float64, descending) of a kernel measured at ``step``."""

    step: int
    kind: str
    values: np.ndarray


@dataclass
class RunResult:
    """What one run produced: tidy records, spectra and, if it failed, why."""

    spec: RunSpec
    run_id: str
    status: RunStatus
    records: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=RECORD_COLUMNS))
    spectra: list[Spectrum] = field(default_factory=list)
    error: str | None = None
    failed_step: int | None = None
    wall_time_s: float = 0.0

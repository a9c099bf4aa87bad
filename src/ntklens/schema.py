"""The records that cross floors, and the vocabulary of choices every signature uses.

This is the bottom floor (with :mod:`ntklens.errors`): it imports nothing else of ntklens.
A :class:`RunSpec` holds everything that decides a run's numbers; two equal specs give
identical records on the same machine. Its :attr:`RunSpec.run_id` is a stable hash of the
normalized spec, so a sweep can tell finished runs from new ones. :class:`RunResult` and
:class:`Spectrum` are what a run hands to the store and the report.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

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

RECORD_COLUMNS = ("step", "quantity", "value")

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
)


class RunSpec(BaseModel):
    """One run: data subset, model, optimizer and probe schedule."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # data
    dataset: str = "fashion-mnist"
    data_path: str | None = None
    n_train: int = Field(gt=0)
    subset_seed: int = 0
    n_test: int | None = Field(default=2000, gt=0)
    n_probe: int = Field(default=100, gt=1)
    probe_split: Literal["train", "test"] = "test"
    probe_seed: int = 0
    teacher_input_dim: int = Field(default=16, gt=0)
    teacher_difficulty: float = Field(default=1.0, gt=0)
    teacher_n_classes: int = Field(default=4, gt=1)

    # model
    model: ModelFamily = "mlp"
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
    # stopping rule (steps/epochs is the cap): the train loss below stop_train_loss, or a
    # plateau (relative fall <= stop_plateau_tolerance over stop_plateau_steps), checked on
    # the whole training subset every stop_check_every steps
    stop_train_loss: float | None = Field(default=None, gt=0)
    stop_plateau_steps: int | None = Field(default=None, gt=0)
    stop_plateau_tolerance: float = Field(default=1e-3, ge=0)
    stop_check_every: int = Field(default=10, gt=0)

    # probes and baselines
    probe_points_per_decade: int = Field(default=4, ge=0)
    kernel_output: KernelOutput = "trace"
    spectral_position_batch: int = Field(default=256, gt=0)
    ridge: float = Field(default=1e-6, ge=0)
    kernel0_baseline: bool = True
    infinite_baseline: bool = True
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> RunSpec:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of 'steps' or 'epochs'")
        return self

    def canonical_json(self) -> str:
        """The spec as sorted-key JSON, the input of :attr:`run_id`.

        Fields added later are left out while at their default, so a run keeps the id it had
        in a store written before they existed.
        """
        fields = self.model_dump(mode="json")
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

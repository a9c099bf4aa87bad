"""One training run: data, model and optimizer from a :class:`RunSpec`, probes on a schedule,
kernel baselines at the end (or at the step where the stopping rule is met).

:func:`prepare` checks and builds everything a run needs, so every user error (unknown
dataset, missing files, sizes, model options) surfaces as an :class:`NtkLensError` before
the first step. :func:`run` then trains with a :class:`TrainingLoop` and probes on the
schedule of :func:`~ntklens.train.probes.probe_steps`; a failure during training (a
diverging loss or any exception) ends the run with ``status="failed"`` and the records so
far. Everything random is seeded from the spec, so a spec gives identical records on the
same machine.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from ntklens.data import (
    SOURCES,
    Dataset,
    evaluation_subset_indices,
    load_dataset,
    nested_subset_indices,
    preprocess,
    probe_indices,
)
from ntklens.data.registry import locate
from ntklens.errors import ConfigError, DataError
from ntklens.infinite import infinite_kernel_for
from ntklens.models import build_spec_model, param_groups
from ntklens.models.centering import CenteredModel
from ntklens.schema import RECORD_COLUMNS, RunResult, RunSpec, Spectrum
from ntklens.train.baselines import infinite_baseline, infinite_probe, kernel0_baseline
from ntklens.train.losses import LOSSES, LossFn, NonFiniteLoss, loss_targets, one_hot
from ntklens.train.probes import Prober, Split, evaluate, position_batch, probe_steps
from ntklens.train.stopping import StoppingRule

OnProbe = Callable[[int, dict[str, float]], None]

# Keeps the batch order independent of the initialization drawn from the same seed.
BATCH_ORDER_STREAM = 1


@dataclass(frozen=True)
class RunData:
    """The training subset, the test set and the probe set of a run, on its device."""

    train: Split
    test: Split
    probe_x: torch.Tensor
    probe_labels: torch.Tensor
    n_classes: int


def _device(spec: RunSpec) -> torch.device:
    try:
        device = torch.device(spec.device)
    except RuntimeError:
        raise ConfigError(
            f"device={spec.device!r} is not a torch device; use 'cpu' or 'cuda[:index]'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec.device!r} but CUDA is not available; use device='cpu'")
    return device


def _load(spec: RunSpec) -> Dataset:
    """The spec's dataset; the teacher task is generated with exactly ``n_train`` examples
    (a larger ``n_train`` extends a smaller one) and ``n_test`` test examples."""
    if spec.dataset != "teacher":
        return load_dataset(spec.dataset, path=spec.data_path, **spec.data_kwargs)
    options = {"n_test": spec.n_test} if spec.n_test is not None else {}
    return load_dataset(
        "teacher",
        input_dim=spec.teacher_input_dim,
        n_classes=spec.teacher_n_classes,
        difficulty=spec.teacher_difficulty,
        n_train=spec.n_train,
        **options,
    )


def _files_stamp(spec: RunSpec) -> tuple[tuple[str, int, int], ...]:
    """Path, size and mtime of the files the spec's dataset would be read from (none for
    datasets without files, or when the files are missing: the load then raises)."""
    if spec.dataset not in SOURCES:
        return ()
    files = locate(SOURCES[spec.dataset], spec.data_path) or []
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


@lru_cache(maxsize=2)
def _standardized(
    name: str, data_path: str | None, flatten: bool, stamp: tuple[tuple[str, int, int], ...]
) -> Dataset:
    """A whole dataset standardized (and flattened), kept per process while its files keep
    their ``stamp``: the runs of a sweep share it instead of standardizing every image again
    (runs only index into it, which copies)."""
    return preprocess(load_dataset(name, path=data_path), standardize=True, flatten=flatten)


def _check_size(argument: str, wanted: int, available: int, what: str) -> None:
    if wanted > available:
        raise DataError(
            f"{argument}={wanted} is larger than the {available} {what}; "
            f"choose {argument} <= {available}"
        )


def load_run_data(spec: RunSpec) -> RunData:
    """Load, standardize and subset the data of ``spec``; raises before any training.

    The training subset is the nested stratified subset of ``subset_seed``. The test subset
    (all of the test split if ``n_test`` is None) and the probe set are fixed by
    ``probe_seed``, so that every run of a sweep is evaluated on the same examples.
    """
    device, dtype = _device(spec), getattr(torch, spec.dtype)
    flatten = spec.model == "mlp"
    if spec.dataset == "teacher":  # generated to the run's sizes
        dataset = preprocess(_load(spec), standardize=True, flatten=flatten)
    else:
        dataset = _standardized(spec.dataset, spec.data_path, flatten, _files_stamp(spec))
    name = f"{spec.dataset!r}"
    if spec.model == "cnn" and dataset.x_train.ndim != 4:
        raise ConfigError(
            f"model='cnn' needs images but dataset {name} holds vectors; use model='mlp'"
        )
    _check_size("n_train", spec.n_train, len(dataset.y_train), f"training examples of {name}")
    if spec.n_test is not None:
        _check_size("n_test", spec.n_test, len(dataset.y_test), f"test examples of {name}")
    probe_x_all, probe_y_all = (
        (dataset.x_train, dataset.y_train)
        if spec.probe_split == "train"
        else (dataset.x_test, dataset.y_test)
    )
    _check_size("n_probe", spec.n_probe, len(probe_y_all), f"{spec.probe_split} examples of {name}")
    train_index = nested_subset_indices(dataset.y_train, spec.n_train, spec.subset_seed)
    test_index = (
        np.arange(len(dataset.y_test))
        if spec.n_test is None
        else evaluation_subset_indices(dataset.y_test, spec.n_test, spec.probe_seed)
    )
    probe_index = probe_indices(probe_y_all, spec.n_probe, spec.probe_seed)

    def split(x: torch.Tensor, y: torch.Tensor, index: np.ndarray) -> Split:
        rows = torch.from_numpy(index)
        labels = y[rows].to(device)
        targets = loss_targets(spec.loss, labels, dataset.n_classes, dtype)
        return Split(x=x[rows].to(device=device, dtype=dtype), labels=labels, targets=targets)

    probe = split(probe_x_all, probe_y_all, probe_index)
    return RunData(
        train=split(dataset.x_train, dataset.y_train, train_index),
        test=split(dataset.x_test, dataset.y_test, test_index),
        probe_x=probe.x,
        probe_labels=probe.labels,
        n_classes=dataset.n_classes,
    )


def total_steps(spec: RunSpec, n_train: int) -> int:
    """``steps``, or ``epochs`` times the batches per epoch (the last batch may be short)."""
    if spec.steps is not None:
        return spec.steps
    batch = n_train if spec.batch_size is None else min(spec.batch_size, n_train)
    return spec.epochs * math.ceil(n_train / batch)


def build_optimizer(
    model: nn.Module, spec: RunSpec, n_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """SGD (with ``momentum``) or Adam on the model's per-layer learning rates, and the
    cosine schedule over ``n_steps`` (None for a constant learning rate).

    Parameters that share a learning rate share one optimizer group (often all of them), so
    each step updates them in one fused call instead of one call per tensor.
    """
    by_lr: dict[float, list[torch.nn.Parameter]] = {}
    for group in param_groups(model, spec.lr, spec.optimizer):
        by_lr.setdefault(group["lr"], []).extend(group["params"])
    groups = [{"params": params, "lr": lr} for lr, params in by_lr.items()]
    if spec.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=spec.lr, momentum=spec.momentum
        )
    else:
        optimizer = torch.optim.Adam(groups, lr=spec.lr)
    if spec.schedule == "constant":
        return optimizer, None
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_steps)


class TrainingLoop:
    """Optimizer steps on the training subset, full-batch or in mini-batches.

    Mini-batches are slices of a seeded random permutation of the subset, redrawn every
    epoch; the last batch of an epoch may be short. :meth:`advance` checks the loss of every
    step and raises :class:`NonFiniteLoss` at the first NaN or infinity.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        loss_fn: LossFn,
        train: Split,
        *,
        batch_size: int | None,
        seed: int,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.x = train.x
        self.targets = train.targets
        self.full_batch = batch_size is None or batch_size >= len(train.x)
        self.batch_size = len(train.x) if self.full_batch else batch_size
        self.step = 0
        seed_state = np.random.SeedSequence([seed, BATCH_ORDER_STREAM]).generate_state(1)
        self._generator = torch.Generator().manual_seed(int(seed_state[0]))
        self._batches: Iterator[torch.Tensor] = iter(())

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.full_batch:
            return self.x, self.targets
        index = next(self._batches, None)
        if index is None:
            order = torch.randperm(len(self.x), generator=self._generator).to(self.x.device)
            self._batches = iter(order.split(self.batch_size))
            index = next(self._batches)
        return self.x[index], self.targets[index]

    def advance(self, to_step: int) -> None:
        """Train until ``to_step`` optimizer steps have been taken in total."""
        self.model.train()
        while self.step < to_step:
            x, targets = self._next_batch()
            loss = self.loss_fn(self.model(x), targets)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(self.step, float(loss.detach()))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.step += 1


@dataclass
class RunSetup:
    """Everything a run needs, built and checked, before its first step."""

    data: RunData
    model: nn.Module  # the trained network: the spec's model, centered if center_output
    loss_fn: LossFn
    n_steps: int
    loop: TrainingLoop


def build_run_model(spec: RunSpec, data: RunData) -> nn.Module:
    """The spec's network for ``data``, initialized from ``spec.seed``, on its device/dtype."""
    model = build_spec_model(spec, tuple(data.train.x.shape[1:]), data.n_classes)
    return model.to(device=data.train.x.device, dtype=data.train.x.dtype)


def prepare(spec: RunSpec) -> RunSetup:
    """Check ``spec`` and build its data, model, optimizer and training loop; no training.

    Raises an :class:`~ntklens.errors.NtkLensError` for anything that would stop the run.
    """
    if spec.optimizer == "adam" and spec.momentum > 0:
        raise ConfigError(
            f"momentum={spec.momentum} applies to optimizer='sgd' only; "
            "set momentum=0 for adam (its beta1 is fixed at 0.9)"
        )
    data = load_run_data(spec)
    network = build_run_model(spec, data)
    n_steps = total_steps(spec, len(data.train.x))
    optimizer, scheduler = build_optimizer(network, spec, n_steps)
    # Centering wraps the network after the optimizer took its parameters.
    model = CenteredModel(network) if spec.center_output else network
    loss_fn = LOSSES[spec.loss]
    loop = TrainingLoop(
        model,
        optimizer,
        scheduler,
        loss_fn,
        data.train,
        batch_size=spec.batch_size,
        seed=spec.seed,
    )
    return RunSetup(data=data, model=model, loss_fn=loss_fn, n_steps=n_steps, loop=loop)


def count_trainable(model: nn.Module) -> int:
    """The number of scalar parameters with ``requires_grad`` (each shared tensor once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _failure_message(spec: RunSpec, error: Exception, step: int, n_steps: int) -> str:
    if isinstance(error, NonFiniteLoss):
        return (
            f"run {spec.run_id}: training diverged: {error} of {n_steps}; "
            f"lower lr (now {spec.lr:g}) or use a cosine schedule"
        )
    detail = (str(error).strip().splitlines() or [""])[0]
    return (
        f"run {spec.run_id}: {type(error).__name__} at step {step} of {n_steps}: {detail}; "
        "rerun this spec alone with ntklens.train.run to see the traceback"
    )


def run(spec: RunSpec, *, on_probe: OnProbe | None = None) -> RunResult:
    """Train the run of ``spec``, probing on its schedule; kernel baselines at the end.

    The first probe (step 0) also records ``n_params``, the network's trainable parameter
    count (:func:`count_trainable`), the resource against which model scaling is read. The
    last probe (at the cap, or where the spec's stopping rule of
    :mod:`ntklens.train.stopping` is met) also records ``stopped_step``, ``stop_met`` (1 or 0;
    only with a rule) and the kernel baselines the spec asks for. With ``center_output`` the
    network trained and probed is :class:`~ntklens.models.centering.CenteredModel`, and
    ``n_params`` counts its trainable network only, not the frozen initial copy.
    ``on_probe(step, values)`` is called after each probe with that probe's quantities.
    User errors raise before training; a failure during training returns a result with
    ``status="failed"``, a one-line ``error``, ``failed_step`` and the records so far.
    """
    started = time.perf_counter()
    setup = prepare(spec)
    data, model = setup.data, setup.model
    probe_one_hot = one_hot(data.probe_labels, data.n_classes, torch.float64)
    prober = Prober(
        model,
        train=data.train,
        test=data.test,
        probe_x=data.probe_x,
        probe_one_hot=probe_one_hot,
        position_batch=position_batch(data.train, spec.spectral_position_batch),
        loss_fn=setup.loss_fn,
        kernel_output=spec.kernel_output,
    )
    initial_model = copy.deepcopy(model)
    base = model.model if isinstance(model, CenteredModel) else model
    infinite_kernel = infinite_kernel_for(base) if spec.infinite_baseline else None
    stopping = StoppingRule.from_spec(spec)
    schedule = probe_steps(setup.n_steps, spec.probe_points_per_decade)
    rows: list[tuple[int, str, float]] = []
    spectra: list[Spectrum] = []
    status: Literal["ok", "failed"]
    try:
        for step, final, stop_met in _events(setup, schedule, stopping):
            values, spectrum = prober.measure(model, step)
            spectra.append(spectrum)
            if step == 0:
                values["n_params"] = float(count_trainable(model))
            if step == 0 and infinite_kernel is not None:
                infinite_values, infinite_spectrum = infinite_probe(
                    infinite_kernel,
                    data.probe_x,
                    data.n_classes,
                    kernel_output=spec.kernel_output,
                    targets=prober.kernel_targets,
                    reference=prober.reference_kernel,
                )
                values.update(infinite_values)
                spectra.append(infinite_spectrum)
            if final:
                values["stopped_step"] = float(step)
                if stopping is not None:
                    values["stop_met"] = float(stop_met)
                args = (data.train, data.test, data.n_classes, spec.ridge)
                if spec.kernel0_baseline:
                    values.update(kernel0_baseline(initial_model, *args))
                if infinite_kernel is not None:
                    values.update(infinite_baseline(infinite_kernel, *args))
            rows.extend((step, quantity, value) for quantity, value in values.items())
            if on_probe is not None:
                on_probe(step, values)
    except Exception as error:
        failed_step = error.step if isinstance(error, NonFiniteLoss) else setup.loop.step
        status, message = "failed", _failure_message(spec, error, failed_step, setup.n_steps)
    else:
        status, message, failed_step = "ok", None, None
    return RunResult(
        spec=spec,
        run_id=spec.run_id,
        status=status,
        records=_records(rows),
        spectra=spectra,
        error=message,
        failed_step=failed_step,
        wall_time_s=time.perf_counter() - started,
    )


def _events(
    setup: RunSetup, schedule: list[int], stopping: StoppingRule | None
) -> Iterator[tuple[int, bool, bool]]:
    """Train through the probe schedule; yield ``(step, final, stop_met)`` at each probe.

    Without a stopping rule the probes are the schedule's. With one, the train loss is
    checked at the rule's check steps; the first check that meets it ends the run there,
    with a final probe at that step (``stop_met``); else the run ends at the cap.
    """
    loop = setup.loop
    pending = iter(schedule)
    next_probe = next(pending)
    next_check = None if stopping is None else 0
    while True:
        target = next_probe if next_check is None else min(next_probe, next_check)
        loop.advance(target)
        stop_met = False
        if stopping is not None and target == next_check:
            loss = evaluate(setup.model, setup.data.train, setup.loss_fn)[0]
            stop_met = stopping.check(target, loss)
            next_check += stopping.check_every
        final = stop_met or target == setup.n_steps
        if target == next_probe or final:
            yield target, final, stop_met
            if final:
                return
            next_probe = next(pending)


def _records(rows: list[tuple[int, str, float]]) -> pd.DataFrame:
    """The tidy ``step, quantity, value`` table."""
    records = pd.DataFrame(rows, columns=list(RECORD_COLUMNS))
    return records.astype({"step": "int64", "quantity": "object", "value": "float64"})

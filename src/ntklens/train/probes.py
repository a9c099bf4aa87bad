"""The probe: what the eNTK and its observables are at one step of any training loop.

:class:`Probe` is the public unit of measurement. Built once on a fixed probe set, it is
called at chosen steps (:func:`probe_steps` gives the log schedule) of any loop that trains
the model in place, and returns one flat dict:

* ``ntk_<key>`` for each key of :func:`ntklens.observables.kernel_observables` on the probe
  set (trace, entropies, effective ranks, alignment with ``y_probe``, and ``change`` /
  ``cosine_change`` since the first probe);
* ``param_change`` = ‖θ − θ₀‖/‖θ₀‖ over the trainable parameters, θ₀ fixed at the first
  probe;
* the spectral position on a batch (matrix-free): ``chi_pos``, ``chi_loss`` and ``chi_net`` in
  the seed authors' normalization for a mean-reduced loss (χ̃_loss = |B|·χ_loss,
  χ̃_net = χ_net/|B|, see :mod:`ntklens.observables.spectral_position`), the raw values as
  ``chi_loss_raw`` and ``chi_net_raw``, and ``chi_batch_size`` = |B|.

The built-in runs (:func:`ntklens.train.run.run`) measure through the same class:
:class:`Prober` adds the train and test loss and accuracy to a :class:`Probe`'s dict.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from ntklens.errors import NtkLensError
from ntklens.kernel import ntk
from ntklens.kernel.functional import eval_mode
from ntklens.observables import (
    ALIGNMENT_KEYS,
    OBSERVABLE_KEYS,
    kernel_observables_and_spectrum,
    spectral_position_matrix_free,
)
from ntklens.schema import KERNEL_OUTPUTS, KernelMethod, KernelOutput, Spectrum
from ntklens.train.losses import LossFn, NonFiniteLoss

EVAL_CHUNK = 4096


def probe_steps(total_steps: int, points_per_decade: int) -> list[int]:
    """Step 0, the steps ``round(10**(k / points_per_decade))`` in [1, total_steps], the end.

    Sorted and without repeats; ``points_per_decade=0`` gives only step 0 and the end.
    """
    steps = {0, total_steps}
    if points_per_decade > 0:
        last_k = math.ceil(points_per_decade * math.log10(max(total_steps, 1)))
        for k in range(last_k + 1):
            step = round(10 ** (k / points_per_decade))
            if 1 <= step <= total_steps:
                steps.add(step)
    return sorted(steps)


@dataclass(frozen=True)
class Split:
    """Inputs, integer labels and the loss's targets of one set of examples."""

    x: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor


def evaluate(model: nn.Module, split: Split, loss_fn: LossFn) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``split``, in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64)
    correct = 0
    try:
        with torch.no_grad():
            for x, labels, targets in zip(
                split.x.split(EVAL_CHUNK),
                split.labels.split(EVAL_CHUNK),
                split.targets.split(EVAL_CHUNK),
                strict=True,
            ):
                outputs = model(x)
                total_loss += loss_fn(outputs, targets).double().cpu() * len(x)
                correct += int((outputs.argmax(dim=1) == labels).sum())
    finally:
        model.train(was_training)
    n = len(split.x)
    return float(total_loss) / n, correct / n


def kernel_targets(one_hot: torch.Tensor, kernel_output: str) -> torch.Tensor:
    """Alignment targets in the kernel's layout: one-hot rows (N, K) for a trace kernel,
    the flattened one-hot vector (N*K,) with index ``i*K + a`` for a full kernel."""
    targets = one_hot.to(torch.float64)
    return targets.reshape(-1) if kernel_output == "full" else targets


Reduction = Literal["mean", "sum"]
POSITION_KEYS = ("chi_loss", "chi_net", "chi_pos", "chi_loss_raw", "chi_net_raw", "chi_batch_size")


def _check_observables(observables: Collection[str] | None, has_targets: bool) -> tuple[str, ...]:
    if observables is None:
        chosen = (
            OBSERVABLE_KEYS
            if has_targets
            else tuple(key for key in OBSERVABLE_KEYS if key not in ALIGNMENT_KEYS)
        )
        return chosen
    if isinstance(observables, str):
        observables = (observables,)
    chosen = tuple(observables)
    unknown = [key for key in chosen if key not in OBSERVABLE_KEYS]
    if unknown:
        raise NtkLensError(
            f"unknown observable {unknown[0]!r}; choose from {', '.join(OBSERVABLE_KEYS)}"
        )
    if not has_targets and any(key in ALIGNMENT_KEYS for key in chosen):
        raise NtkLensError("alignment needs targets; pass y_probe or drop the alignment keys")
    return chosen


def _check_position(spectral_position: bool | int) -> int | Literal[False] | None:
    """False (off), None (exact χ_net) or the number of Hutchinson probes (>= 2)."""
    if spectral_position is True:
        return None
    if spectral_position is False:
        return False
    if isinstance(spectral_position, int) and spectral_position >= 2:
        return spectral_position
    raise NtkLensError(
        f"spectral_position must be True (exact χ_net), False (off) or a number >= 2 of "
        f"Hutchinson probes; got {spectral_position!r}"
    )


class Probe:
    """The eNTK observables, parameter change and spectral position of ``model`` on demand.

    ``x_probe`` (N, ...) is the fixed probe set of the kernel. ``y_probe``, if given, are the
    alignment targets: integer class labels (N,) become one-hot rows over the model's K
    outputs; float targets (N, K) or (N,) are used as given. ``output`` is the kernel's
    layout ("trace": (N, N); "full": (N*K, N*K)). ``observables`` keeps only those keys of
    :data:`ntklens.observables.OBSERVABLE_KEYS` (all by default; an empty collection skips
    the kernel). ``spectral_position`` is True (exact χ_net), a number >= 2 (a Hutchinson
    estimate of χ_net with that many probes, adding ``chi_net_stderr``) or False (off).
    ``loss_reduction`` says how ``loss_fn`` reduces over the batch: "mean" normalizes χ_loss
    and χ_net by the batch size |B| as the seed authors do, "sum" leaves them raw.

    Calling the probe with ``(step, batch=(x, y), loss_fn=...)`` measures the model as it is
    now (in eval mode; its training flags are restored), returns the flat dict described in
    :mod:`ntklens.train.probes` and appends it to :attr:`history`. The first call fixes θ₀
    and the reference kernel Θ₀ of the change keys.

    Cost: one eNTK on N probe points (N·K Jacobian rows plus an N² contraction) and two
    eigendecompositions of the kernel; the exact χ_net takes the diagonal blocks of the
    trace eNTK on the batch (Hutchinson: one vector-Jacobian product per probe), plus one
    backward pass. ``benchmarks/train_speed.py`` measures it against a training step: for a
    784→W→W→10 MLP, 100 probe points and a batch of 128, one probe cost about 10 training
    steps at W = 512 and 15 at W = 128 (kernel ≈ 40%, spectral position ≈ 60%; one thread on
    a loaded 2-core machine), so a log schedule of 4 per decade over 1,000 steps (13 probes)
    adds roughly 13–20% to training.
    """

    def __init__(
        self,
        model: nn.Module,
        x_probe: torch.Tensor,
        y_probe: torch.Tensor | None = None,
        *,
        output: KernelOutput = "trace",
        observables: Collection[str] | None = None,
        spectral_position: bool | int = True,
        loss_fn: LossFn | None = None,
        loss_reduction: Reduction = "mean",
        method: KernelMethod = "auto",
        memory_budget: int | str = "2GiB",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise NtkLensError(
                f"model must be a torch.nn.Module, got {type(model).__name__}; pass the network"
            )
        if not isinstance(x_probe, torch.Tensor) or x_probe.ndim < 1 or len(x_probe) < 2:
            shape = tuple(x_probe.shape) if isinstance(x_probe, torch.Tensor) else None
            raise NtkLensError(
                f"x_probe must be a tensor of at least 2 inputs (N, ...); got "
                f"{type(x_probe).__name__} of shape {shape}"
            )
        if output not in KERNEL_OUTPUTS:
            raise NtkLensError(f"unknown output {output!r}; choose one of {KERNEL_OUTPUTS}")
        if loss_reduction not in ("mean", "sum"):
            raise NtkLensError(f"loss_reduction must be 'mean' or 'sum'; got {loss_reduction!r}")
        self.model = model
        self.x_probe = x_probe
        self.output: KernelOutput = output
        self.observables = _check_observables(observables, y_probe is not None)
        self._n_probes = _check_position(spectral_position)
        self.loss_fn = loss_fn
        self.loss_reduction: Reduction = loss_reduction
        self.method: KernelMethod = method
        self.memory_budget = memory_budget
        self.targets = None if y_probe is None else self._kernel_targets(y_probe)
        self.reference_kernel: torch.Tensor | None = None
        self.kernel: torch.Tensor | None = None
        self.spectra: list[Spectrum] = []
        self._theta0: torch.Tensor | None = None
        self._rows: list[dict[str, float]] = []

    def _kernel_targets(self, y_probe: torch.Tensor) -> torch.Tensor:
        """``y_probe`` in the kernel's layout (one-hot for integer labels), float64."""
        y = torch.as_tensor(y_probe, device=self.x_probe.device)
        if len(y) != len(self.x_probe):
            raise NtkLensError(
                f"y_probe has {len(y)} rows but x_probe has {len(self.x_probe)}; "
                "pass one target per probe input"
            )
        if not y.is_floating_point():
            with torch.no_grad(), eval_mode(self.model):
                n_outputs = self.model(self.x_probe[:1]).shape[-1]
            if y.ndim != 1 or int(y.min()) < 0 or int(y.max()) >= n_outputs:
                raise NtkLensError(
                    f"integer y_probe must be class labels (N,) in [0, {n_outputs}) for the "
                    f"model's {n_outputs} outputs; pass float targets for regression"
                )
            y = torch.nn.functional.one_hot(y.long(), n_outputs)
        return kernel_targets(y, self.output) if y.ndim == 2 else y.to(torch.float64)

    @property
    def history(self) -> pd.DataFrame:
        """One row per probe: ``step`` and every quantity returned so far."""
        return pd.DataFrame(self._rows)

    def __call__(
        self,
        step: int,
        batch: tuple[torch.Tensor, torch.Tensor] | None = None,
        loss_fn: LossFn | None = None,
    ) -> dict[str, float]:
        """Measure the model at ``step``; ``batch=(x, y)`` and ``loss_fn(model(x), y)`` (a
        scalar) give the spectral position. Returns the quantities and records them."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise NtkLensError(f"step must be a non-negative integer; got {step!r}")
        loss_fn = loss_fn if loss_fn is not None else self.loss_fn
        if self._n_probes is not False and (batch is None or loss_fn is None):
            raise NtkLensError(
                "the spectral position needs batch=(x, y) and loss_fn; pass both or create "
                "the Probe with spectral_position=False"
            )
        values: dict[str, float] = {}
        if self.observables:
            values.update(self._kernel_values(step))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        theta = parameters_to_vector(trainable).detach().double()
        if self._theta0 is None:
            self._theta0 = theta
        values["param_change"] = float(
            torch.linalg.vector_norm(theta - self._theta0) / torch.linalg.vector_norm(self._theta0)
        )
        if self._n_probes is not False:
            assert batch is not None and loss_fn is not None
            values.update(self._position_values(batch, loss_fn))
        self._rows.append({"step": step, **values})
        return values

    def _kernel_values(self, step: int) -> dict[str, float]:
        kernel = ntk(
            self.model,
            self.x_probe,
            output=self.output,
            method=self.method,
            memory_budget=self.memory_budget,
        )
        if self.reference_kernel is None:
            self.reference_kernel = kernel
        self.kernel = kernel
        observables, spectrum = kernel_observables_and_spectrum(
            kernel, self.targets, self.reference_kernel
        )
        self.spectra.append(Spectrum(step=step, kind="entk", values=spectrum))
        return {f"ntk_{key}": observables[key] for key in self.observables}

    def _position_values(
        self, batch: tuple[torch.Tensor, torch.Tensor], loss_fn: LossFn
    ) -> dict[str, float]:
        x, y = batch
        n_probes = None if self._n_probes is False else self._n_probes
        raw = spectral_position_matrix_free(self.model, x, y, loss_fn, n_probes=n_probes)
        size = len(x)
        position = raw.normalized(size) if self.loss_reduction == "mean" else raw
        values = {
            "chi_loss": position.chi_loss,
            "chi_net": position.chi_net,
            "chi_pos": position.chi_pos,
            "chi_loss_raw": raw.chi_loss,
            "chi_net_raw": raw.chi_net,
            "chi_batch_size": float(size),
        }
        if n_probes is not None:
            values["chi_net_stderr"] = position.chi_net_stderr
        return values


class Prober:
    """The built-in run's probe: train and test loss and accuracy plus a :class:`Probe`.

    ``probe_one_hot`` are the one-hot labels of ``probe_x``; ``position_batch`` is the
    training batch of the spectral position, whose χ_net is exact (no Hutchinson estimate).
    The batch has ``min(spectral_position_batch, n_train)`` examples (see
    :func:`position_batch`); χ_loss and χ_net are normalized by that size.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        train: Split,
        test: Split,
        probe_x: torch.Tensor,
        probe_one_hot: torch.Tensor,
        position_batch: Split,
        loss_fn: LossFn,
        kernel_output: KernelOutput,
    ) -> None:
        self.train = train
        self.test = test
        self.position_batch = position_batch
        self.loss_fn = loss_fn
        self.probe = Probe(model, probe_x, probe_one_hot, output=kernel_output, loss_fn=loss_fn)

    @property
    def kernel_targets(self) -> torch.Tensor | None:
        """The alignment targets in the kernel's layout."""
        return self.probe.targets

    @property
    def reference_kernel(self) -> torch.Tensor | None:
        """The step-0 eNTK on the probe set."""
        return self.probe.reference_kernel

    def measure(self, model: nn.Module, step: int) -> tuple[dict[str, float], Spectrum]:
        """Every probe quantity of ``model`` at ``step`` and the eNTK's eigen-spectrum.

        Raises :class:`NonFiniteLoss` before any kernel work if the train loss is not finite.
        """
        values: dict[str, float] = {}
        values["train_loss"], values["train_acc"] = evaluate(model, self.train, self.loss_fn)
        if not math.isfinite(values["train_loss"]):
            raise NonFiniteLoss(step, values["train_loss"])
        values["test_loss"], values["test_acc"] = evaluate(model, self.test, self.loss_fn)
        values.update(self.probe(step, batch=(self.position_batch.x, self.position_batch.targets)))
        return values, self.probe.spectra[-1]


def position_batch(train: Split, size: int) -> Split:
    """The spectral position's batch: the first ``min(size, n_train)`` training examples.

    The training subset is a prefix of one stratified permutation, so runs with
    ``n_train >= size`` share the same batch. Smaller subsets use all their examples; the
    normalized χ_loss and χ_net (per-example means) stay comparable, while χ_pos, whose flat
    spectrum gives 1/(|B|·K), is that of the smaller batch (``chi_batch_size`` records |B|).
    Repeating examples to reach ``size`` would not change it: χ_pos of a batch repeated m
    times equals that of the batch.
    """
    n = min(size, len(train.x))
    return Split(x=train.x[:n], labels=train.labels[:n], targets=train.targets[:n])

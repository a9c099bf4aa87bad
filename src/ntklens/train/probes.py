"""The probe schedule and what one probe measures while a network trains.

A probe records the train and test loss and accuracy, the eNTK on the fixed probe set with
every observable of :func:`ntklens.observables.kernel_observables` (the change keys against
the step-0 kernel), the spectral position on a training batch (matrix-free) and the relative
parameter change ‖θ − θ₀‖/‖θ₀‖.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from ntklens.kernel import ntk
from ntklens.observables import kernel_observables_and_spectrum, spectral_position_matrix_free
from ntklens.schema import Spectrum
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


class Prober:
    """Measures probes of one run; the first call (step 0) fixes θ₀ and the reference kernel.

    ``probe_one_hot`` are the one-hot labels of ``probe_x``; ``position_batch`` is the
    training batch of the spectral position, whose χ_net is exact (no Hutchinson estimate).
    """

    def __init__(
        self,
        *,
        train: Split,
        test: Split,
        probe_x: torch.Tensor,
        probe_one_hot: torch.Tensor,
        position_batch: Split,
        loss_fn: LossFn,
        kernel_output: str,
    ) -> None:
        self.train = train
        self.test = test
        self.probe_x = probe_x
        self.kernel_output = kernel_output
        self.kernel_targets = kernel_targets(probe_one_hot, kernel_output)
        self.position_batch = position_batch
        self.loss_fn = loss_fn
        self.reference_kernel: torch.Tensor | None = None
        self._theta0: torch.Tensor | None = None

    def measure(self, model: nn.Module, step: int) -> tuple[dict[str, float], Spectrum]:
        """Every probe quantity of ``model`` at ``step`` and the eNTK's eigen-spectrum.

        Raises :class:`NonFiniteLoss` before any kernel work if the train loss is not finite.
        """
        values: dict[str, float] = {}
        values["train_loss"], values["train_acc"] = evaluate(model, self.train, self.loss_fn)
        if not math.isfinite(values["train_loss"]):
            raise NonFiniteLoss(step, values["train_loss"])
        values["test_loss"], values["test_acc"] = evaluate(model, self.test, self.loss_fn)
        theta = parameters_to_vector(model.parameters()).detach().double()
        kernel = ntk(model, self.probe_x, output=self.kernel_output)
        if self.reference_kernel is None or self._theta0 is None:
            self.reference_kernel = kernel
            self._theta0 = theta
        values["param_change"] = float(
            torch.linalg.vector_norm(theta - self._theta0) / torch.linalg.vector_norm(self._theta0)
        )
        position = spectral_position_matrix_free(
            model,
            self.position_batch.x,
            self.position_batch.targets,
            self.loss_fn,
        )
        values["chi_loss"] = position.chi_loss
        values["chi_net"] = position.chi_net
        values["chi_pos"] = position.chi_pos
        observables, spectrum = kernel_observables_and_spectrum(
            kernel, self.kernel_targets, self.reference_kernel
        )
        values.update({f"ntk_{key}": value for key, value in observables.items()})
        return values, Spectrum(step=step, kind="entk", values=spectrum)

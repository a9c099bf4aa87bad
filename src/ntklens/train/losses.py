"""The training losses and the targets they take.

MSE here is half the squared error summed over outputs and averaged over examples,
``L = mean_i ½‖f(x_i) − onehot(y_i)‖²``: gradient descent on it converges to kernel
regression on one-hot targets, so the kernel baselines report their test loss with the
same function and the numbers compare directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_i ½‖outputs_i − targets_i‖²`` for outputs and one-hot targets of shape (N, K)."""
    return 0.5 * (outputs - targets).square().sum(dim=1).mean()


def cross_entropy_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of logits (N, K) against integer labels (N,), mean over N."""
    return F.cross_entropy(outputs, targets)


LOSSES: dict[str, LossFn] = {"mse": mse_loss, "cross_entropy": cross_entropy_loss}


def one_hot(labels: torch.Tensor, n_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot rows (N, K) of integer ``labels`` in ``dtype``."""
    return F.one_hot(labels, n_classes).to(dtype)


def loss_targets(
    loss: str, labels: torch.Tensor, n_classes: int, dtype: torch.dtype
) -> torch.Tensor:
    """What :data:`LOSSES` [``loss``] compares outputs with: one-hot rows or the labels."""
    return one_hot(labels, n_classes, dtype) if loss == "mse" else labels


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite at ``step``: the run diverged."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"loss became non-finite ({value}) at step {step}")
        self.step = step
        self.value = value

"""Output centering: train f(x; θ) − f(x; θ₀) instead of f(x; θ).

In the kernel regime a wide network's random initial output f(x; θ₀) is O(1) and never
trained away; it adds to the test error a term that has nothing to do with what the network
learned. Subtracting it is the standard remedy (e.g. Chizat, Oyallon & Bach 2019; Hu et al.
2020). :class:`CenteredModel` holds a frozen copy of the initial network, so the centered
output is exactly zero at step 0 and, because the copy has no trainable parameters, the
eNTK of the centered model is that of the original network at every step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class CenteredModel(nn.Module):
    """``model(x) − initial(x)``, with ``initial`` a frozen copy of ``model`` as it is now.

    Only ``model``'s parameters are trainable; the copy follows the wrapper's device, dtype
    and train/eval mode (so the two agree at step 0 in either mode). The copy's buffers (e.g.
    BatchNorm running statistics) still update in train mode, as the original's do.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.initial = copy.deepcopy(model).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) - self.initial(x)

"""The MLP width family: ``d → n → … → n → K`` with ``depth`` hidden layers."""

from __future__ import annotations

import math
from functools import partial
from typing import Unpack

import torch
from torch import nn
from torch.nn.utils import skip_init

from ntklens.models.width_model import FamilyArguments, WidthModel, positive_int


class MLP(WidthModel):
    """A fully connected network on flattened inputs.

    With ``x`` flattened to ``d`` features, ``φ`` the activation and ``m_w``, ``m_b`` the
    per-layer multipliers of the parameterization::

        h¹ = m_w¹ · W¹ x + m_b¹ · b¹,     hˡ⁺¹ = m_wˡ⁺¹ · Wˡ⁺¹ φ(hˡ) + m_bˡ⁺¹ · bˡ⁺¹,
        f = h^{depth+1}  (K outputs).

    Under ``ntk`` this is ``h¹ = σ_w/√d · W¹x + σ_b b¹``,
    ``hˡ⁺¹ = σ_w/√n · Wˡ⁺¹φ(hˡ) + σ_b bˡ⁺¹`` with every ``W, b ~ N(0, 1)``.
    """

    family = "mlp"

    def __init__(self, **arguments: Unpack[FamilyArguments]) -> None:
        super().__init__(**arguments)
        n_inputs = math.prod(positive_int("in_shape entry", s) for s in self.in_shape)
        n_outputs = self.n_outputs
        generator = torch.Generator().manual_seed(self.seed)
        self.net.append(nn.Flatten())
        sizes = [n_inputs] + [self.width] * self.depth + [n_outputs]
        kinds = ["input"] + ["hidden"] * (self.depth - 1) + ["output"]
        for index, kind in enumerate(kinds):
            fan_in, fan_out = sizes[index], sizes[index + 1]
            self._append_layer(
                partial(skip_init, nn.Linear, fan_in, fan_out),
                kind=kind,
                fan_in=fan_in,
                width_in=1 if kind == "input" else self.width,
                generator=generator,
            )
            if kind != "output":
                self.net.append(self._new_activation())

"""Parameterizations as explicit per-layer multipliers, init scales and learning-rate scales.

Every layer's weight is ``W = m · w`` with a trainable ``w ~ N(0, s²)`` and a per-layer
learning rate ``η · r``; the same holds for its bias. Following Yang & Hu, "Feature Learning
in Infinite-Width Neural Networks" (ICML 2021, arXiv 2011.14522), Sec. 3 and Table 3 (the
abc-parameterizations), the width ``n`` enters as ``m ∝ n^-a``, ``s ∝ n^-b`` and
``r ∝ n^-c``. :data:`ABC_TABLE` holds those exponents, one row per layer kind, for
``standard``, ``ntk`` and ``mup``; the Adam column of μP is the same parameterization
moved along the abc symmetry ``(a, b, c) → (a + θ, b − θ, c − θ)`` to the Adam μP of
Yang et al., "Tensor Programs V" (arXiv 2203.03466), Table 3.

The width-independent constants are ``σ_w · √(n_in / fan_in)`` for a weight (``n_in`` is
the part of the fan-in that grows with width: 1 for the input layer, ``n`` otherwise) and
``σ_b`` for a bias; :attr:`AbcRule.constant_in` says whether the constant goes into the
multiplier or into the init std. With it, ``ntk`` is exactly
``h = σ_w/√fan_in · W x + σ_b b`` with ``W, b ~ N(0, 1)``, the model that
:mod:`ntklens.infinite` describes.

Multipliers live outside the ``nn.Linear``/``nn.Conv2d`` modules (see :class:`Multiply`),
so hooks and ``torch.func`` see plain modules with plain parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam")
LAYER_KINDS = ("input", "hidden", "output", "bias", "output_bias")
DEFAULT_BIAS_STD = 0.1


@dataclass(frozen=True)
class AbcRule:
    """Width exponents of one layer kind: multiplier ``n^-a``, init std ``n^-b``, lr ``n^-c``."""

    a: float
    b: float
    c_sgd: float
    c_adam: float
    constant_in: Literal["multiplier", "init"]


# Rows: "input", "hidden", "output" weights; "bias" of the input and hidden layers;
# "output_bias" of the readout. Yang & Hu treat all biases like input weights (fan-in 1);
# the readout bias has constant fan-out, so under μP it keeps a = b = c = 0.
ABC_TABLE: dict[str, dict[str, AbcRule]] = {
    "standard": {
        "input": AbcRule(0.0, 0.0, 0.0, 0.0, "init"),
        "hidden": AbcRule(0.0, 0.5, 0.0, 0.0, "init"),
        "output": AbcRule(0.0, 0.5, 0.0, 0.0, "init"),
        "bias": AbcRule(0.0, 0.0, 0.0, 0.0, "init"),
        "output_bias": AbcRule(0.0, 0.0, 0.0, 0.0, "init"),
    },
    "ntk": {
        "input": AbcRule(0.0, 0.0, 0.0, 0.0, "multiplier"),
        "hidden": AbcRule(0.5, 0.0, 0.0, 0.0, "multiplier"),
        "output": AbcRule(0.5, 0.0, 0.0, 0.0, "multiplier"),
        "bias": AbcRule(0.0, 0.0, 0.0, 0.0, "multiplier"),
        "output_bias": AbcRule(0.0, 0.0, 0.0, 0.0, "multiplier"),
    },
    "mup": {
        "input": AbcRule(-0.5, 0.5, 0.0, 0.5, "multiplier"),
        "hidden": AbcRule(0.0, 0.5, 0.0, 1.0, "init"),
        "output": AbcRule(0.5, 0.5, 0.0, 0.5, "init"),
        "bias": AbcRule(-0.5, 0.5, 0.0, 0.5, "multiplier"),
        "output_bias": AbcRule(0.0, 0.0, 0.0, 0.0, "multiplier"),
    },
}


@dataclass(frozen=True)
class ParameterScales:
    """Forward multiplier, init std and per-optimizer lr scales of one parameter tensor."""

    multiplier: float
    init_std: float
    lr_scale: dict[str, float]


def default_weight_std(activation: str) -> float:
    """σ_w that keeps pre-activations O(1) with depth: √2 for ReLU (He), 1 otherwise."""
    return math.sqrt(2.0) if activation == "relu" else 1.0


def parameter_scales(
    parameterization: str, kind: str, *, width: int, constant: float
) -> ParameterScales:
    """Scales of one parameter of layer ``kind`` (a row of :data:`ABC_TABLE`) at ``width``.

    ``constant`` is the width-independent factor: ``σ_w · √(n_in / fan_in)`` for a weight,
    ``σ_b`` for a bias.
    """
    rule = ABC_TABLE[parameterization][kind]
    multiplier = width ** (-rule.a)
    init_std = width ** (-rule.b)
    if rule.constant_in == "multiplier":
        multiplier *= constant
    else:
        init_std *= constant
    lr_scale = {"sgd": width ** (-rule.c_sgd), "adam": width ** (-rule.c_adam)}
    return ParameterScales(multiplier=multiplier, init_std=init_std, lr_scale=lr_scale)


class Multiply(nn.Module):
    """Multiplies its input by a fixed factor: a forward multiplier kept outside the layer."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:.6g}"


def vector_lr_scale(parameterization: str, *, width: int) -> dict[str, float]:
    """Per-optimizer lr scales of a vector-like parameter kept at multiplier 1 and O(1) init
    (a normalization gain or shift), e.g. ``{"sgd": n, "adam": 1}`` under ``mup``.

    It is the "bias" row of :data:`ABC_TABLE` moved along the abc symmetry to ``a = 0``:
    ``θ = -a`` gives ``c_sgd - 2θ`` and ``c_adam - θ`` (the update ``ΔW`` of SGD scales with
    ``n^-(2a + c)``, that of Adam with ``n^-(a + c)``).
    """
    rule = ABC_TABLE[parameterization]["bias"]
    return {
        "sgd": width ** (-(rule.c_sgd + 2 * rule.a)),
        "adam": width ** (-(rule.c_adam + rule.a)),
    }

"""Infinite-width NNGP and NTK of deep ReLU and erf MLPs under the NTK parameterization.

The model is the ``ntk``-parameterized MLP of :mod:`ntklens.models`:
``h¹ = σ_w/√d · W¹x + σ_b b¹``, ``hˡ⁺¹ = σ_w/√n · Wˡ⁺¹φ(hˡ) + σ_b bˡ⁺¹`` with
``W, b ~ N(0, 1)`` and ``depth`` hidden layers. As ``n → ∞`` (Neal 1996; Lee et al.
2018; Jacot et al. 2018) each output is a Gaussian process with covariance ``Σ`` and the
eNTK tends to ``Θ ⊗ I_K``, where

    Σ¹(x, x') = σ_w² x·x'/d + σ_b²,                       Θ¹ = Σ¹,
    Σˡ⁺¹ = σ_w² E[φ(u)φ(v)] + σ_b²,    Σ̇ˡ⁺¹ = σ_w² E[φ'(u)φ'(v)],
    Θˡ⁺¹ = Σˡ⁺¹ + Θˡ · Σ̇ˡ⁺¹,

with ``(u, v) ~ N(0, [[Σˡ(x,x), Σˡ(x,x')], [Σˡ(x,x'), Σˡ(x',x')]])``. The Gaussian
expectations have closed forms: the arc-cosine kernels of Cho & Saul (2009) for ReLU and
Williams (1997) for erf. A trace eNTK (N × N) therefore tends to ``K · analytic_ntk``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from ntklens.errors import NtkLensError
from ntklens.models import MLP

Expectations = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


def _relu_expectations(
    cov: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``E[φ(u)φ(v)]``, ``E[φ'(u)φ'(v)]`` for φ = ReLU (arc-cosine kernels of order 1, 0).

    ``cov = Cov(u, v)``, ``var1 = Var u``, ``var2 = Var v``; shapes broadcast.
    """
    norms = torch.sqrt(var1 * var2)
    cos = torch.where(norms > 0, cov / norms, torch.ones_like(cov)).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    value = norms / (2 * math.pi) * (torch.sin(theta) + (math.pi - theta) * cos)
    derivative = (math.pi - theta) / (2 * math.pi)
    return value, derivative


def _erf_expectations(
    cov: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``E[φ(u)φ(v)]``, ``E[φ'(u)φ'(v)]`` for φ = erf (Williams 1997); as for ReLU."""
    scale = (1 + 2 * var1) * (1 + 2 * var2)
    value = 2 / math.pi * torch.arcsin((2 * cov / torch.sqrt(scale)).clamp(-1.0, 1.0))
    derivative = 4 / math.pi / torch.sqrt(scale - 4 * cov**2)
    return value, derivative


EXPECTATIONS: dict[str, Expectations] = {"relu": _relu_expectations, "erf": _erf_expectations}


def _batch(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` as float64 (N, d), one flattened example per row."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() < 2:
        raise NtkLensError(f"{name} must be a batch (N, ...), got shape {tuple(x.shape)}")
    return x.flatten(1)


def _input_covariance(
    a: torch.Tensor, b: torch.Tensor, same: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a bᵀ`` and the squared norms of the rows of ``a`` and ``b``, consistent to the bit.

    Near cos = 1 the ReLU recursion takes arccos, whose slope is infinite there: a covariance
    one rounding away from the variance of the same input becomes an angle of ~1e-8 and the
    NTK loses ~1e-8. So each distinct input gets one squared norm, and the covariance of two
    identical inputs (the diagonal, for one input set) is that same number.
    """
    cov = a @ b.T
    rows, inverse = torch.unique(a if same else torch.cat([a, b]), dim=0, return_inverse=True)
    squared = (rows * rows).sum(1)
    in_a = inverse[: len(a)]
    in_b = in_a if same else inverse[len(a) :]
    var1, var2 = squared[in_a], squared[in_b]
    identical = in_a[:, None] == in_b[None, :]
    return torch.where(identical, var1[:, None], cov), var1, var2


def _kernels(
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    *,
    depth: int,
    activation: str,
    weight_std: float,
    bias_std: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output-layer NNGP and NTK, both float64 (N1, N2)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise NtkLensError(f"depth must be a positive integer, got {depth!r}; pass depth >= 1")
    if activation not in EXPECTATIONS:
        raise NtkLensError(
            f"no closed-form kernel for activation {activation!r}; choose one of relu, erf"
        )
    if not (math.isfinite(weight_std) and weight_std > 0):
        raise NtkLensError(f"weight_std must be a positive number, got {weight_std!r}")
    if not (math.isfinite(bias_std) and bias_std >= 0):
        raise NtkLensError(f"bias_std must be a number >= 0, got {bias_std!r}")
    a = _batch("x1", x1)
    b = a if x2 is None else _batch("x2", x2)
    if a.shape[1] != b.shape[1]:
        raise NtkLensError(
            f"x1 and x2 have {a.shape[1]} and {b.shape[1]} features; pass inputs of one shape"
        )
    expectations = EXPECTATIONS[activation]
    w2, b2, d = weight_std**2, bias_std**2, a.shape[1]
    cov, var1, var2 = _input_covariance(a, b, x2 is None)
    cov, var1, var2 = w2 * cov / d + b2, w2 * var1 / d + b2, w2 * var2 / d + b2
    ntk = cov
    for _ in range(depth):
        value, derivative = expectations(cov, var1[:, None], var2[None, :])
        cov = w2 * value + b2
        ntk = cov + ntk * w2 * derivative
        var1 = w2 * expectations(var1, var1, var1)[0] + b2
        var2 = w2 * expectations(var2, var2, var2)[0] + b2
    return cov, ntk


def analytic_nngp(
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    depth: int,
    activation: str = "relu",
    weight_std: float,
    bias_std: float,
) -> torch.Tensor:
    """Infinite-width output covariance Σ(x1, x2) of one output, float64 (N1, N2).

    Inputs are flattened per example; ``x2=None`` means ``x2 = x1``.
    """
    return _kernels(
        x1, x2, depth=depth, activation=activation, weight_std=weight_std, bias_std=bias_std
    )[0]


def analytic_ntk(
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    depth: int,
    activation: str = "relu",
    weight_std: float,
    bias_std: float,
) -> torch.Tensor:
    """Infinite-width NTK Θ(x1, x2) of one output, float64 (N1, N2).

    The full eNTK of a K-output model tends to ``Θ ⊗ I_K``, its trace kernel to ``K · Θ``.
    Inputs are flattened per example; ``x2=None`` means ``x2 = x1``.
    """
    return _kernels(
        x1, x2, depth=depth, activation=activation, weight_std=weight_std, bias_std=bias_std
    )[1]


def infinite_kernel_for(
    model: torch.nn.Module,
) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """The analytic NTK ``(x1, x2) -> Θ`` of ``model``'s infinite-width limit, or None.

    A closed form exists for an ``ntk``-parameterized MLP with ReLU or erf; it uses the
    model's own depth, σ_w and σ_b.
    """
    if not (
        isinstance(model, MLP)
        and model.parameterization == "ntk"
        and model.activation in EXPECTATIONS
    ):
        return None
    return partial(
        analytic_ntk,
        depth=model.depth,
        activation=model.activation,
        weight_std=model.weight_std,
        bias_std=model.bias_std,
    )

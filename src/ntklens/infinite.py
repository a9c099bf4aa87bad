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


def _squared_norms(
    a: torch.Tensor, b: torch.Tensor, same: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared row norms of ``a`` and ``b``, one per distinct input, and each row's index
    among the distinct inputs (identical rows share it).

    Near cos = 1 the ReLU recursion takes arccos, whose slope is infinite there: a covariance
    one rounding away from the variance of the same input becomes an angle of ~1e-8 and the
    NTK loses ~1e-8. So each distinct input gets one squared norm, and the covariance of two
    identical inputs (the diagonal, for one input set) is set to that same number.
    """
    rows, inverse = torch.unique(a if same else torch.cat([a, b]), dim=0, return_inverse=True)
    squared = (rows * rows).sum(1)
    in_a = inverse[: len(a)]
    in_b = in_a if same else inverse[len(a) :]
    return squared[in_a], squared[in_b], in_a, in_b


#: Row blocks of the closed form hold at most this many entries: the recursion keeps about
#: ten temporaries of a block's size, so a 16,000² kernel peaks near its own 2 GB, not 20 GB.
BLOCK_ENTRIES = 2**22


def _kernels(
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    *,
    depth: int,
    activation: str,
    weight_std: float,
    bias_std: float,
    which: str,
) -> torch.Tensor:
    """The output layer's NNGP (``which="nngp"``) or NTK (``"ntk"``), float64 (N1, N2),
    computed in blocks of rows."""
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
    squared1, squared2, in_a, in_b = _squared_norms(a, b, x2 is None)
    # the variances per layer do not depend on the block: one list for each side
    variances1, variances2 = [w2 * squared1 / d + b2], [w2 * squared2 / d + b2]
    for _ in range(depth):
        for v in (variances1, variances2):
            v.append(w2 * expectations(v[-1], v[-1], v[-1])[0] + b2)
    out = torch.empty(len(a), len(b), dtype=torch.float64)
    step = max(1, BLOCK_ENTRIES // max(len(b), 1))
    for start in range(0, len(a), step):
        rows = slice(start, start + step)
        identical = in_a[rows, None] == in_b[None, :]
        cov = torch.where(identical, squared1[rows, None], a[rows] @ b.T)
        cov = w2 * cov / d + b2
        ntk = cov
        for layer in range(depth):
            value, derivative = expectations(
                cov, variances1[layer][rows, None], variances2[layer][None, :]
            )
            cov = w2 * value + b2
            if which == "ntk":
                ntk = cov + ntk * w2 * derivative
        out[rows] = ntk if which == "ntk" else cov
    return out


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
        x1,
        x2,
        depth=depth,
        activation=activation,
        weight_std=weight_std,
        bias_std=bias_std,
        which="nngp",
    )


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
        x1,
        x2,
        depth=depth,
        activation=activation,
        weight_std=weight_std,
        bias_std=bias_std,
        which="ntk",
    )


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

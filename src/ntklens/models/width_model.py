"""The base class of width families, their activations, and parameter and FLOP counts."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Required, TypedDict

import torch
from torch import nn
from torch.func import functional_call

from ntklens.errors import NtkLensError
from ntklens.models.layers import param_groups, scaled_parts
from ntklens.models.parameterization import DEFAULT_BIAS_STD, default_weight_std
from ntklens.schema import PARAMETERIZATIONS


class Erf(nn.Module):
    """The error function as an activation, the one with a closed-form infinite-width NTK."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.erf(x)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "erf": Erf,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


def positive_int(name: str, value: object) -> int:
    """``value`` as an int, or a one-line error naming ``name`` if it is not a positive int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise NtkLensError(f"{name} must be a positive integer, got {value!r}; pass {name} >= 1")
    return int(value)


def _choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise NtkLensError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    return str(value)


class FamilyArguments(TypedDict, total=False):
    """What every width family takes; see :func:`ntklens.models.build_model`."""

    width: Required[int]
    depth: Required[int]
    in_shape: Required[Sequence[int]]
    n_outputs: Required[int]
    parameterization: str
    activation: str
    weight_std: float | None
    bias_std: float | None
    seed: int


class WidthModel(nn.Module):
    """A network whose width ``n`` scales under an explicit abc-parameterization.

    Every weight layer is a plain ``nn.Linear``/``nn.Conv2d`` wrapped by fixed forward
    multipliers, ``h = m_b · layer(x · m_w / m_b) = m_w · W x + m_b · b``, so that its
    weight and its bias each get their own multiplier (see
    :mod:`ntklens.models.parameterization`) while hooks and ``torch.func`` see plain
    modules. A bias whose multiplier is 0 (``bias_std=0`` under ``ntk``/``mup``) is left
    out; then ``h = m_w · layer(x)``. Factors equal to 1 are omitted.
    """

    family: str

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        in_shape: Sequence[int],
        n_outputs: int,
        parameterization: str = "standard",
        activation: str = "relu",
        weight_std: float | None = None,
        bias_std: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.n_outputs = positive_int("n_outputs", n_outputs)
        self.seed = seed
        self.width = positive_int("width", width)
        self.depth = positive_int("depth", depth)
        self.parameterization = _choice("parameterization", parameterization, PARAMETERIZATIONS)
        self.activation = _choice("activation", activation, tuple(ACTIVATIONS))
        if weight_std is None:
            weight_std = default_weight_std(activation)
        if bias_std is None:
            bias_std = DEFAULT_BIAS_STD
        if not (math.isfinite(weight_std) and weight_std > 0):
            raise NtkLensError(f"weight_std must be a positive number, got {weight_std!r}")
        if not (math.isfinite(bias_std) and bias_std >= 0):
            raise NtkLensError(f"bias_std must be a number >= 0, got {bias_std!r}")
        self.weight_std = float(weight_std)
        self.bias_std = float(bias_std)
        self.net = nn.Sequential()
        self.lr_scales: dict[str, dict[str, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _new_activation(self) -> nn.Module:
        return ACTIVATIONS[self.activation]()

    def _append_layer(
        self,
        make_layer: Callable[..., nn.Module],
        *,
        kind: str,
        fan_in: int,
        width_in: int,
        generator: torch.Generator,
    ) -> None:
        """Append a weight layer of ``kind`` ("input" | "hidden" | "output"), initialized.

        ``make_layer(bias=...)`` builds the module without initializing it; ``width_in`` is
        the part of ``fan_in`` that grows with the width (1 for the input layer).
        """
        parts, index, scales = scaled_parts(
            make_layer,
            parameterization=self.parameterization,
            kind=kind,
            width=self.width,
            fan_in=fan_in,
            width_in=width_in,
            weight_std=self.weight_std,
            bias_std=self.bias_std,
            generator=generator,
        )
        name = f"net.{len(self.net) + index}"
        for part in parts:
            self.net.append(part)
        for parameter, scale in scales.items():
            self.lr_scales[f"{name}.{parameter}"] = scale.lr_scale

    def param_groups(self, base_lr: float, optimizer: str = "sgd") -> list[dict[str, Any]]:
        """One ``torch.optim`` group per parameter: ``{"params", "lr", "name"}``.

        ``lr`` is ``base_lr`` times the parameterization's per-layer scale for
        ``optimizer`` ("sgd" or "adam"; they differ only under ``mup``).
        """
        return param_groups(self, base_lr, optimizer)

    def extra_repr(self) -> str:
        return (
            f"family={self.family}, width={self.width}, depth={self.depth}, "
            f"parameterization={self.parameterization}, activation={self.activation}, "
            f"weight_std={self.weight_std:.6g}, bias_std={self.bias_std:.6g}"
        )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: nn.Module, in_shape: Sequence[int]) -> int:
    """Forward FLOPs of one example of shape ``in_shape``: 2 × multiply-adds of every
    ``nn.Linear`` and convolution, counted from layer sizes and output shapes.

    The shapes come from a forward pass on the ``meta`` device, so nothing is computed.
    """
    in_shape = tuple(positive_int("in_shape entry", s) for s in in_shape)
    flops = 0

    def count(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal flops
        if isinstance(module, nn.Linear):
            flops += 2 * module.in_features * output.numel()
        else:
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            flops += 2 * per_output * output.numel()

    counted = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, counted)]
    try:
        state = {
            name: torch.empty_like(t, device="meta")
            for name, t in (*model.named_parameters(), *model.named_buffers())
        }
        dtype = next(iter(state.values())).dtype if state else torch.get_default_dtype()
        example = torch.empty((1, *in_shape), device="meta", dtype=dtype)
        with torch.no_grad():
            functional_call(model, state, (example,))
    finally:
        for handle in handles:
            handle.remove()
    return flops

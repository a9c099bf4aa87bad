"""Parameterized building blocks for your own width-scaled networks (a ResNet, a ViT, ...).

Each block is a plain ``nn.Linear``/``nn.Conv2d`` between fixed forward multipliers (see
:class:`~ntklens.models.parameterization.Multiply`), initialized and learning-rate scaled
by the abc rules of :data:`~ntklens.models.parameterization.ABC_TABLE` at the model's
``width``: the same machinery as the built-in MLP and CNN families, so a network built
from them is NTK- or μP-parameterized exactly as those are. ``kind`` says how a layer's
fan-in grows: ``"input"`` (fixed fan-in, e.g. the stem on image channels), ``"hidden"``
(fan-in ∝ width) or ``"output"`` (the readout, see :func:`readout`).

Per-layer learning rates live on the blocks (their ``lr_scales``); :func:`param_groups`
collects them for ``torch.optim`` and gives every other parameter the base rate. Example::

    from ntklens.models import layers

    class Net(nn.Module):
        def __init__(self, width, parameterization, n_classes, input_shape):
            super().__init__()
            p = {"width": width, "parameterization": parameterization}
            self.stem = layers.Conv2d(input_shape[0], width, 3, padding=1, kind="input", **p)
            self.norm = layers.BatchNorm2d(width, **p)
            self.head = layers.readout(width, n_classes, **p)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, TypedDict, Unpack

import torch
from torch import nn
from torch.nn.utils import skip_init

from ntklens.errors import NtkLensError
from ntklens.models.parameterization import (
    DEFAULT_BIAS_STD,
    OPTIMIZERS,
    Multiply,
    ParameterScales,
    default_weight_std,
    parameter_scales,
    vector_lr_scale,
)
from ntklens.schema import PARAMETERIZATIONS

LAYER_KINDS = ("input", "hidden", "output")


def scaled_parts(
    make_layer: Callable[..., nn.Module],
    *,
    parameterization: str,
    kind: str,
    width: int,
    fan_in: int,
    width_in: int,
    weight_std: float,
    bias_std: float,
    generator: torch.Generator | None,
) -> tuple[list[nn.Module], int, dict[str, ParameterScales]]:
    """Build, initialize and wrap one weight layer: ``(modules, index of the layer, scales)``.

    ``make_layer(bias=...)`` builds the module without initializing it; ``width_in`` is the
    part of ``fan_in`` that grows with the width (1 for an input layer). The modules compute
    ``m_b · layer(x · m_w / m_b) = m_w · W x + m_b · b`` (factors equal to 1 left out; a bias
    whose multiplier is 0 is dropped, then ``m_w · layer(x)``). ``scales`` maps "weight" and
    "bias" to their :class:`ParameterScales`.
    """
    weight = parameter_scales(
        parameterization, kind, width=width, constant=weight_std * math.sqrt(width_in / fan_in)
    )
    bias = parameter_scales(
        parameterization,
        "output_bias" if kind == "output" else "bias",
        width=width,
        constant=bias_std,
    )
    has_bias = bias.multiplier != 0.0
    layer = make_layer(bias=has_bias)
    nn.init.normal_(layer.weight, 0.0, weight.init_std, generator=generator)
    in_factor, out_factor = weight.multiplier, 1.0
    scales = {"weight": weight}
    if has_bias:
        nn.init.normal_(layer.bias, 0.0, bias.init_std, generator=generator)
        in_factor, out_factor = weight.multiplier / bias.multiplier, bias.multiplier
        scales["bias"] = bias
    parts: list[nn.Module] = [Multiply(in_factor)] if in_factor != 1.0 else []
    index = len(parts)
    parts.append(layer)
    if out_factor != 1.0:
        parts.append(Multiply(out_factor))
    return parts, index, scales


def _check(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise NtkLensError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    return str(value)


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise NtkLensError(f"{name} must be a positive integer, got {value!r}; pass {name} >= 1")
    return value


class ScaleOptions(TypedDict, total=False):
    """The keyword options of every block (see :class:`Linear` for their defaults)."""

    parameterization: str
    kind: str
    weight_std: float | None
    bias_std: float | None
    generator: torch.Generator | None


class Scaled(nn.Sequential):
    """A weight layer between its forward multipliers; ``lr_scales`` maps the names of its
    parameters to their per-optimizer learning-rate scales (read by :func:`param_groups`)."""

    def __init__(
        self,
        make_layer: Callable[..., nn.Module],
        *,
        fan_in: int,
        width: int,
        parameterization: str = "standard",
        kind: str = "hidden",
        weight_std: float | None = None,
        bias_std: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        width = _positive("width", width)
        parameterization = _check("parameterization", parameterization, PARAMETERIZATIONS)
        kind = _check("kind", kind, LAYER_KINDS)
        weight_std = default_weight_std("relu") if weight_std is None else float(weight_std)
        bias_std = DEFAULT_BIAS_STD if bias_std is None else float(bias_std)
        if not (math.isfinite(weight_std) and weight_std > 0):
            raise NtkLensError(f"weight_std must be a positive number, got {weight_std!r}")
        if not (math.isfinite(bias_std) and bias_std >= 0):
            raise NtkLensError(f"bias_std must be a number >= 0, got {bias_std!r}")
        parts, index, scales = scaled_parts(
            make_layer,
            parameterization=parameterization,
            kind=kind,
            width=width,
            fan_in=fan_in,
            width_in=1 if kind == "input" else width,
            weight_std=weight_std,
            bias_std=bias_std,
            generator=generator,
        )
        super().__init__(*parts)
        self.kind, self.parameterization, self.width = kind, parameterization, width
        self.lr_scales = {f"{index}.{name}": s.lr_scale for name, s in scales.items()}

    @property
    def layer(self) -> nn.Module:
        """The wrapped ``nn.Linear``/``nn.Conv2d``."""
        return next(m for m in self if not isinstance(m, Multiply))


class Linear(Scaled):
    """``h = m_w · W x + m_b · b`` with ``W`` of shape (out, in), scaled at ``width``.

    ``options`` (:class:`ScaleOptions`): ``parameterization`` ("standard"), ``kind``
    ("hidden"), ``weight_std`` (√2, He for ReLU), ``bias_std`` (0.1) and ``generator``
    (None: torch's global generator) for the init.
    """

    def __init__(
        self, in_features: int, out_features: int, *, width: int, **options: Unpack[ScaleOptions]
    ) -> None:
        in_features = _positive("in_features", in_features)
        out_features = _positive("out_features", out_features)
        make = partial(skip_init, nn.Linear, in_features, out_features)
        super().__init__(make, fan_in=in_features, width=width, **options)


class Conv2d(Scaled):
    """A 2-D convolution ``h = m_w · W * x + m_b · b`` (fan-in ``C_in · k²``), scaled at
    ``width``; ``stride``, ``padding`` and ``groups`` as in ``nn.Conv2d``, ``options`` as
    for :class:`Linear`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        width: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        **options: Unpack[ScaleOptions],
    ) -> None:
        in_channels = _positive("in_channels", in_channels)
        out_channels = _positive("out_channels", out_channels)
        kernel_size = _positive("kernel_size", kernel_size)
        make = partial(
            skip_init,
            nn.Conv2d,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            groups=groups,
        )
        fan_in = in_channels // groups * kernel_size**2
        super().__init__(make, fan_in=fan_in, width=width, **options)


def readout(
    in_features: int, n_classes: int, *, width: int, **options: Unpack[ScaleOptions]
) -> Linear:
    """The output layer (``kind="output"``): under μP its multiplier is ``n^-1/2`` and its
    bias keeps a constant scale; ``options`` as for :class:`Linear` (but ``kind``)."""
    return Linear(in_features, n_classes, width=width, kind="output", **options)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose gain and shift get the learning-rate scales of a vector-like
    parameter (:func:`~ntklens.models.parameterization.vector_lr_scale`): under μP × width
    for SGD and × 1 for Adam; 1 under standard and ntk."""

    def __init__(
        self, num_features: int, *, width: int, parameterization: str = "standard", **options: Any
    ) -> None:
        super().__init__(_positive("num_features", num_features), **options)
        parameterization = _check("parameterization", parameterization, PARAMETERIZATIONS)
        scale = vector_lr_scale(parameterization, width=_positive("width", width))
        self.lr_scales = {name: scale for name, _ in self.named_parameters()}


def param_groups(model: nn.Module, base_lr: float, optimizer: str = "sgd") -> list[dict[str, Any]]:
    """One ``torch.optim`` group per parameter of ``model``: ``{"params", "lr", "name"}``.

    ``lr`` is ``base_lr`` times the scale that the module owning the parameter declares in
    its ``lr_scales`` for ``optimizer`` ("sgd" or "adam"); parameters of other modules
    (plain ``nn.Linear``, ...) get ``base_lr``.
    """
    if not (isinstance(base_lr, int | float) and math.isfinite(base_lr) and base_lr > 0):
        raise NtkLensError(f"base_lr must be a positive number, got {base_lr!r}")
    optimizer = _check("optimizer", optimizer, OPTIMIZERS)
    scale: dict[int, float] = {}
    for module in model.modules():
        for name, scales in getattr(module, "lr_scales", {}).items():
            scale[id(module.get_parameter(name))] = scales[optimizer]
    return [
        {"params": [parameter], "lr": base_lr * scale.get(id(parameter), 1.0), "name": name}
        for name, parameter in model.named_parameters()
    ]

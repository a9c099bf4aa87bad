"""Width-parameterized MLP and CNN families under explicit parameterizations.

:func:`build_model` makes a :class:`WidthModel`; its weights are plain ``nn.Linear`` and
``nn.Conv2d`` modules wrapped by fixed forward multipliers, so hooks and ``torch.func``
work on it unchanged. :meth:`WidthModel.param_groups` gives the per-layer learning rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ntklens.errors import NtkLensError
from ntklens.models.cnn import ConvNet
from ntklens.models.mlp import MLP
from ntklens.models.parameterization import ABC_TABLE
from ntklens.models.width_model import ACTIVATIONS, WidthModel, count_flops, count_parameters
from ntklens.schema import PARAMETERIZATIONS

FAMILIES: dict[str, type[WidthModel]] = {"mlp": MLP, "cnn": ConvNet}
FAMILY_OPTIONS: dict[str, tuple[str, ...]] = {
    "mlp": (),
    "cnn": ("kernel_size", "padding", "pooling"),
}

__all__ = [
    "ABC_TABLE",
    "ACTIVATIONS",
    "FAMILIES",
    "MLP",
    "PARAMETERIZATIONS",
    "ConvNet",
    "WidthModel",
    "build_model",
    "count_flops",
    "count_parameters",
]


def build_model(
    family: str,
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
    **family_options: Any,
) -> WidthModel:
    """A ``family`` ("mlp" | "cnn") network, initialized from ``seed``.

    ``depth`` counts hidden layers (conv blocks for "cnn"); ``weight_std`` defaults to √2
    for ReLU and 1 otherwise, ``bias_std`` to 0.1. ``family_options`` go to the family:
    "cnn" takes ``kernel_size`` (3), ``padding`` (1) and ``pooling`` ("none" | "avg" | "max").
    """
    if family not in FAMILIES:
        raise NtkLensError(f"unknown model family {family!r}; choose one of mlp, cnn")
    unknown = sorted(set(family_options) - set(FAMILY_OPTIONS[family]))
    if unknown:
        allowed = ", ".join(FAMILY_OPTIONS[family]) or "none"
        raise NtkLensError(f"{family} takes no option {', '.join(unknown)}; its options: {allowed}")
    return FAMILIES[family](
        width=width,
        depth=depth,
        in_shape=in_shape,
        n_outputs=n_outputs,
        parameterization=parameterization,
        activation=activation,
        weight_std=weight_std,
        bias_std=bias_std,
        seed=seed,
        **family_options,
    )

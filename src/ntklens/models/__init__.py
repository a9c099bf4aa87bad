"""Width-parameterized MLP and CNN families, the building blocks of your own, and factories.

:func:`build_model` makes a :class:`WidthModel` of a built-in family, or calls your
factory (see :mod:`ntklens.models.factory`); the weights are plain ``nn.Linear`` and
``nn.Conv2d`` modules wrapped by fixed forward multipliers, so hooks and ``torch.func``
work on them unchanged. :mod:`ntklens.models.layers` holds those blocks for your own
networks, and :func:`param_groups` gives the per-layer learning rates of any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ntklens.errors import NtkLensError
from ntklens.models import layers
from ntklens.models.cnn import ConvNet
from ntklens.models.factory import model_from_factory
from ntklens.models.layers import param_groups
from ntklens.models.mlp import MLP
from ntklens.models.parameterization import ABC_TABLE
from ntklens.models.width_model import ACTIVATIONS, WidthModel, count_flops, count_parameters
from ntklens.schema import PARAMETERIZATIONS, RunSpec, is_reference

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
    "build_spec_model",
    "count_flops",
    "count_parameters",
    "layers",
    "model_from_factory",
    "param_groups",
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
) -> nn.Module:
    """A ``family`` ("mlp" | "cnn") network, initialized from ``seed``.

    ``depth`` counts hidden layers (conv blocks for "cnn"); ``weight_std`` defaults to √2
    for ReLU and 1 otherwise, ``bias_std`` to 0.1. ``family_options`` go to the family:
    "cnn" takes ``kernel_size`` (3), ``padding`` (1) and ``pooling`` ("none" | "avg" | "max").
    Your own model: :func:`build_spec_model` (a run's family or factory) or
    :func:`~ntklens.models.factory.model_from_factory`.
    """
    if family not in FAMILIES:
        raise NtkLensError(
            f"unknown model family {family!r}; choose one of mlp, cnn, or give a factory "
            "'package.module:function' to build_spec_model"
        )
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


def build_spec_model(spec: RunSpec, in_shape: Sequence[int], n_outputs: int) -> nn.Module:
    """The network of a run: its family or factory with the spec's options, seeded by it.

    A factory gets ``spec.model_kwargs`` as its ``**options`` (any names, ``depth``
    included); a family gets the spec's depth, activation and stds, and the options.
    """
    common = {"width": spec.width, "parameterization": spec.parameterization, "seed": spec.seed}
    if is_reference(spec.model):
        options = spec.model_kwargs
        return model_from_factory(
            spec.model, n_classes=n_outputs, input_shape=in_shape, options=options, **common
        )
    return build_model(
        spec.model,
        depth=spec.depth,
        in_shape=in_shape,
        n_outputs=n_outputs,
        activation=spec.activation,
        weight_std=spec.weight_std,
        bias_std=spec.bias_std,
        **common,
        **spec.model_kwargs,
    )

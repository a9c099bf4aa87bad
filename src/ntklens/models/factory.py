"""Your own model in a study: a factory "package.module:function" (or "file.py:function").

A factory is called as ``factory(width=..., parameterization=..., n_classes=...,
input_shape=..., **options)`` and returns an ``nn.Module`` mapping a batch of inputs of
shape ``(B, *input_shape)`` to logits ``(B, n_classes)``. Its initialization is drawn from
torch's global generator seeded with the run's seed (inside ``torch.random.fork_rng``, so
the caller's random state is untouched). A factory without a ``parameterization``
parameter (and no ``**kwargs``) supports ``"standard"`` only. Build it from
:mod:`ntklens.models.layers` to get the NTK and μP parameterizations and their
per-layer learning rates.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ntklens.errors import ConfigError, describe
from ntklens.schema import PARAMETERIZATIONS, load_reference

WHAT = "model factory"
REQUIRED = ("width", "n_classes", "input_shape")


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return None  # a builtin or C callable: nothing to check


def supported_parameterizations(factory: Callable[..., Any]) -> tuple[str, ...]:
    """All parameterizations if ``factory`` takes ``parameterization``, else ("standard",)."""
    signature = _signature(factory)
    if signature is None:
        return PARAMETERIZATIONS
    parameters = signature.parameters.values()
    takes = any(p.name == "parameterization" or p.kind is p.VAR_KEYWORD for p in parameters)
    return PARAMETERIZATIONS if takes else ("standard",)


def load_factory(reference: str, options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """Import the factory and check that it can be called with the study's arguments."""
    factory = load_reference(reference, WHAT)
    signature = _signature(factory)
    if signature is not None:
        names = {*REQUIRED, *(options or {})}
        if len(supported_parameterizations(factory)) > 1:
            names.add("parameterization")
        try:
            signature.bind(**dict.fromkeys(names))
        except TypeError as error:
            shown = ", ".join(f"{name}=..." for name in sorted(names))
            raise ConfigError(
                f"{WHAT} {reference!r} cannot be called as factory({shown}): {error}; "
                "give it keyword parameters width, n_classes, input_shape (and parameterization)"
            ) from None
    return factory


def model_from_factory(
    reference: str,
    *,
    width: int,
    parameterization: str,
    n_classes: int,
    input_shape: Sequence[int],
    options: dict[str, Any] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build the factory's model at ``width``, its init seeded by ``seed``."""
    options = dict(options or {})
    factory = load_factory(reference, options)
    supported = supported_parameterizations(factory)
    if parameterization not in supported:
        raise ConfigError(
            f"{WHAT} {reference!r} takes no 'parameterization' argument, so it supports "
            f"'standard' only, not {parameterization!r}; drop {parameterization!r} from the "
            "sweep or add a parameterization parameter (see ntklens.models.layers)"
        )
    arguments = {"width": width, "n_classes": n_classes, "input_shape": tuple(input_shape)}
    if len(supported) > 1:
        arguments["parameterization"] = parameterization
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(**arguments, **options)
        except Exception as error:
            raise ConfigError(
                f"{WHAT} {reference!r} raised {describe(error)} (width={width}, "
                f"parameterization={parameterization!r}); fix the factory"
            ) from error
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{WHAT} {reference!r} returned a {type(model).__name__}, not a torch.nn.Module; "
            "return the model"
        )
    return model


def check_output_shape(
    model: nn.Module, reference: str, input_shape: Sequence[int], n_classes: int
) -> None:
    """Raise a one-line error unless ``model`` maps ``(2, *input_shape)`` to ``(2, n_classes)``."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ConfigError(f"{WHAT} {reference!r} returned a model without parameters")
    x = torch.zeros((2, *input_shape), dtype=parameter.dtype)
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as error:
        raise ConfigError(
            f"{WHAT} {reference!r}: the model fails on inputs of shape {tuple(x.shape)} "
            f"({describe(error)}); make it take input_shape={tuple(input_shape)}"
        ) from error
    finally:
        model.train(was_training)
    shape = tuple(getattr(out, "shape", ()))
    if shape != (2, n_classes):
        raise ConfigError(
            f"{WHAT} {reference!r}: outputs of shape {shape} for inputs {tuple(x.shape)}; "
            f"it must return logits of shape (batch, {n_classes}) for the {n_classes} classes"
        )

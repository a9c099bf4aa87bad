"""Checks of user arguments, raised as one-line errors before any work starts."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ntklens.errors import NtkLensError


def check_model(model: object) -> nn.Module:
    """``model`` must be an ``nn.Module`` with at least one trainable parameter."""
    if not isinstance(model, nn.Module):
        raise NtkLensError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; "
            "pass the network itself, not its output or state_dict"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise NtkLensError(
            "model has no trainable parameters (requires_grad=True); "
            "the eNTK is taken with respect to trainable parameters"
        )
    return model


def check_input(name: str, x: object) -> Tensor:
    """``x`` must be a tensor with a non-empty leading batch dimension."""
    if not isinstance(x, Tensor):
        raise NtkLensError(
            f"{name} must be a torch.Tensor of shape (N, ...), got {type(x).__name__}"
        )
    if x.dim() == 0 or x.shape[0] == 0:
        raise NtkLensError(
            f"{name} must have a non-empty batch dimension first, got shape {tuple(x.shape)}"
        )
    return x


def check_pair(x1: Tensor, x2: Tensor) -> Tensor:
    """``x2`` must have the per-sample shape of ``x1``; returns it."""
    if x2.shape[1:] != x1.shape[1:]:
        raise NtkLensError(
            f"x2 has per-sample shape {tuple(x2.shape[1:])} but x1 has "
            f"{tuple(x1.shape[1:])}; both must be inputs to the same model"
        )
    return x2


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """``value`` must be one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        raise NtkLensError(f"unknown {name} {value!r}; choose one of {listed}")
    return str(value)


def check_dtype(dtype: object) -> torch.dtype | None:
    """``dtype`` must be None or a floating-point torch dtype."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise NtkLensError(
            f"dtype must be a floating-point torch.dtype such as torch.float64, got {dtype!r}"
        )
    return dtype


def check_output_fn(output_fn: object) -> Callable[[object], Tensor] | None:
    """``output_fn`` must be None or a callable."""
    if output_fn is not None and not callable(output_fn):
        raise NtkLensError(
            f"output_fn must be a function of the model's output, got {type(output_fn).__name__}"
        )
    return output_fn  # type: ignore[return-value]


def forward_error(name: str, x: Tensor, error: Exception) -> Exception:
    """A one-line error for a model that fails on an integer or 1-D ``x``, else ``error``."""
    first = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
    if not x.is_floating_point():
        return NtkLensError(
            f"{name} has dtype {x.dtype} and the model failed on it ({first}); pass "
            f"{name}.float() if the model takes real-valued inputs"
        )
    if x.dim() == 1:
        return NtkLensError(
            f"{name} has shape {tuple(x.shape)} and the model failed on it ({first}); put the "
            f"batch dimension first: {name}.unsqueeze(1) for N scalar inputs, "
            f"{name}.unsqueeze(0) for one sample"
        )
    return error

"""Parametrized tensors (``torch.nn.utils.parametrize``): structured through the weight.

A parametrization computes a module's tensor ``W = f(θ)`` from trainable originals θ
(``spectral_norm``, ``orthogonal`` or a user's own). The layer-wise rules record the uses of
the materialized ``W`` (computed once per forward pass under ``parametrize.cached()``), form
the per-sample gradients ∂f_k(x)/∂W, and pull them back to θ through ``f``'s vector-Jacobian
product, batched over samples and outputs: ∂f_k(x)/∂θ = J_fᵀ ∂f_k(x)/∂W, exact for any
differentiable ``f``. ``weight_norm`` (over dim 0) has its own cheaper rule (a Gram and a
rank-C term): its weight is materialized the same way, tracked as derived from (v, g).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrize

from ntklens.kernel.rules import WeightNorm


@dataclass(frozen=True)
class Materialized:
    """One parametrized tensor: ``key`` (e.g. "fc.weight"), the tensor's ``shape``, its
    module and name there, and its trainable originals (full names, and names local to the
    module's ``ParametrizationList``)."""

    key: str
    shape: torch.Size
    module: nn.Module
    tensor_name: str
    originals: tuple[str, ...]
    local: tuple[str, ...]
    via: str


@dataclass(frozen=True)
class WeightNormed:
    """A tensor parametrized by ``weight_norm`` over dim 0 alone: ``key`` as the recorder
    names a derived weight, its module and name there, and its (v, g)."""

    key: str
    module: nn.Module
    tensor_name: str
    norm: WeightNorm


def _weight_norm_alone(chain: nn.Module) -> bool:
    return [type(p).__name__ for p in chain] == ["_WeightNorm"] and chain[0].dim == 0


def find_materialized(model: nn.Module, params: dict[str, Tensor]) -> dict[str, Materialized]:
    """The model's parametrized tensors whose originals are all trainable, by key; those
    parametrized by ``weight_norm`` alone are left to the weight-norm rule."""
    found: dict[str, Materialized] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, chain in module.parametrizations.items():
            kinds = [type(p).__name__ for p in chain]
            if _weight_norm_alone(chain):
                continue
            local = tuple(n for n, _ in chain.named_parameters(recurse=False))
            prefix = f"{module_name}." if module_name else ""
            originals = tuple(f"{prefix}parametrizations.{tensor_name}.{n}" for n in local)
            if not local or not all(n in params for n in originals):
                continue
            key = f"{prefix}{tensor_name}"
            with torch.no_grad():
                shape = getattr(module, tensor_name).shape
            via = " ∘ ".join(k.lstrip("_") for k in kinds)
            found[key] = Materialized(key, shape, module, tensor_name, originals, local, via)
    return found


def find_weight_norms(model: nn.Module, params: dict[str, Tensor]) -> dict[str, WeightNormed]:
    """The model's tensors parametrized by ``weight_norm`` (dim 0) alone with trainable
    (v, g), by the key the weight-norm rule tracks them under."""
    found: dict[str, WeightNormed] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        prefix = f"{module_name}." if module_name else ""
        for tensor_name, chain in module.parametrizations.items():
            v, g = (f"{prefix}parametrizations.{tensor_name}.original{i}" for i in (1, 0))
            if _weight_norm_alone(chain) and v in params and g in params:
                norm = WeightNorm(v, g, 0)
                key = f"weight_norm({v}, {g})"
                found[key] = WeightNormed(key, module, tensor_name, norm)
    return found


@contextmanager
def materialized(
    entries: dict[str, Materialized], weight_norms: dict[str, WeightNormed]
) -> Iterator[dict[str, Tensor]]:
    """Inside ``parametrize.cached()``: each parametrized tensor computed once, here, so
    that the forward pass reads that same tensor and a recorder can track it by identity
    (and a forward pass does not repeat per-call work)."""
    if not entries and not weight_norms:
        yield {}
        return
    found = [(key, m.module, m.tensor_name) for key, m in entries.items()]
    found += [(key, w.module, w.tensor_name) for key, w in weight_norms.items()]
    with parametrize.cached():
        with torch.enable_grad():  # the uses' outputs must be on the autograd graph
            weights = {key: getattr(module, name) for key, module, name in found}
        yield weights


def pull_back(entry: Materialized, grads: Tensor) -> list[Tensor]:
    """Per-sample gradients (T, K, |W|) of the tensor, in its own layout, as per-sample
    gradients (T, K, |θ_i|) of each original, through the parametrization's vjp."""
    chain = entry.module.parametrizations[entry.tensor_name]
    primals = tuple(getattr(chain, name).detach() for name in entry.local)

    def forward(*originals: Tensor) -> Tensor:
        return functional_call(chain, dict(zip(entry.local, originals, strict=True)), ())

    t, k = grads.shape[:2]
    with torch.enable_grad(), warnings.catch_warnings():
        # vmap warns where a parametrization's backward has no batching rule (tril_ in
        # orthogonal's): the fallback loop it takes is still exact
        warnings.filterwarnings("ignore", message="There is a performance drop")
        _, pullback = vjp(forward, *primals)
        pulled = vmap(pullback)(grads.reshape(t * k, *entry.shape))
    return [g.reshape(t, k, -1) for g in pulled]

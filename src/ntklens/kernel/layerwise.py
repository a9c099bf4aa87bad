"""The eNTK from the structured Gram identity of Linear and Conv layers.

A weight W used as ``out = W a`` (at positions l: rows of a Linear input, patches of a
convolution) has the per-sample gradient ∂f_a(x_i)/∂W = Σ_l G_{ial} ⊗ A_{il}, with A the
layer input and G the cotangent of its output. Its kernel contribution is therefore

    Θ_W[(i,a),(j,b)] = Σ_{l,m} (A_il · A_jm) (G_ial · G_jbm),

which for one position is (A Aᵀ) ⊙ (G Gᵀ): Grams of small matrices in place of a
contraction over all of W's entries. A bias is a weight on a constant input 1: it adds 1
to every entry of A's Gram, or its per-sample gradient is Σ_l G_{ial}. Every call of
``F.linear``/``F.conv1d``/``F.conv2d`` on a trainable weight is recorded (a torch
function mode sees module and functional calls alike); calls of the same weight
concatenate along positions, which makes the cross-call terms of shared weights exact.
Where positions are many, the per-sample weight gradient Σ_l G ⊗ A is formed instead and
contracted like a Jacobian, whichever costs fewer FLOPs. Parameters used in any other way
(norms, embeddings, free tensors) get exact per-sample Jacobians restricted to them
(:mod:`ntklens.kernel.jacobian`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ntklens.kernel.functional import ModelProbe, probe_model, trainable_parameters
from ntklens.kernel.jacobian import (
    add_jacobian_product,
    empty_block,
    jacobian_cost,
    per_sample_jacobians,
)
from ntklens.kernel.tiling import Cost, Footprint, TiledKernel

#: Spatial dimensions of the supported calls (0: linear).
_SPATIAL_DIMS = {F.linear: 0, F.conv1d: 1, F.conv2d: 2}
_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


@dataclass(eq=False)
class _Call:
    """One recorded linear or convolution call on a trainable weight or bias.

    ``inputs``: (T, Gr, D, L) rows or patches per group of channels, L the positions
    (None when the weight is not differentiated); ``output``: the call's output, for its
    cotangents; ``spatial``: 0 for a linear call, else the convolution's spatial dims.
    """

    weight: str | None
    bias: str | None
    inputs: Tensor | None
    output: Tensor
    groups: int
    spatial: int

    def cotangents(self, grad: Tensor) -> Tensor:
        """(K, T, *out) cotangents of the output as (T, K, Gr, C, L)."""
        k, t = grad.shape[:2]
        if self.spatial == 0:
            return grad.reshape(k, t, 1, -1, grad.shape[-1]).permute(1, 0, 2, 4, 3)
        return grad.reshape(k, t, self.groups, grad.shape[2] // self.groups, -1).transpose(0, 1)


class _Recorder(TorchFunctionMode):
    """Records supported calls on tracked parameters and flags all other uses of them.

    A recorded call's output is handed on as a copy, so that in-place operations after it
    cannot change the tensor whose cotangents are taken.
    """

    def __init__(self, params: dict[str, Tensor], batch: int) -> None:
        super().__init__()
        self.names = {id(p): name for name, p in params.items()}
        self.params = params
        self.batch = batch
        self.calls: list[_Call] = []
        self.other_uses: set[str] = set()

    def name_of(self, tensor: Any) -> str | None:
        name = self.names.get(id(tensor))
        return name if name is not None and self.params[name] is tensor else None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        recorded: tuple[Any, ...] = ()
        if func in _SPATIAL_DIMS:
            bound = dict(zip(_ARG_NAMES, args, strict=False)) | kwargs
            call = self._record(_SPATIAL_DIMS[func], bound, out)
            if call is not None:
                self.calls.append(call)
                recorded = (bound["weight"], bound.get("bias"))
                out = out.clone()
        if any(isinstance(t, Tensor) and t.requires_grad for t in tree_leaves(out)):
            for leaf in tree_leaves((args, kwargs)):
                name = self.name_of(leaf)
                if name is not None and not any(leaf is r for r in recorded):
                    self.other_uses.add(name)
        return out

    def _record(self, spatial: int, bound: dict[str, Any], out: Tensor) -> _Call | None:
        x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
        weight_name = self.name_of(weight)
        bias_name = self.name_of(bias) if bias is not None else None
        if weight_name is None and bias_name is None:
            return None
        per_sample = x.dim() >= 2 if spatial == 0 else x.dim() == spatial + 2
        if not per_sample or x.shape[0] != self.batch:
            return None
        groups = int(bound.get("groups", 1))
        inputs = None
        if weight_name is not None:
            x = x.detach()
            if spatial == 0:
                inputs = x.reshape(len(x), 1, -1, x.shape[-1]).transpose(2, 3)
            else:
                inputs = _patches(x, weight.shape[2:], bound, groups)
        return _Call(weight_name, bias_name, inputs, out, groups, spatial)


def _patches(x: Tensor, kernel: tuple[int, ...], bound: dict[str, Any], groups: int) -> Tensor:
    """The (T, Gr, D, L) input patches that a convolution multiplies with its weight.

    D runs over (input channel, kernel offsets) like the weight's entries, L over output
    positions. Built from strided views and one copy (faster than ``F.unfold`` on CPU).
    """
    spatial = len(kernel)

    def per_dim(value: Any) -> tuple[int, ...]:
        return (value,) * spatial if isinstance(value, int) else tuple(value)

    stride, dilation = per_dim(bound.get("stride", 1)), per_dim(bound.get("dilation", 1))
    padding = bound.get("padding", 0)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        pads = [p for total in reversed(totals) for p in (total // 2, total - total // 2)]
    elif padding == "valid":
        pads = []
    else:
        pads = [p for p in reversed(per_dim(padding)) for _ in range(2)]
    if any(pads):
        x = F.pad(x, pads)
    windows = x
    for dim, (k, s, d) in enumerate(zip(kernel, stride, dilation, strict=True)):
        windows = windows.unfold(2 + dim, d * (k - 1) + 1, s)
    windows = windows[(..., *(slice(None, None, d) for d in dilation))]
    offsets = range(2 + spatial, 2 + 2 * spatial)
    positions = range(2, 2 + spatial)
    windows = windows.permute(0, 1, *offsets, *positions)
    return windows.reshape(len(x), groups, -1, math.prod(windows.shape[2 + spatial :]))


@dataclass(frozen=True)
class _Group:
    """Parameters whose kernel comes from one set of calls.

    ``weight`` (with ``bias`` folded in as a constant input 1 when ``mode`` is "gram"), or
    ``bias`` alone. "gram" keeps inputs and cotangents and contracts their Grams; "grads"
    forms per-sample gradients and contracts them like Jacobians.
    """

    weight: str | None
    bias: str | None
    mode: Literal["gram", "grads"]
    n_groups: int
    positions: int
    in_dim: int
    out_dim: int

    def calls(self, calls: list[_Call]) -> list[_Call]:
        if self.weight is not None:
            return [c for c in calls if c.weight == self.weight]
        return [c for c in calls if c.bias == self.bias]


@dataclass
class GramFeatures:
    """A weight's inputs (T, Gr, D, L) and output cotangents (T, K, Gr, C, L).

    ``bias``: the bias is folded in, as an input that is 1 at every position.
    """

    inputs: Tensor
    cotangents: Tensor
    bias: bool

    def __getitem__(self, rows: slice) -> GramFeatures:
        return GramFeatures(self.inputs[rows], self.cotangents[rows], self.bias)


@dataclass
class LayerwisePlan:
    """How each trainable parameter's share of the kernel is computed.

    Built from one recorded forward pass on a few samples (:meth:`probe`).
    """

    groups: list[_Group]
    fallback: list[str]
    n_outputs: int
    full: bool
    params: dict[str, Tensor] = field(repr=False)

    @classmethod
    def probe(
        cls, model: nn.Module, x: Tensor, n_pairs: float, full: bool
    ) -> tuple[LayerwisePlan, ModelProbe]:
        """Record the model's calls on ``x[:2]`` and choose a mode per parameter group.

        ``n_pairs`` (sample pairs per sample featurized) weighs per-sample work against
        per-pair work in that choice. The same forward pass measures the model's
        per-sample costs, returned with the plan.
        """
        params = trainable_parameters(model)
        recorder = _Recorder(params, len(x[:2]))
        probe = probe_model(model, x[:2], also=recorder)
        weight_calls: dict[str, list[_Call]] = defaultdict(list)
        bias_calls: dict[str, list[_Call]] = defaultdict(list)
        for call in recorder.calls:
            if call.weight is not None and call.weight not in recorder.other_uses:
                weight_calls[call.weight].append(call)
            if call.bias is not None and call.bias not in recorder.other_uses:
                bias_calls[call.bias].append(call)
        k = probe.n_outputs
        groups = []
        for weight, used in weight_calls.items():
            bias = used[0].bias
            inputs = [c.inputs for c in used if c.inputs is not None]
            group = _cheaper_mode(
                _Group(
                    weight,
                    bias if bias in bias_calls and bias_calls[bias] == used else None,
                    "gram",
                    n_groups=used[0].groups,
                    positions=sum(a.shape[-1] for a in inputs),
                    in_dim=inputs[0].shape[2],
                    out_dim=params[weight].shape[0] // used[0].groups,
                ),
                k,
                n_pairs,
                full,
            )
            if group.bias is not None:
                del bias_calls[group.bias]
            groups.append(group)
        for bias in bias_calls:
            groups.append(_Group(None, bias, "grads", 1, 1, 1, params[bias].numel()))
        covered = {name for g in groups for name in (g.weight, g.bias) if name is not None}
        fallback = [name for name in params if name not in covered]
        return cls(groups, fallback, k, full, params), probe

    def cost(self, probe: ModelProbe) -> Cost:
        """Work and memory: capture passes, Gram or gradient features, fallback Jacobians."""
        k, size = self.n_outputs, probe.element_size
        # a forward pass and K backward passes that skip weight gradients
        feature_flops = (1 + k) * probe.forward_flops if self.groups else 0.0
        matmul_flops = pair_flops = feature = work = largest_pair = 0.0
        for g in self.groups:
            f_flops, p_flops, f_elems, p_elems = _group_costs(g, k, self.full)
            matmul_flops += f_flops
            pair_flops += p_flops
            feature += f_elems * size
            work += g.n_groups * g.positions * (g.in_dim + k * g.out_dim) * size
            largest_pair = max(largest_pair, p_elems * size)
        if self.groups:
            work += (2 + k) * probe.activation_bytes
        if self.fallback:
            n_fallback = sum(self.params[name].numel() for name in self.fallback)
            jac = jacobian_cost(probe, n_fallback, self.full)
            feature_flops += jac.feature_flops
            pair_flops += jac.pair_flops
            feature += jac.footprint.feature
            work += jac.footprint.work
        k_pair = k * k if self.full else 1
        footprint = Footprint(feature, work, 2 * k_pair * size + largest_pair)
        return Cost(feature_flops, pair_flops, footprint, matmul_flops)

    def kernel(self, model: nn.Module) -> TiledKernel[list[Tensor | GramFeatures]]:
        """The tiled kernel: features per tile, contracted group by group."""
        return TiledKernel(lambda x: self.features(model, x), self.contract)

    def features(self, model: nn.Module, x: Tensor) -> list[Tensor | GramFeatures]:
        """Gram features per "gram" group, then one (T, K, P) tensor of all per-sample
        gradients: of "grads" groups, biases alone and fallback parameters."""
        grams: list[Tensor | GramFeatures] = []
        gradients: list[Tensor] = []
        if self.groups:
            calls, cotangents = self._capture(model, x)
            t, k = len(x), self.n_outputs
            for group in self.groups:
                used = group.calls(calls)
                g = _concat([cotangents[id(c)] for c in used])
                if group.weight is None:
                    gradients.append(g.sum(dim=-1).reshape(t, k, -1))
                    continue
                a = _concat([c.inputs for c in used if c.inputs is not None])
                if group.mode == "gram":
                    grams.append(GramFeatures(a, g, bias=group.bias is not None))
                else:
                    gradients.append(_weight_grads(g, a))
        if self.fallback:
            gradients.append(per_sample_jacobians(model, self.fallback, x))
        return grams + ([_concat(gradients, dim=2)] if gradients else [])

    def _capture(self, model: nn.Module, x: Tensor) -> tuple[list[_Call], dict[int, Tensor]]:
        """One forward pass recording calls, then the cotangents of all K outputs at once."""
        recorder = _Recorder(self.params, len(x))
        with torch.enable_grad(), recorder:
            out = model(x).reshape(len(x), -1)
        covered = {name for g in self.groups for name in (g.weight, g.bias) if name is not None}
        calls = [c for c in recorder.calls if c.weight in covered or c.bias in covered]
        k = self.n_outputs
        basis = torch.eye(k, dtype=out.dtype, device=out.device)[:, None, :].expand(k, len(x), k)
        grads = torch.autograd.grad(
            out,
            [c.output for c in calls],
            grad_outputs=basis,
            is_grads_batched=True,
            allow_unused=True,
            materialize_grads=True,
        )
        cotangents = {id(c): c.cotangents(g) for c, g in zip(calls, grads, strict=True)}
        return calls, cotangents

    def contract(self, f1: list[Tensor | GramFeatures], f2: list[Tensor | GramFeatures]) -> Tensor:
        """The kernel block between two tiles: the sum of every group's contribution."""
        first = f1[0].inputs if isinstance(f1[0], GramFeatures) else f1[0]
        t1 = len(first)
        t2 = len(f2[0].inputs if isinstance(f2[0], GramFeatures) else f2[0])
        block = empty_block(first, t1, t2, self.n_outputs, self.full)
        with torch.no_grad():
            for a, b in zip(f1, f2, strict=True):
                if isinstance(a, GramFeatures) and isinstance(b, GramFeatures):
                    _add_gram_product(block, a, b)
                else:
                    assert isinstance(a, Tensor) and isinstance(b, Tensor)
                    add_jacobian_product(block, a, b)
        return block


def _weight_grads(cotangents: Tensor, inputs: Tensor) -> Tensor:
    """Per-sample weight gradients Σ_l G_{ial} ⊗ A_{il} as (T, K, Gr·C·D).

    One matmul per sample (and group) over all K outputs at once: (K·C, L) @ (L, D).
    """
    t, k = cotangents.shape[:2]
    return torch.einsum("tkgcl,tgdl->tkgcd", cotangents, inputs).reshape(t, k, -1)


def _concat(parts: list[Tensor], dim: int = -1) -> Tensor:
    """Positions of several calls (or gradients of several groups) side by side."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _add_gram_product(block: Tensor, f1: GramFeatures, f2: GramFeatures) -> None:
    """Add Σ_{g,l,m} (A_il · A_jm)(G_ial · G_jbm) to the block (traced over a=b if 2-D)."""
    a1, a2, g1, g2 = f1.inputs, f2.inputs, f1.cotangents, f2.cotangents
    t1, k, n_groups, c, positions = g1.shape
    t2 = len(g2)
    full = block.dim() == 4
    if n_groups == 1 and positions == 1:
        s = a1.reshape(t1, -1) @ a2.reshape(t2, -1).T
        if f1.bias:
            s += 1
        if full:
            gg = (g1.reshape(t1 * k, c) @ g2.reshape(t2 * k, c).T).view(t1, k, t2, k)
            block.addcmul_(gg, s[:, None, :, None])
        else:
            block.addcmul_(g1.reshape(t1, -1) @ g2.reshape(t2, -1).T, s)
        return
    s = torch.einsum("igdl,jgdm->giljm", a1, a2)
    if f1.bias:
        s += 1
    if full:
        gg = torch.einsum("iagcl,jbgcm->gialjbm", g1, g2)
        block.add_(torch.einsum("giljm,gialjbm->iajb", s, gg))
    else:
        gg = torch.einsum("iagcl,jagcm->giljm", g1, g2)
        block.add_(torch.einsum("giljm,giljm->ij", s, gg))


def _group_costs(g: _Group, k: int, full: bool) -> tuple[float, float, float, float]:
    """FLOPs per sample, FLOPs per pair, feature elements per sample, pair temporaries."""
    k_pair = k * k if full else k
    if g.mode == "grads":
        n_entries = g.n_groups * g.out_dim * g.in_dim
        form = 2 * k * g.n_groups * g.positions * g.out_dim * g.in_dim if g.weight else 0
        return form, 2 * k_pair * n_entries, k * n_entries, 0.0
    squares = g.n_groups * g.positions**2
    n_products = k * k if full else 1
    pair = 2 * squares * (g.in_dim + k_pair * g.out_dim) + squares * n_products
    feature = g.n_groups * g.positions * (g.in_dim + k * g.out_dim)
    return 0.0, pair, feature, squares * (1 + n_products)


def _cheaper_mode(group: _Group, k: int, n_pairs: float, full: bool) -> _Group:
    """``group`` in the mode with fewer FLOPs for ``n_pairs`` pairs per featurized sample.

    A bias folds into a Gram; with per-sample gradients it becomes a group of its own.
    """
    grads = replace(group, mode="grads", bias=None)

    def flops(g: _Group) -> float:
        per_sample, per_pair, _, _ = _group_costs(g, k, full)
        return per_sample + n_pairs * per_pair

    return min((group, grads), key=flops)

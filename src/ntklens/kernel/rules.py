"""Structured uses of trainable tensors, recorded through a torch function mode.

A *use* is one call that is linear in a tracked tensor (a trainable parameter, a view of
one, or a weight-normalized weight) with per-sample structure: ``F.linear``, ``@``/
``matmul``/``mm``/``addmm``/``bmm``/``baddbmm``, two-operand ``einsum``, ``F.conv*``,
``F.conv_transpose*``, ``F.embedding``, the affine of ``F.layer_norm``/``F.rms_norm``/
``F.group_norm``/``F.batch_norm`` and elementwise ``+``/``-``/``*`` with data.
Views (``.T``, ``transpose``, ``permute``, ``view``/``reshape``, slicing, ``chunk``/
``split``, a scalar multiple) are followed as an index map into the parameter's entries
and a scale, so the per-sample gradient of every use lands on the right entries.
``F.multi_head_attention_forward`` is decomposed into its projections and attention.
Every other use of a tracked tensor is flagged (with the reason), and so is a use whose
output does not require grad (a call inside a custom ``autograd.Function``): those
parameters get the exact restricted Jacobian instead.

Which axis of a use's input carries the samples is not decided here: the plan compares
two recordings at different batch sizes (:func:`find_layout`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

Rule = Literal["linear", "conv", "conv_transpose", "embedding", "scale", "shift"]
#: Rules whose per-sample gradient is Σ_l G_l ⊗ A_l, contracted by Grams of small matrices.
GRAM_RULES = ("linear", "conv", "conv_transpose")


@dataclass(frozen=True)
class Layout:
    """Where the samples are along a use's leading dims: ``axis``, ``fold`` rows each."""

    axis: int
    fold: int


@dataclass(eq=False)
class Use:
    """One structured use of tracked tensor ``key``.

    ``idx``: flat entries of ``key`` in the use's canonical layout, (Gr, C, D) for the
    Gram rules (C output, D input features), the aligned view for "scale"/"shift";
    ``scale``: the view's scalar multiple. ``data``: detached rows (*lead, D) for
    "linear", the input for convolutions, tokens for "embedding", the multiplier for
    "scale". ``output``: the tensor whose cotangents are taken; ``out_perm`` puts it in
    (*lead, C) order. ``source`` carries the samples along its first ``lead`` dims.
    """

    key: str
    rule: Rule
    idx: Tensor
    scale: float
    data: Tensor | None
    output: Tensor
    source: Tensor
    lead: int
    out_perm: tuple[int, ...] | None = None
    conv: dict[str, Any] = field(default_factory=dict)
    pshape: tuple[int, ...] | None = None
    attached_to: int | None = None
    #: the call that made the use, e.g. "torch.einsum"
    via: str = ""
    #: "shift" after ``out = f·o`` of a linear use's output o: 1/f, and the tensors
    #: from o to that multiple, each of which must have no other consumer to fold
    relative: float = 1.0
    chain: tuple[Tensor, ...] = ()

    @property
    def signature(self) -> tuple[str, Rule, tuple[int, ...]]:
        return self.key, self.rule, tuple(self.idx.shape)


@dataclass(frozen=True)
class WeightNorm:
    """A weight ``v · g/‖v‖`` (norm over all dims but ``dim``) from two trainable tensors."""

    v: str
    g: str
    dim: int


def _view_funcs() -> set[Any]:
    t = Tensor
    return {
        t.T.__get__, t.mT.__get__, t.t, torch.t, t.transpose, torch.transpose, t.permute,
        torch.permute, t.view, t.reshape, torch.reshape, t.__getitem__, t.chunk, torch.chunk,
        t.split, torch.split, t.unbind, torch.unbind, t.flatten, torch.flatten, t.unflatten,
        t.unsqueeze, torch.unsqueeze, t.squeeze, torch.squeeze, t.contiguous, t.expand,
        t.view_as, t.reshape_as, t.clone, torch.clone, t.swapaxes, t.movedim, torch.movedim,
    }  # fmt: skip


_VIEWS = _view_funcs()
_SCALES = {
    Tensor.mul: 1, Tensor.__mul__: 1, Tensor.__rmul__: 1, torch.mul: 1,
    Tensor.div: -1, Tensor.__truediv__: -1, torch.div: -1,
}  # fmt: skip
_NEGATIONS = {Tensor.neg, Tensor.__neg__, torch.neg}
_ADDS = {
    Tensor.add: 1, Tensor.__add__: 1, Tensor.__radd__: 1, torch.add: 1,
    Tensor.sub: -1, Tensor.__sub__: -1, torch.sub: -1, Tensor.__rsub__: -2,
}  # fmt: skip
_MULS = {Tensor.mul, Tensor.__mul__, Tensor.__rmul__, torch.mul}
_MATMULS = {Tensor.matmul, Tensor.__matmul__, torch.matmul, Tensor.mm, torch.mm}
_RMATMULS = {Tensor.__rmatmul__}
_BMMS = {Tensor.bmm, torch.bmm}
_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_TRANSPOSES = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = (
    "input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"
)  # fmt: skip


def _bind(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    return dict(zip(names, args, strict=False)) | kwargs


def _is_scalar(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    return isinstance(value, Tensor) and value.dim() == 0 and not value.requires_grad


class Recorder(TorchFunctionMode):
    """Records the structured uses of ``params`` in a forward pass; flags all other uses.

    ``other_uses`` maps a tracked key to why it is not structured. A recorded call's
    output is handed on as a copy, so in-place operations after it cannot change the
    tensor whose cotangents are taken.
    """

    def __init__(
        self,
        params: dict[str, Tensor],
        aranges: dict[str, Tensor] | None = None,
        derived: dict[str, WeightNorm] | None = None,
    ) -> None:
        super().__init__()
        self.params = params
        self.shapes: dict[str, torch.Size] = {n: p.shape for n, p in params.items()}
        self.tracked: dict[int, tuple[Tensor, str, Tensor | None, float]] = {
            id(p): (p, n, None, 1.0) for n, p in params.items()
        }
        #: weight-normed tensors (tracked in ``params``, or found in the pass) by key
        self.derived: dict[str, WeightNorm] = dict(derived or {})
        self.uses: list[Use] = []
        self.other_uses: dict[str, str] = {}
        #: a tracked tensor was used with autograd off: inside a custom autograd.Function
        self.opaque = False
        #: index maps of the tensors themselves, shared between recordings of one plan
        self._aranges: dict[str, Tensor] = {} if aranges is None else aranges
        self._current = ""
        #: linear uses' outputs and scalar multiples: id -> (tensor, use, factor, chain)
        self.outputs: dict[int, tuple[Tensor, int, float, tuple[Tensor, ...]]] = {}

    # --- tracked tensors -------------------------------------------------------------

    def lookup(self, value: Any) -> tuple[str, Tensor, float] | None:
        """(key, index map, scale) of a tracked tensor, else None."""
        entry = self.tracked.get(id(value)) if isinstance(value, Tensor) else None
        if entry is None or entry[0] is not value:
            return None
        _, key, idx, scale = entry
        return key, (idx if idx is not None else self._arange(key)), scale

    def _arange(self, key: str) -> Tensor:
        if key not in self._aranges:
            shape = self.shapes[key]
            self._aranges[key] = _counting(math.prod(shape)).view(shape)
        return self._aranges[key]

    def _track(self, tensor: Tensor, key: str, idx: Tensor, scale: float) -> None:
        self.tracked[id(tensor)] = (tensor, key, idx, scale)

    def flag(self, key: str, why: str) -> None:
        self.other_uses.setdefault(key, why)

    # --- dispatch --------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        tracked = [t for t in tree_leaves((args, kwargs)) if self.lookup(t) is not None]
        if not tracked:
            out = func(*args, **kwargs)
            if func in _SCALES and len(args) == 2 and not kwargs:
                self._follow_output(func, args, out)
            return out
        if not torch.is_grad_enabled():
            self.opaque = True
            for t in tracked:
                found = self.lookup(t)
                assert found is not None
                self.flag(found[0], f"used by {_name(func)} with autograd off (custom Function?)")
            return func(*args, **kwargs)
        handler = _HANDLERS.get(func)
        self._current = _name(func)
        if handler is None:
            handler = _GENERIC.get(_kind(func))
        if handler is not None:
            result = handler(self, func, args, kwargs)
            if result is not None:
                return result
        out = func(*args, **kwargs)
        self._flag_all(func, tracked, out)
        return out

    def _flag_all(self, func: Any, tracked: list[Tensor], out: Any) -> None:
        if any(isinstance(t, Tensor) and t.requires_grad for t in tree_leaves(out)):
            for t in tracked:
                found = self.lookup(t)
                assert found is not None
                self.flag(found[0], f"used by {_name(func)}")

    def output_of(self, value: Any) -> tuple[int, float, tuple[Tensor, ...]] | None:
        """(use, factor, chain) when ``value`` is factor times a linear use's output."""
        entry = self.outputs.get(id(value)) if isinstance(value, Tensor) else None
        return None if entry is None or entry[0] is not value else entry[1:]

    def register_output(self, returned: Tensor, use: int | None) -> Tensor:
        if use is not None:
            self.outputs[id(returned)] = (returned, use, 1.0, (returned,))
        return returned

    def _follow_output(self, func: Any, args: tuple[Any, ...], out: Any) -> None:
        first, second = args
        power = _SCALES[func]
        found, factor = self.output_of(first), None
        if found is not None and _is_scalar(second):
            factor = float(second) ** power
        else:
            found = self.output_of(second) if power == 1 and _is_scalar(first) else None
            factor = float(first) if found is not None else None
        if found is not None and factor is not None and isinstance(out, Tensor):
            use, f, chain = found
            self.outputs[id(out)] = (out, use, f * factor, (*chain, out))

    def add(self, use: Use) -> int:
        """Record ``use``; a use whose output has no autograd history is invisible."""
        if not use.output.requires_grad:
            self.flag(use.key, f"{use.rule} output without autograd history (custom Function?)")
        use.via = use.via or self._current
        self.uses.append(use)
        return len(self.uses) - 1

    # --- views -----------------------------------------------------------------------

    def view(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        found = self.lookup(args[0]) if args else None
        if found is None:
            return None
        key, idx, scale = found
        out = func(*args, **kwargs)
        if func in (Tensor.view_as, Tensor.reshape_as):
            idx_out = idx.reshape(args[1].shape)
        else:
            idx_out = func(idx, *args[1:], **kwargs)
        outs = out if isinstance(out, tuple | list) else (out,)
        idxs = idx_out if isinstance(idx_out, tuple | list) else (idx_out,)
        for o, i in zip(outs, idxs, strict=True):
            self._track(o, key, i, scale)
        return out

    def scalar(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A tracked tensor times (or divided by, or negated) a constant scalar."""
        if func in _NEGATIONS:
            factor, tensor = -1.0, args[0]
        else:
            first, second = args[0], args[1] if len(args) > 1 else kwargs.get("other")
            power = _SCALES[func]
            if (
                self.lookup(first) is not None
                and _is_scalar(second)
                and not kwargs.keys() - {"other"}
            ):
                tensor, factor = first, float(second) ** power
            elif power == 1 and self.lookup(second) is not None and _is_scalar(first):
                tensor, factor = second, float(first)
            else:
                return None
        found = self.lookup(tensor)
        assert found is not None
        key, idx, scale = found
        out = func(*args, **kwargs)
        self._track(out, key, idx, scale * factor)
        return out

    # --- structured calls ------------------------------------------------------------

    def linear(
        self,
        rows: Tensor,
        weight: Any,
        out: Tensor,
        *,
        transposed: bool,
        out_perm: tuple[int, ...] | None = None,
        scale: float = 1.0,
    ) -> int | None:
        """Record ``out = rows @ M.T`` for a tracked 2-D ``weight`` (M = weight.T if
        ``transposed``); returns the use's index, or None when ``weight`` is untracked."""
        found = self.lookup(weight)
        if found is None:
            return None
        key, idx, s = found
        idx = idx.T if transposed else idx
        return self.add(
            Use(
                key,
                "linear",
                idx[None],
                s * scale,
                rows.detach(),
                out,
                rows,
                rows.dim() - 1,
                out_perm=out_perm,
            )
        )

    def shift(self, bias: Any, out: Tensor, attached_to: int | None, scale: float = 1.0) -> None:
        """Record ``out = ... + bias`` (broadcast) for a tracked ``bias``."""
        found = self.lookup(bias)
        if found is None:
            return
        key, idx, s = found
        pshape = (1,) * (out.dim() - idx.dim()) + tuple(idx.shape)
        self.add(
            Use(
                key,
                "shift",
                idx.reshape(pshape),
                s * scale,
                None,
                out,
                out,
                out.dim(),
                pshape=pshape,
                attached_to=attached_to,
            )
        )

    def multiply(self, factor: Tensor, param: Any, out: Tensor, pshape: tuple[int, ...]) -> None:
        """Record ``out = factor * param`` (broadcast as ``pshape``) for a tracked param."""
        found = self.lookup(param)
        assert found is not None
        key, idx, s = found
        self.add(
            Use(
                key,
                "scale",
                idx.reshape(pshape),
                s,
                factor.detach(),
                out,
                out,
                out.dim(),
                pshape=pshape,
            )
        )


_COUNTING: list[Tensor] = [torch.arange(0, dtype=torch.int32)]


def _counting(n: int) -> Tensor:
    """0, 1, …, n-1 as a view of one cached int32 range (grown on demand): index maps of
    large weights then cost no allocation per call."""
    if n >= 2**31:
        return torch.arange(n)
    if len(_COUNTING[0]) < n:
        _COUNTING[0] = torch.arange(max(n, 2 * len(_COUNTING[0])), dtype=torch.int32)
    return _COUNTING[0][:n]


def _kind(func: Any) -> str | None:
    if func in _VIEWS:
        return "view"
    if func in _SCALES or func in _NEGATIONS:
        return "scalar"
    return None


def _name(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    name = name.replace("TensorBase.", "Tensor.").replace("_VariableFunctionsClass.", "torch.")
    if getattr(F, name, None) is func:
        name = "F." + name
    return name.replace("__get__", "property")


def _untracked(rec: Recorder, *values: Any) -> bool:
    return all(rec.lookup(v) is None for v in values)


# --- handlers: each returns the call's output, or None to treat the call as another use


def _h_view(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    if func in (Tensor.view_as, Tensor.reshape_as):  # the other tensor gives only a shape
        return rec.view(func, args, kwargs) if rec.lookup(args[0]) is not None else func(*args)
    if any(rec.lookup(t) is not None for t in tree_leaves((args[1:], kwargs))):
        return None
    return rec.view(func, args, kwargs)


def _h_scalar(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    if func in _MULS:
        result = _h_mul(rec, func, args, kwargs)
        if result is not None:
            return result
    if func in _ADDS:
        return None
    return rec.scalar(func, args, kwargs)


def _h_linear(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    bound = _bind(("input", "weight", "bias"), args, kwargs)
    x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
    if rec.lookup(x) is not None or weight.dim() != 2 or x.dim() < 1:
        return None
    out = func(*args, **kwargs)
    index = rec.linear(x, weight, out, transposed=False)
    rec.shift(bias, out, index)
    return rec.register_output(out.clone(), index)


def _h_matmul(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    a, b = (args[1], args[0]) if func in _RMATMULS else (args[0], args[1])
    if kwargs:
        return None
    return _matmul(rec, lambda: func(*args), a, b)


def _matmul(rec: Recorder, run: Callable[[], Tensor], a: Tensor, b: Tensor, scale: float = 1.0):  # type: ignore[no-untyped-def]
    """``a @ b`` with one tracked 2-D operand (or a batch of identical copies of one)."""
    tracked_b, tracked_a = rec.lookup(b) is not None, rec.lookup(a) is not None
    if tracked_a == tracked_b:
        return None
    weight = b if tracked_b else a
    data = a if tracked_b else b
    if weight.dim() == 3 and not _same_copies(rec, weight):
        return None
    if weight.dim() not in (2, 3) or data.dim() < 2:
        return None
    out = run()
    w2 = weight[0] if weight.dim() == 3 else weight
    if weight.dim() == 3:
        _, idx, s = rec.lookup(weight)  # type: ignore[misc]
        key = rec.lookup(weight)[0]  # type: ignore[index]
        rec._track(w2, key, idx[0], s)
    if tracked_b:
        index = rec.linear(data, w2, out, transposed=True, scale=scale)
    else:
        perm = (*range(out.dim() - 2), out.dim() - 1, out.dim() - 2)
        index = rec.linear(
            data.transpose(-1, -2), w2, out, transposed=False, out_perm=perm, scale=scale
        )
    return rec.register_output(out.clone(), index)


def _same_copies(rec: Recorder, weight: Tensor) -> bool:
    found = rec.lookup(weight)
    return found is not None and bool((found[1] == found[1][:1]).all())


def _h_bmm(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    if kwargs:
        return None
    return _matmul(rec, lambda: func(*args), args[0], args[1])


def _h_addmm(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if len(args) != 3 or kwargs.keys() - {"beta", "alpha"}:
        return None
    if not (_is_scalar(beta) and _is_scalar(alpha)):
        return None
    bias, a, b = args
    if rec.lookup(a) is None and rec.lookup(b) is None:
        if rec.lookup(bias) is None:
            return None
        out = func(*args, **kwargs)
        rec.shift(bias, out, None, float(beta))
        return out.clone()
    result = _matmul(rec, lambda: func(*args, **kwargs), a, b, float(alpha))
    if result is not None and rec.lookup(bias) is not None:
        rec.shift(bias, rec.uses[-1].output, len(rec.uses) - 1, float(beta))
    return result


def _h_einsum(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = tuple(operands[0])
    equation = args[0].replace(" ", "") if isinstance(args[0], str) else None
    if kwargs or equation is None or len(operands) != 2 or "." in equation:
        return None
    lhs, _, rhs = equation.partition("->")
    subs = lhs.split(",")
    if not rhs and "->" not in equation:
        letters = "".join(subs)
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    first = rec.lookup(operands[0]) is not None
    if first == (rec.lookup(operands[1]) is not None):
        return None
    w_sub, d_sub = (subs[0], subs[1]) if first else (subs[1], subs[0])
    weight, data = (operands[0], operands[1]) if first else (operands[1], operands[0])
    if len(w_sub) != 2 or len(set(w_sub)) != 2:
        return None
    c = [s for s in w_sub if s in rhs and s not in d_sub]
    d = [s for s in w_sub if s in d_sub and s not in rhs]
    if len(c) != 1 or len(d) != 1 or rhs.count(c[0]) != 1:
        return None
    lead = rhs.replace(c[0], "")
    rows = torch.einsum(f"{d_sub}->{lead}{d[0]}", data)
    # the same product as F.linear, whose matmuls (forward and backward) are faster on
    # CPU than einsum's batched ones
    matrix = weight if w_sub == c[0] + d[0] else weight.T
    out = F.linear(rows, matrix).permute(*((lead + c[0]).index(s) for s in rhs))
    perm = tuple(rhs.index(s) for s in lead + c[0])
    index = rec.linear(rows, weight, out, transposed=w_sub != c[0] + d[0], out_perm=perm)
    return rec.register_output(out.clone(), index)


def _h_conv(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    transposed = func in _CONV_TRANSPOSES
    spatial = (_CONV_TRANSPOSES if transposed else _CONVS)[func]
    bound = _bind(_CONV_T_ARGS if transposed else _CONV_ARGS, args, kwargs)
    x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
    if rec.lookup(x) is not None or x.dim() != spatial + 2:
        return None
    if transposed and bound.get("padding", 0) == "same":
        return None
    out = func(*args, **kwargs)
    found = rec.lookup(weight)
    index = None
    groups = int(bound.get("groups", 1))
    conv = {
        "spatial": spatial,
        "kernel": tuple(weight.shape[2:]),
        "stride": bound.get("stride", 1),
        "padding": bound.get("padding", 0),
        "dilation": bound.get("dilation", 1),
        "output_padding": bound.get("output_padding", 0),
        "groups": groups,
    }
    if found is not None:
        key, idx, s = found
        if transposed:  # weight (Cin, Cout/Gr, *k): C runs over (Cout/Gr, k), D over Cin/Gr
            canonical = idx.reshape(groups, weight.shape[0] // groups, -1).transpose(1, 2)
        else:
            canonical = idx.reshape(groups, weight.shape[0] // groups, -1)
        rule: Rule = "conv_transpose" if transposed else "conv"
        index = rec.add(Use(key, rule, canonical, s, x.detach(), out, x, 1, conv=conv))
    if bias is not None and rec.lookup(bias) is not None:
        found_b = rec.lookup(bias)
        assert found_b is not None
        key, idx, s = found_b
        pshape = (1, idx.numel(), *(1,) * spatial)
        rec.add(
            Use(
                key,
                "shift",
                idx.reshape(pshape),
                s,
                None,
                out,
                out,
                1,
                pshape=pshape,
                attached_to=index,
            )
        )
    return out.clone()


def _h_embedding(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq")
    bound = _bind(names, args, kwargs)
    tokens, weight = bound["input"], bound["weight"]
    found = rec.lookup(weight)
    if found is None or bound.get("max_norm") is not None or bound.get("scale_grad_by_freq"):
        return None
    if weight.dim() != 2 or rec.lookup(tokens) is not None:
        return None
    out = func(*args, **kwargs)
    key, idx, s = found
    padding = bound.get("padding_idx")
    rec.add(
        Use(
            key,
            "embedding",
            idx.T[None],
            s,
            tokens.detach(),
            out,
            tokens,
            tokens.dim(),
            conv={"padding_idx": padding},
        )
    )
    return out.clone()


def _h_norm(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    if func is F.batch_norm:
        names: tuple[str, ...] = (
            "input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"
        )  # fmt: skip
    elif func is F.group_norm:
        names = ("input", "num_groups", "weight", "bias", "eps")
    elif func is F.rms_norm:
        names = ("input", "normalized_shape", "weight", "eps")
    else:
        names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = _bind(names, args, kwargs)
    x, weight, bias = bound["input"], bound.get("weight"), bound.get("bias")
    if not _untracked(rec, x, bound.get("running_mean"), bound.get("running_var")):
        return None
    if func is F.batch_norm and (bound.get("training") or bound.get("running_mean") is None):
        return None
    out = func(*args, **kwargs)
    plain = dict(bound, weight=None) | ({"bias": None} if "bias" in names else {})
    if func in (F.batch_norm, F.group_norm):
        pshape_of: Callable[[Tensor], tuple[int, ...]] = lambda p: (  # noqa: E731
            1,
            p.numel(),
            *(1,) * (out.dim() - 2),
        )
    else:
        pshape_of = lambda p: (1,) * (out.dim() - p.dim()) + tuple(p.shape)  # noqa: E731
    if weight is not None and rec.lookup(weight) is not None:
        with torch.no_grad():
            normalized = func(**plain)
        rec.multiply(normalized, weight, out, pshape_of(weight))
    if bias is not None and rec.lookup(bias) is not None:
        _, idx, s = rec.lookup(bias)  # type: ignore[misc]
        pshape = pshape_of(bias)
        key = rec.lookup(bias)[0]  # type: ignore[index]
        rec.add(Use(key, "shift", idx.reshape(pshape), s, None, out, out, out.dim(), pshape=pshape))
    return out.clone()


def _h_add(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    """``data ± tracked`` (broadcast), tracked on either side, with ``alpha``."""
    sign = _ADDS[func]
    first, second = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    alpha = kwargs.get("alpha", 1)
    if not _is_scalar(alpha) or kwargs.keys() - {"other", "alpha"}:
        return None
    tracked_first, tracked_second = rec.lookup(first) is not None, rec.lookup(second) is not None
    if tracked_first == tracked_second:
        return None
    param, data = (first, second) if tracked_first else (second, first)
    if not isinstance(data, Tensor) or data.dim() < param.dim():
        return None
    if sign == -2:  # __rsub__(self, other) = other - self
        factor = -1.0 if tracked_first else 1.0
    elif tracked_first:
        factor = 1.0
    else:
        factor = float(alpha) * sign
    out = func(*args, **kwargs)
    if out.dim() != data.dim():
        return None
    attached = rec.output_of(data)
    rec.shift(param, out, attached[0] if attached else None, factor)
    if attached is not None and tuple(param.shape) == tuple(out.shape[-1:]):
        rec.uses[-1].relative = 1 / attached[1] if attached[1] else math.nan
        rec.uses[-1].chain = attached[2]
    else:
        rec.uses[-1].attached_to = None
    return out.clone()


def _h_mul(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    """``data * tracked`` (broadcast) with a data tensor that has at least its dims."""
    first, second = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    if kwargs.keys() - {"other"}:
        return None
    tracked_first, tracked_second = rec.lookup(first) is not None, rec.lookup(second) is not None
    if tracked_first == tracked_second:
        return None
    param, data = (first, second) if tracked_first else (second, first)
    if not isinstance(data, Tensor) or data.dim() == 0 or data.dim() < param.dim():
        return None
    out = func(*args, **kwargs)
    if out.shape != data.shape:
        return None
    rec.multiply(data, param, out, (1,) * (out.dim() - param.dim()) + tuple(param.shape))
    return out.clone()


def _h_weight_norm(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    """``torch._weight_norm(v, g, dim)`` of two parameters: a derived tracked weight."""
    bound = _bind(("v", "g", "dim"), args, kwargs)
    v, g = rec.lookup(bound["v"]), rec.lookup(bound["g"])
    dim = bound.get("dim", 0)
    if v is None or g is None or v[2] != 1.0 or g[2] != 1.0 or dim != 0:
        return None
    if not (torch.equal(v[1], rec._arange(v[0])) and torch.equal(g[1], rec._arange(g[0]))):
        return None
    out = func(*args, **kwargs)
    key = f"weight_norm({v[0]}, {g[0]})"
    rec.derived[key] = WeightNorm(v[0], g[0], dim)
    rec.shapes[key] = out.shape
    rec._track(out, key, rec._arange(key), 1.0)
    return out


def _h_mha(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    """``F.multi_head_attention_forward`` as projections (recorded) and attention."""
    names = (
        "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
        "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
        "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
        "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
        "static_k", "static_v", "average_attn_weights", "is_causal",
    )  # fmt: skip
    b = _bind(names, args, kwargs)
    unsupported = (
        b.get("bias_k") is not None
        or b.get("bias_v") is not None
        or b.get("add_zero_attn")
        or b.get("static_k") is not None
        or b.get("static_v") is not None
        or (b.get("training", True) and b.get("dropout_p", 0.0) > 0)
        or b["query"].dim() != 3
        or not _untracked(rec, b["query"], b["key"], b["value"])
    )
    if unsupported:
        return None

    def op(f: Any, *a: Any, **k: Any) -> Any:
        return rec.__torch_function__(f, (), a, k)

    heads = b["num_heads"]
    if b.get("use_separate_proj_weight"):
        weights = (b["q_proj_weight"], b["k_proj_weight"], b["v_proj_weight"])
    else:
        weights = op(Tensor.chunk, b["in_proj_weight"], 3)
    in_bias = b.get("in_proj_bias")
    biases = op(Tensor.chunk, in_bias, 3) if in_bias is not None else (None,) * 3
    q, k, v = (
        op(F.linear, t, w, bb)
        for t, w, bb in zip((b["query"], b["key"], b["value"]), weights, biases, strict=True)
    )
    length, batch, embed = q.shape
    source = k.shape[0]
    head_dim = embed // heads

    def split(t: Tensor, n: int) -> Tensor:
        return t.reshape(n, batch * heads, head_dim).transpose(0, 1)

    q, k, v = split(q, length), split(k, source), split(v, source)
    scores = q @ k.transpose(1, 2) / math.sqrt(head_dim)
    mask = b.get("attn_mask")
    if mask is None and b.get("is_causal"):
        mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
    scores = _masked(scores, mask, scores.shape)
    padding = b.get("key_padding_mask")
    if padding is not None:
        padding = padding.view(batch, 1, 1, source).expand(batch, heads, 1, source)
        scores = _masked(scores, padding.reshape(batch * heads, 1, source), scores.shape)
    weights_attn = torch.softmax(scores, dim=-1)
    mixed = (weights_attn @ v).transpose(0, 1).reshape(length, batch, embed)
    out = op(F.linear, mixed, b["out_proj_weight"], b.get("out_proj_bias"))
    if not b.get("need_weights", True):
        return out, None
    per_head = weights_attn.view(batch, heads, length, source)
    return out, per_head.mean(dim=1) if b.get("average_attn_weights", True) else per_head


def _masked(scores: Tensor, mask: Tensor | None, shape: torch.Size) -> Tensor:
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask.expand(shape), float("-inf"))
    return scores + mask


_HANDLERS: dict[Any, Callable[[Recorder, Any, tuple, dict], Any]] = {
    F.linear: _h_linear,
    **{f: _h_matmul for f in _MATMULS | _RMATMULS},
    **{f: _h_bmm for f in _BMMS},
    Tensor.addmm: _h_addmm,
    torch.addmm: _h_addmm,
    Tensor.baddbmm: _h_addmm,
    torch.baddbmm: _h_addmm,
    torch.einsum: _h_einsum,
    **{f: _h_conv for f in (*_CONVS, *_CONV_TRANSPOSES)},
    F.embedding: _h_embedding,
    **{f: _h_norm for f in (F.layer_norm, F.rms_norm, F.group_norm, F.batch_norm)},
    **{f: _h_add for f in _ADDS},
    torch._weight_norm: _h_weight_norm,
    F.multi_head_attention_forward: _h_mha,
}
_GENERIC: dict[str | None, Callable[[Recorder, Any, tuple, dict], Any]] = {
    "view": _h_view,
    "scalar": _h_scalar,
}


def find_layout(a: Use, b: Use, n_a: int, n_b: int) -> Layout | None:
    """The sample axis of a use recorded on batches of ``n_a`` and ``n_b`` samples.

    The first batch holds samples (s0, s1), the second (s1, s0, s2). An axis (among the
    leading dims) qualifies when its size is ``n·fold`` in both with everything else
    equal, and the rows of s0 and s1 agree between the two recordings: rows that mix
    samples (or follow some other axis) are rejected, never taken as per-sample.
    """
    sa, sb = a.source.shape, b.source.shape
    if len(sa) != len(sb) or a.lead != b.lead:
        return None
    for axis in range(a.lead):
        rest_a, rest_b = sa[:axis] + sa[axis + 1 :], sb[:axis] + sb[axis + 1 :]
        if rest_a != rest_b or sa[axis] % n_a or sb[axis] % n_b:
            continue
        fold = sa[axis] // n_a
        if fold == 0 or sb[axis] // n_b != fold:
            continue
        ra = a.source.detach().movedim(axis, 0).unflatten(0, (n_a, fold))
        rb = b.source.detach().movedim(axis, 0).unflatten(0, (n_b, fold))
        if _agree(ra[0], rb[1]) and _agree(ra[1], rb[0]):
            return Layout(axis, fold)
    return None


def _agree(x: Tensor, y: Tensor) -> bool:
    if not x.is_floating_point():
        return torch.equal(x, y)
    scale = max(float(x.abs().max()), float(y.abs().max()), torch.finfo(x.dtype).tiny)
    return float((x - y).abs().max()) <= 1e3 * torch.finfo(x.dtype).eps * scale

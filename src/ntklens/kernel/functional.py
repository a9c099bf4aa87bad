"""The model as a function of its trainable parameters, evaluated in eval mode.

Every kernel method differentiates the same function ``f(θ, x) -> (N, K)``: the model's
output with the batch dimension first and all other output dimensions flattened into K.
Only parameters with ``requires_grad=True`` are part of θ; everything else (frozen
parameters, buffers) is a constant.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._ops import HigherOrderOperator
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from ntklens.errors import NtkLensError

Params = dict[str, Tensor]


def trainable_parameters(model: nn.Module) -> Params:
    """The trainable parameters by name, each shared Parameter once."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def detached(params: Params) -> Params:
    """The same parameters without autograd history, for torch.func transforms."""
    return {name: p.detach() for name, p in params.items()}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate ``model`` in eval mode and restore every submodule's training flag after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


class SelectOutput(nn.Module):
    """``model`` followed by ``fn`` on its output (a tuple, dict or ModelOutput)."""

    def __init__(self, model: nn.Module, fn: Callable[[object], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.model(x))


def model_output(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)``, which must be a tensor with the batch dimension first."""
    out = model(x)
    if not isinstance(out, Tensor):
        raise NtkLensError(_output_message(out))
    if out.dim() == 0 or out.shape[0] != len(x):
        shape = tuple(out.shape)
        raise NtkLensError(
            f"model output has shape {shape} for a batch of {len(x)}; it must have the "
            "batch dimension first: pass output_fn= to select or reshape it"
        )
    return out


def _output_message(out: object) -> str:
    kind = type(out).__name__
    if isinstance(out, dict):
        keys = list(out)[:4]
        return (
            f"model returned a {kind} with keys {keys}, not a tensor; pass "
            f"output_fn=lambda out: out[{keys[0]!r}] (or the entry to differentiate)"
            if keys
            else f"model returned an empty {kind}; pass output_fn= that returns a tensor"
        )
    if isinstance(out, tuple | list):
        return (
            f"model returned a {kind} of {len(out)}, not a tensor; pass "
            "output_fn=lambda out: out[0] (or the entry to differentiate)"
        )
    return f"model returned a {kind}, not a tensor; pass output_fn= that returns a tensor"


class _Portable(TorchFunctionMode):
    """Evaluates ops that forward-mode AD lacks by their decompositions.

    Being active at all also turns off the inference fast paths of
    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (they check for torch
    function overrides), whose fused kernels have no forward AD. An embedding's padding
    positions are cut from its weight's forward-mode derivative, as reverse mode cuts
    them from its gradient (torch's jvp keeps them: a tied head's vjp, pushed forward,
    would count the padding row).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.embedding:
            padding = args[2] if len(args) > 2 else kwargs.get("padding_idx")
            out = func(*args, **kwargs)
            if padding is None:
                return out
            tokens = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            padded = (tokens == padding % weight.shape[0]).unsqueeze(-1)
            return torch.where(padded, out.detach(), out)
        if func is torch._weight_norm:
            v, g = args[0], args[1]
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            dims = [d for d in range(v.dim()) if d != dim % v.dim()]
            return v * (g / v.pow(2).sum(dim=dims, keepdim=True).sqrt())
        return func(*args, **kwargs)


@contextmanager
def portable() -> Iterator[None]:
    """Run the model so that forward-mode AD works: math SDPA, no fused fast paths."""
    with sdpa_kernel(SDPBackend.MATH), _Portable():
        yield


def output_fn(
    model: nn.Module, constants: Params | None = None
) -> Callable[[Params, Tensor], Tensor]:
    """``f(params, x)``: the model's output on the batch ``x`` as an (N, K) tensor.

    ``params`` replaces those parameters of the model; ``constants`` (detached) replace
    others, so that no autograd graph is built through them.
    """
    dicts = (constants,) if constants else ()

    def f(params: Params, x: Tensor) -> Tensor:
        out = functional_call(model, (params, *dicts), (x,), strict=False)
        return out.reshape(x.shape[0], -1)

    return f


def single_sample_fn(
    model: nn.Module, constants: Params | None = None
) -> Callable[[Params, Tensor], Tensor]:
    """``f(params, x)`` for one sample ``x`` (no batch dimension): a (K,) tensor."""
    batched = output_fn(model, constants)

    def f(params: Params, x: Tensor) -> Tensor:
        return batched(params, x.unsqueeze(0))[0]

    return f


@dataclass(frozen=True)
class ModelProbe:
    """Per-sample costs of the model, measured on a forward pass over a few samples."""

    n_outputs: int
    n_params: int
    forward_flops: float
    activation_bytes: float
    element_size: int


def per_sample(small: ModelProbe, large: ModelProbe, n_small: int, n_large: int) -> ModelProbe:
    """Per-sample costs as the difference of two probes at different batch sizes.

    Work that does not grow with the batch (a parametrization materializing its weight,
    learned queries) then does not count as per-sample; linear costs are unchanged.
    """
    spread = n_large - n_small

    def slope(a: float, b: float) -> float:
        value = (b * n_large - a * n_small) / spread
        return value if value > 0 else a

    return replace(
        small,
        forward_flops=slope(small.forward_flops, large.forward_flops),
        activation_bytes=slope(small.activation_bytes, large.activation_bytes),
    )


class _FlopCounter(TorchDispatchMode):
    """The forward FLOPs of every operator torch has a formula for (its ``flop_registry``:
    matmuls, convolutions, attention). Lighter than ``FlopCounterMode``, whose per-operator
    bookkeeping (module attribution, decomposition attempts) costs more than the probe's
    operators themselves on a small batch."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if isinstance(func, HigherOrderOperator):  # as FlopCounterMode: not counted
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class _ActivationCounter(TorchFunctionMode):
    """Counts the elements of every floating-point tensor the forward pass produces."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor) and tensor.is_floating_point():
                self.numel += tensor.numel()
        return out


def forward_flops(model: nn.Module, batch: Tensor) -> float:
    """The forward FLOPs of ``model`` on ``batch``: autograd on and math SDPA, as in the
    kernel methods."""
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), _FlopCounter() as flops:
        model_output(model, batch)
    return flops.total


def probe_model(
    model: nn.Module,
    x: Tensor,
    n_samples: int = 2,
    also: TorchFunctionMode | None = None,
    outputs: list[Tensor] | None = None,
) -> ModelProbe:
    """Forward FLOPs, activation bytes and output count per sample of ``model`` on the
    first ``n_samples`` of ``x``, autograd on and math SDPA, as in the kernel methods.

    ``also``: another mode to observe the same pass (the layer-wise recorder: its copies
    then count as activations, as in the capture it stands for); ``outputs``: a list that
    receives the model's output. FLOPs are counted in a pass of their own, where no
    observer's bookkeeping is counted or slowed down by the counter.
    """
    batch = x[:n_samples]
    counter = _ActivationCounter()
    with (
        torch.enable_grad(),
        sdpa_kernel(SDPBackend.MATH),
        counter,
        also if also is not None else nullcontext(),
    ):
        out = model_output(model, batch)
    if outputs is not None:
        outputs.append(out)
    params = trainable_parameters(model)
    element_size = next(iter(params.values())).element_size()
    return ModelProbe(
        n_outputs=math.prod(out.shape[1:]),
        n_params=sum(p.numel() for p in params.values()),
        forward_flops=forward_flops(model, batch) / len(batch),
        activation_bytes=counter.numel * element_size / len(batch),
        element_size=element_size,
    )

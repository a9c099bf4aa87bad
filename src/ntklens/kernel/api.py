"""``ntk``: the empirical NTK of any ``torch.nn.Module``, by the method that fits best.

Θ[(i,a),(j,b)] = Σ_p ∂f_a(x1_i)/∂θ_p · ∂f_b(x2_j)/∂θ_p over all trainable parameters θ.
A full kernel has shape (N1, K, N2, K) (:func:`flatten` makes it (N1·K, N2·K), row index
i·K + a); a trace kernel Σ_a Θ[(i,a),(j,a)] has shape (N1, N2).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ntklens.errors import NtkLensError
from ntklens.kernel.functional import (
    ModelProbe,
    SelectOutput,
    eval_mode,
    model_device,
    trainable_parameters,
)
from ntklens.kernel.jacobian import jacobian_cost, jacobian_kernel
from ntklens.kernel.layerwise import LayerwisePlan
from ntklens.kernel.products import vector_products_cost, vector_products_kernel
from ntklens.kernel.tiling import (
    Cost,
    Layout,
    TiledKernel,
    TilePlan,
    budget_error,
    parse_memory,
    plan_tiles,
)
from ntklens.kernel.validation import (
    check_choice,
    check_dtype,
    check_input,
    check_model,
    check_output_fn,
    check_pair,
    forward_error,
)
from ntklens.schema import KERNEL_METHODS, KERNEL_OUTPUTS, KernelMethod, KernelOutput

_log = logging.getLogger(__name__)


def ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    output: KernelOutput = "full",
    method: KernelMethod = "auto",
    memory_budget: int | str = "2GiB",
    dtype: torch.dtype | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
) -> Tensor:
    """The eNTK of ``model`` between ``x1`` and ``x2`` (x1 itself when None).

    ``output="full"`` gives shape (N1, K, N2, K), ``"trace"`` the output-traced (N1, N2).
    ``method``: "jacobian" (per-sample Jacobians, contracted), "vector-products"
    (vjp then jvp, no Jacobian held), "layerwise" (Gram identity of Linear/Conv layers,
    exact Jacobians for other parameters) or "auto" (the fastest estimate that fits).
    Data are tiled so that the estimated peak memory, the result included (the model
    itself not), stays within ``memory_budget`` (bytes or e.g. "4GiB"). ``dtype``
    computes in that precision on a copy of the model. ``output_fn`` maps the model's
    output (a tuple, dict or ModelOutput) to the (N, ...) tensor to differentiate. The
    model runs in eval mode on its own device and is left as it was; each sample's output
    must depend on it alone.
    """
    with _prepared(model, x1, x2, output, method, memory_budget, dtype, output_fn) as setup:
        choice = _cheapest(setup.candidates, setup.n1, setup.n2, setup.output_bytes, setup.budget)
        _log.info("method %s, %s", choice.name, choice.plan)
        if choice.name == "layerwise":
            share = setup.plan.fallback_share(setup.probe, setup.pairs_per_sample)
            if share > 0.5:
                _log.warning(
                    "layerwise: exact Jacobians of unstructured parameters (%s) carry %.0f%% "
                    "of the estimated cost; ntklens.kernel.explain(model, x) says why",
                    ", ".join(setup.plan.fallback[:4]),
                    100 * share,
                )
        return choice.kernel().assemble(setup.x1, setup.x2, choice.plan, setup.layout)


@dataclass
class _Setup:
    """Checked arguments, the layer-wise plan and the candidate methods of one call."""

    net: nn.Module
    x1: Tensor
    x2: Tensor | None
    n1: int
    n2: int | None
    budget: int
    plan: LayerwisePlan
    probe: ModelProbe
    layout: Layout
    output_bytes: float
    candidates: list[_Candidate]
    pairs_per_sample: float


@contextmanager
def _prepared(
    model: object,
    x1: object,
    x2: object,
    output: object,
    method: object,
    memory_budget: int | str,
    dtype: object,
    output_fn: object,
) -> Iterator[_Setup]:
    """Check every argument, probe the model and list the candidate methods."""
    model = check_model(model)
    x1 = check_input("x1", x1)
    if x2 is not None:
        x2 = check_pair(x1, check_input("x2", x2))
    full = check_choice("output", output, KERNEL_OUTPUTS) == "full"
    method = check_choice("method", method, KERNEL_METHODS)
    budget = parse_memory(memory_budget)
    dtype = check_dtype(dtype)
    select = check_output_fn(output_fn)
    with _computing_copy(model, dtype) as copy_, eval_mode(copy_):
        net = copy_ if select is None else SelectOutput(copy_, select)
        param_dtype = next(iter(trainable_parameters(net).values())).dtype
        device = model_device(net)
        x1 = _to(x1, device, param_dtype)
        x2 = None if x2 is None else _to(x2, device, param_dtype)
        n2 = None if x2 is None else len(x2)
        pairs_per_sample = (n2 or len(x1) / 2) * len(x1) / (len(x1) + (n2 or 0))
        try:
            plan, probe = LayerwisePlan.probe(net, x1, pairs_per_sample, full, x2)
        except NtkLensError:
            raise
        except Exception as error:
            raise forward_error("x1", x1, error) from error
        layout = Layout(full, probe.n_outputs)
        output_bytes = len(x1) * (n2 or len(x1)) * probe.element_size
        output_bytes *= probe.n_outputs**2 if full else 1
        candidates = _candidates(net, plan, probe, full, method)
        yield _Setup(
            net, x1, x2, len(x1), n2, budget, plan, probe, layout, output_bytes, candidates,
            pairs_per_sample,
        )  # fmt: skip


def flatten(kernel: Tensor) -> Tensor:
    """A full kernel (N1, K, N2, K) as the matrix (N1·K, N2·K) with row index i·K + a."""
    if not isinstance(kernel, Tensor) or kernel.dim() != 4 or kernel.shape[1] != kernel.shape[3]:
        shape = tuple(kernel.shape) if isinstance(kernel, Tensor) else type(kernel).__name__
        raise NtkLensError(
            f"kernel must be a full kernel of shape (N1, K, N2, K), got {shape}; "
            "a trace kernel is already a matrix"
        )
    n1, k, n2, _ = kernel.shape
    return kernel.reshape(n1 * k, n2 * k)


@dataclass
class _Candidate:
    """A method with its estimated cost and the kernel it would compute."""

    name: str
    cost: Cost
    kernel: Callable[[], TiledKernel]
    plan: TilePlan | None = None


def _candidates(
    net: nn.Module, plan: LayerwisePlan, probe: ModelProbe, full: bool, method: str
) -> list[_Candidate]:
    """The methods to consider: the one asked for, or all of them for "auto"."""
    k = probe.n_outputs
    candidates = []
    if method in ("auto", "layerwise"):
        candidates.append(_Candidate("layerwise", plan.cost(probe), lambda: plan.kernel(net)))
    if method in ("auto", "jacobian"):
        cost = jacobian_cost(probe, probe.n_params, full)
        candidates.append(_Candidate("jacobian", cost, lambda: jacobian_kernel(net, k, full)))
    if method == "vector-products" or (method == "auto" and not plan.opaque):
        cost = vector_products_cost(probe, full)
        candidates.append(
            _Candidate("vector-products", cost, lambda: vector_products_kernel(net, k, full))
        )
    return candidates


def _cheapest(
    candidates: list[_Candidate], n1: int, n2: int | None, output_bytes: float, budget: int
) -> _Candidate:
    """The candidate with the fewest estimated FLOPs among those that fit ``budget``."""
    fitting = []
    for candidate in candidates:
        try:
            candidate.plan = plan_tiles(n1, n2, candidate.cost.footprint, output_bytes, budget)
        except NtkLensError:
            continue
        fitting.append(candidate)
    if not fitting:
        needed = min(output_bytes + c.cost.footprint.peak(1, 2) for c in candidates)
        raise budget_error(needed, budget, "the kernel itself plus one sample pair's work")
    return min(fitting, key=lambda c: c.cost.total_flops(n1, n2, c.plan))


@contextmanager
def _computing_copy(model: nn.Module, dtype: object) -> Iterator[nn.Module]:
    """The model itself, or a copy cast to ``dtype`` when that differs from its own."""
    params = trainable_parameters(model)
    if dtype is None or all(p.dtype == dtype for p in params.values()):
        yield model
    else:
        yield copy.deepcopy(model).to(dtype)


def _to(x: Tensor, device: object, dtype: object) -> Tensor:
    """``x`` on ``device``; floating-point inputs also in the model's ``dtype``."""
    if x.is_floating_point():
        return x.to(device=device, dtype=dtype)
    return x.to(device=device)

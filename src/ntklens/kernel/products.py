"""NTK-vector products: Θv = J (Jᵀ v) from one vjp and one jvp, no Jacobian held.

:func:`ntk_matvec` is the matrix-free operator (for Lanczos and Hutchinson estimators);
:func:`vector_products_kernel` builds the whole kernel column by column from the same
two products.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vjp, vmap

from ntklens.errors import NtkLensError
from ntklens.kernel.functional import (
    ModelProbe,
    SelectOutput,
    detached,
    eval_mode,
    model_device,
    portable,
    probe_model,
    single_sample_fn,
    trainable_parameters,
)
from ntklens.kernel.functional import (
    output_fn as batched_fn,
)
from ntklens.kernel.jacobian import untransformable
from ntklens.kernel.tiling import (
    AUTOGRAD_SLOWDOWN,
    Cost,
    Footprint,
    TiledKernel,
    largest_tile,
    parse_memory,
)
from ntklens.kernel.validation import check_input, check_model, check_output_fn, forward_error


def ntk_matvec(
    model: nn.Module,
    x: Tensor,
    *,
    memory_budget: int | str = "2GiB",
    output_fn: Callable[[object], Tensor] | None = None,
) -> Callable[[Tensor], Tensor]:
    """The map v ↦ Θv for the full eNTK on ``x``, without building Θ.

    ``v`` has shape (N, K), indexed like the model's output; so does Θv, with
    (Θv)[i, a] = Σ_{j,b} Θ[i, a, j, b] v[j, b]. Each call costs about one forward, one
    backward and one forward-mode pass over ``x``, in data tiles that fit ``memory_budget``.
    The model is evaluated in eval mode and left as it was; ``output_fn`` as in
    :func:`ntklens.ntk`.
    """
    model = check_model(model)
    x = check_input("x", x).to(model_device(model))
    budget = parse_memory(memory_budget)
    select = check_output_fn(output_fn)
    if select is not None:
        model = SelectOutput(model, select)
    with eval_mode(model):
        try:
            probe = probe_model(model, x)
        except NtkLensError:
            raise
        except Exception as error:
            raise forward_error("x", x, error) from error
    k = probe.n_outputs
    tile = largest_tile(
        len(x),
        3 * probe.activation_bytes,
        budget,
        fixed=3 * probe.n_params * probe.element_size,
        what="one sample's forward and backward",
    )
    f = batched_fn(model)
    tiles = [slice(start, start + tile) for start in range(0, len(x), tile)]

    def matvec(v: Tensor) -> Tensor:
        try:
            return _matvec(v)
        except RuntimeError as error:
            if untransformable(error):
                raise no_forward_ad(error) from error
            raise

    def _matvec(v: Tensor) -> Tensor:
        if not isinstance(v, Tensor) or v.shape != (len(x), k):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise NtkLensError(f"v must be a tensor of shape ({len(x)}, {k}), got {shape}")
        with eval_mode(model), torch.no_grad(), portable():
            params = detached(trainable_parameters(model))
            v = v.to(device=x.device, dtype=next(iter(params.values())).dtype)
            tangent = {name: torch.zeros_like(p) for name, p in params.items()}
            for rows in tiles:
                _, pullback = vjp(lambda p, xs=x[rows]: f(p, xs), params)
                for name, g in pullback(v[rows])[0].items():
                    tangent[name].add_(g)
            out = [jvp(lambda p, xs=x[r]: f(p, xs), (params,), (tangent,))[1] for r in tiles]
        return torch.cat(out)

    return matvec


def vector_products_kernel(model: nn.Module, n_outputs: int, full: bool) -> TiledKernel[Tensor]:
    """The eNTK from NTK-vector products, one block of samples at a time.

    For a block of columns (samples j, outputs b) the vjps u_jb = J_jᵀ e_b are taken per
    sample; one jvp per u_jb over the row samples gives the column Θ[:, :, j, b]. Only the
    block's parameter-space vectors are held, never the Jacobian of all samples.
    """
    k = n_outputs
    params = detached(trainable_parameters(model))
    f_single = single_sample_fn(model)
    f_batch = batched_fn(model)

    def contract(rows: Tensor, cols: Tensor) -> Tensor:
        try:
            return _contract(rows, cols)
        except RuntimeError as error:
            if untransformable(error):
                raise no_forward_ad(error) from error
            raise

    def _contract(rows: Tensor, cols: Tensor) -> Tensor:
        with torch.no_grad(), portable():
            cotangents = vmap(jacrev(f_single), in_dims=(None, 0))(params, cols)
            tangents = {name: u.flatten(0, 1) for name, u in cotangents.items()}

            def column(tangent: dict[str, Tensor]) -> Tensor:
                return jvp(lambda p: f_batch(p, rows), (params,), (tangent,))[1]

            columns = vmap(column)(tangents).view(len(cols), k, len(rows), k)
        if full:
            return columns.permute(2, 3, 0, 1)
        return columns.diagonal(dim1=1, dim2=3).sum(-1).T

    return TiledKernel(lambda x: x, contract)


def no_forward_ad(error: Exception) -> NtkLensError:
    """The error for a model that torch.func's forward mode cannot differentiate."""
    return NtkLensError(
        "vector products need torch.func's forward-mode AD, which fails on this model's "
        "custom autograd.Function (it needs setup_context and a vmap rule); use "
        "method='layerwise' or 'jacobian'"
    )


def vector_products_cost(probe: ModelProbe, full: bool) -> Cost:
    """Work and memory of :func:`vector_products_kernel`.

    Per column sample, K vjps (its Jacobian rows, held only for the block); per sample
    pair, K jvps of about two forwards each, holding primal and tangent activations.
    """
    k, size = probe.n_outputs, probe.element_size
    footprint = Footprint(
        feature=0.0,
        work=k * (probe.activation_bytes + probe.n_params * size),
        pair=k * (2 * probe.activation_bytes + (1 + (k if full else 0)) * size),
    )
    pair_flops = AUTOGRAD_SLOWDOWN * k * 2 * probe.forward_flops
    return Cost((1 + 2 * k) * probe.forward_flops, pair_flops, footprint)

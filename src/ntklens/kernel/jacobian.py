"""The eNTK by contracting per-sample Jacobians computed with torch.func.

Each tile of samples gets its Jacobians ∂f_a(x_i)/∂θ (one (T, K, P_p) tensor per
parameter) from ``vmap(jacrev)`` over single samples; two tiles' Jacobians contract into a
kernel block with one matmul per parameter. The layer-wise method reuses this for the
parameters its Gram identity does not cover.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from ntklens.kernel.functional import ModelProbe, detached, single_sample_fn, trainable_parameters
from ntklens.kernel.tiling import Cost, Footprint, TiledKernel


def per_sample_jacobians(model: nn.Module, names: Iterable[str], x: Tensor) -> Tensor:
    """∂f_a(x_i)/∂θ for the parameters ``names``, flattened and concatenated: (T, K, P).

    The other parameters are held constant. Differentiating one flat vector, whose
    pieces are viewed as the parameters, gives the Jacobian in one tensor.
    """
    params = detached(trainable_parameters(model))
    wanted = set(names)
    diff = [name for name in params if name in wanted]
    constants = {name: p for name, p in params.items() if name not in wanted}
    shapes = [params[name].shape for name in diff]
    sizes = [params[name].numel() for name in diff]
    flat = torch.cat([params[name].reshape(-1) for name in diff])
    f = single_sample_fn(model, constants)

    def f_flat(theta: Tensor, sample: Tensor) -> Tensor:
        pieces = theta.split(sizes)
        return f({n: p.view(s) for n, p, s in zip(diff, pieces, shapes, strict=True)}, sample)

    try:
        with torch.no_grad():
            return vmap(jacrev(f_flat), in_dims=(None, 0))(flat, x)
    except RuntimeError as error:
        if not untransformable(error):
            raise
    return _autograd_jacobians(model, diff, x)


def untransformable(error: Exception) -> bool:
    """Whether torch.func failed on a custom autograd.Function it cannot transform."""
    return "setup_context" in str(error) or "functorch" in str(error)


def _autograd_jacobians(model: nn.Module, names: list[str], x: Tensor) -> Tensor:
    """∂f_a(x_i)/∂θ by plain autograd, one sample and output at a time: (T, K, P).

    Exact where torch.func cannot go (a custom ``autograd.Function`` without
    ``setup_context``), at the price of T·K backward passes.
    """
    params = trainable_parameters(model)
    wanted = [params[name] for name in names]
    rows = []
    with torch.enable_grad():
        for sample in x:
            out = model(sample.unsqueeze(0)).reshape(-1)
            per_output = []
            for a in range(len(out)):
                grads = torch.autograd.grad(out[a], wanted, retain_graph=True, allow_unused=True)
                per_output.append(
                    torch.cat(
                        [
                            (g if g is not None else torch.zeros_like(p)).reshape(-1)
                            for g, p in zip(grads, wanted, strict=True)
                        ]
                    )
                )
            rows.append(torch.stack(per_output))
    return torch.stack(rows).detach()


def add_jacobian_product(block: Tensor, j1: Tensor, j2: Tensor) -> None:
    """Add J1 J2ᵀ to ``block``: (T1, K, T2, K) for the full kernel, else its output trace.

    ``j1`` (T1, K, P) and ``j2`` (T2, K, P) are per-sample Jacobians of the same parameters.
    """
    t1, k, _ = j1.shape
    t2 = j2.shape[0]
    if block.dim() == 4:
        block.view(t1 * k, t2 * k).addmm_(j1.reshape(t1 * k, -1), j2.reshape(t2 * k, -1).T)
    else:
        block.addmm_(j1.reshape(t1, -1), j2.reshape(t2, -1).T)


def empty_block(like: Tensor, t1: int, t2: int, k: int, full: bool) -> Tensor:
    """A zero kernel block for tiles of ``t1`` and ``t2`` samples."""
    shape = (t1, k, t2, k) if full else (t1, t2)
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def jacobian_cost(probe: ModelProbe, n_params: int, full: bool) -> Cost:
    """Work and memory of per-sample Jacobians of ``n_params`` parameters and their products.

    One forward and K backward passes (about 2 forwards each) per sample, K·P entries kept
    per sample, K copies of the activations and a copy of θ in the batched backward; per
    sample pair a
    product over K·P entries (times K more outputs for the full kernel).
    """
    k, size = probe.n_outputs, probe.element_size
    block_entries = k * k if full else 1
    footprint = Footprint(
        feature=k * n_params * size,
        work=k * probe.activation_bytes + n_params * size,
        pair=block_entries * size,
    )
    feature_flops = (1 + 2 * k) * probe.forward_flops
    pair_flops = 2 * (k * k if full else k) * n_params
    return Cost(feature_flops, pair_flops, footprint)


def jacobian_kernel(model: nn.Module, n_outputs: int, full: bool) -> TiledKernel[list[Tensor]]:
    """The eNTK of all trainable parameters from per-sample Jacobians, tile by tile."""
    names = list(trainable_parameters(model))

    def contract(f1: list[Tensor], f2: list[Tensor]) -> Tensor:
        block = empty_block(f1[0], len(f1[0]), len(f2[0]), n_outputs, full)
        with torch.no_grad():
            for j1, j2 in zip(f1, f2, strict=True):
                add_jacobian_product(block, j1, j2)
        return block

    return TiledKernel(lambda x: [per_sample_jacobians(model, names, x)], contract)

"""``explain``: which rule covers each trainable tensor, and what each method would cost.

The layer-wise method is only as fast as the share of parameters its structured rules
cover; a parameter that falls back costs a per-sample Jacobian pass. :func:`explain`
runs the same probe as :func:`ntklens.ntk` (two forward passes on 2 and 3 samples) and
reports, without computing the kernel, the rule per tensor and each method's estimated
FLOPs, time and peak memory under the budget.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ntklens.errors import NtkLensError
from ntklens.kernel.api import _prepared
from ntklens.kernel.functional import SelectOutput, trainable_parameters
from ntklens.kernel.tiling import format_bytes, plan_tiles
from ntklens.schema import KernelMethod, KernelOutput


@dataclass(frozen=True)
class ParameterRule:
    """A trainable tensor and the rule that covers it (or "fallback: why")."""

    name: str
    shape: tuple[int, ...]
    numel: int
    rule: str

    @property
    def structured(self) -> bool:
        return not self.rule.startswith("fallback")


@dataclass(frozen=True)
class MethodEstimate:
    """A method's estimated work and peak memory (None where it does not fit the budget)."""

    method: str
    gflop: float | None
    seconds: float | None
    peak_bytes: float | None
    tile: int | None
    cached: bool | None


@dataclass(frozen=True)
class Explanation:
    """What ``ntk`` would do for one call: rules per tensor, costs per method, the choice."""

    n1: int
    n2: int | None
    output: str
    parameters: list[ParameterRule]
    methods: list[MethodEstimate]
    choice: str
    matmul_gflops: float

    @property
    def structured_share(self) -> float:
        """The share of trainable entries covered by a structured rule."""
        total = sum(p.numel for p in self.parameters)
        return sum(p.numel for p in self.parameters if p.structured) / max(total, 1)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["structured_share"] = self.structured_share
        return data

    def __str__(self) -> str:
        width = max([len(p.name) for p in self.parameters] + [9])
        pairs = f"{self.n1}×{self.n2 if self.n2 is not None else self.n1}"
        lines = [
            f"eNTK ({self.output}) of {pairs} samples: {100 * self.structured_share:.1f}% of "
            f"{sum(p.numel for p in self.parameters):,} parameters structured",
            "",
            f"{'parameter':<{width}}  {'shape':<16} {'entries':>10}  rule",
        ]
        for p in self.parameters:
            shape = "×".join(map(str, p.shape)) or "scalar"
            lines.append(f"{p.name:<{width}}  {shape:<16} {p.numel:>10,}  {p.rule}")
        lines += ["", f"{'method':<16} {'GFLOP':>10} {'est. time':>10} {'peak':>10}  tiles"]
        for m in self.methods:
            if m.gflop is None:
                lines.append(f"{m.method:<16} {'':>10} {'':>10} {'':>10}  over the budget")
                continue
            assert m.seconds is not None and m.peak_bytes is not None
            mark = "  <- auto" if m.method == self.choice else ""
            tiles = f"{m.tile}{' cached' if m.cached else ''}"
            lines.append(
                f"{m.method:<16} {m.gflop:>10.2f} {_seconds(m.seconds):>10} "
                f"{format_bytes(m.peak_bytes):>10}  {tiles}{mark}"
            )
        lines.append(
            f"(time = estimated FLOPs, autograd weighted ×3, at this device's "
            f"{self.matmul_gflops:.0f} GFLOP/s matmul rate)"
        )
        return "\n".join(lines)


def explain(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    output: KernelOutput = "full",
    method: KernelMethod = "auto",
    memory_budget: int | str = "2GiB",
    dtype: torch.dtype | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
) -> Explanation:
    """What :func:`ntklens.ntk` with these arguments would do, without doing it."""
    with _prepared(model, x1, x2, output, method, memory_budget, dtype, output_fn) as setup:
        prefix = "model." if isinstance(setup.net, SelectOutput) else ""
        params = trainable_parameters(setup.net)
        parameters = [
            ParameterRule(
                name.removeprefix(prefix),
                tuple(p.shape),
                p.numel(),
                setup.plan.rules.get(name, "fallback: not probed"),
            )
            for name, p in params.items()
        ]
        rate = _matmul_gflops(setup.x1)
        methods, best, best_flops = [], "", math.inf
        n_all = setup.n1 + (setup.n2 or 0)
        for candidate in setup.candidates:
            footprint = candidate.cost.footprint
            try:
                plan = plan_tiles(setup.n1, setup.n2, footprint, setup.output_bytes, setup.budget)
            except NtkLensError:
                methods.append(MethodEstimate(candidate.name, None, None, None, None, None))
                continue
            flops = candidate.cost.total_flops(setup.n1, setup.n2, plan)
            kept = n_all if plan.cache else 2 * plan.tile
            peak = setup.output_bytes + footprint.peak(plan.tile, kept)
            methods.append(
                MethodEstimate(
                    candidate.name, flops / 1e9, flops / 1e9 / rate, peak, plan.tile, plan.cache
                )
            )
            if flops < best_flops:
                best, best_flops = candidate.name, flops
        return Explanation(
            setup.n1, setup.n2, str(output), parameters, methods, best or "none", rate
        )


def _matmul_gflops(like: Tensor, size: int = 384, repeats: int = 3) -> float:
    """This device's matmul rate in the model's precision, from a few small products."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    a = torch.randn(size, size, dtype=dtype, device=like.device)
    a @ a
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        if a.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / max(statistics.median(times), 1e-9) / 1e9


def _seconds(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.1f} s"

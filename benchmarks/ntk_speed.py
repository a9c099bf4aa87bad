"""Speed, peak memory and accuracy of ``ntklens.ntk`` against the torch.func tutorial.

Models: a 784→W→W→W→10 ReLU MLP (W = 512, 2048) and a CNN (conv 1→16→16, 3×3, no
padding, dense head) on 28×28×1 Fashion-MNIST test images, float32. For every method and
configuration it prints the median time of the timed runs, the speed-up over the faster of
two baselines written here after the torch.func "Neural Tangent Kernels" tutorial
(Jacobian contraction; NTK-vector products), the peak memory and the largest deviation
from a float64 reference. It also prints this machine's float32 matmul GFLOP/s next to
the GFLOP/s that ``layerwise`` achieves, and can time a trace kernel on 10,000 images.

    python benchmarks/ntk_speed.py                 # everything (tens of minutes)
    python benchmarks/ntk_speed.py --quick         # the configurations of the acceptance
    python benchmarks/ntk_speed.py --only cnn mlp512 --repeats 5
    python benchmarks/ntk_speed.py --zoo                   # the zoo alone (minutes)
    python benchmarks/ntk_speed.py --only gpt2-conv1d encoder-layer --zoo-n 64

The zoo: models written the way research code writes them (NTK-parameterized MLP with
``@`` and with einsum, GPT-2 Conv1D with ``addmm``, embedding with a tied head, a
TransformerEncoderLayer, ConvTranspose2d, weight_norm), each with a twin written with
``nn.Linear``/``F.linear`` where one exists. Per model: the share of parameters a
structured rule covers, auto's and the torch.func recipe's median times (taking turns with
the twin: five runs of the recipe, of auto and the twin as many as take about 2 s, 5 to 101),
their ratio, auto on the twin and auto / twin, the largest deviation of the twin's kernel
from the model's (the same model: rounding only), auto's GFLOP/s by the layerwise cost model
and the deviation from the recipe; float32 trace kernels, all in one process, of N samples
chosen per model so that the recipe takes 1-20 s on 2 idle cores.

Timing: sizes 8, 16, 32, … up to N/4 run first as warm-up and to extrapolate the time at N
(fit a·n + b·n²; or, as soon as linear scaling of one size alone is over the limit, that
scaling, marked *); a baseline whose estimate exceeds --limit seconds, or one of
ntklens' explicit methods over --method-limit ("auto" always runs), is skipped and said so.
Otherwise a warm-up at N (when under 10 s) and --repeats timed runs (at least 7 when under
5 s) follow, all in this process, the methods taking turns round by round. Peak memory:
one more run in a fresh subprocess, as the rise of its resident set's high-water mark
(reset through /proc/self/clear_refs after imports, data and model) over the resident set
just before the run. Reference: ntklens layerwise in float64 (checked against an explicit
Jacobian in tests/test_kernel.py) on the first 256 samples.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

import ntklens
from ntklens.data import load_dataset, preprocess
from ntklens.kernel.functional import eval_mode
from ntklens.kernel.layerwise import LayerwisePlan

BASELINE_MEMORY = 4 * 2**30  # bytes of Jacobians / vjps a baseline tile may hold
REFERENCE_SAMPLES = 256
SEED = 0
RECIPE_RUNS = 5  # timed runs of the torch.func recipe per zoo model
OUTPUT_MARKER = "NTK_SPEED_RESULT "


# --- models and data ---------------------------------------------------------------------


def build_model(name: str) -> nn.Module:
    """The benchmark's models, initialized from SEED."""
    torch.manual_seed(SEED)
    if name.startswith("mlp"):
        width = int(name[3:])
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 24 * 24, 10),
    )


def load_images(n: int) -> Tensor:
    """The first ``n`` Fashion-MNIST images (test split, then train), standardized."""
    data = preprocess(load_dataset("fashion-mnist"))
    return torch.cat([data.x_test, data.x_train])[:n].contiguous()


# --- the baselines: torch.func tutorial "Neural Tangent Kernels", on sample tiles ---------


def _single_sample(model: nn.Module) -> tuple[dict[str, Tensor], Callable]:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    return params, fnet_single


def tutorial_jacobian(model: nn.Module, x: Tensor, output: str) -> Tensor:
    """The tutorial's ``empirical_ntk_jacobian_contraction(fnet_single, params, x, x)``.

    Called on pairs of sample tiles where two tiles' Jacobians would not fit
    BASELINE_MEMORY, as a user of the tutorial would.
    """
    params, fnet_single = _single_sample(model)
    k = fnet_single(params, x[0]).numel()
    tile = _baseline_tile("tutorial-jacobian", model, k)

    def empirical_ntk_jacobian_contraction(x1: Tensor, x2: Tensor) -> Tensor:
        jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
        jac1 = [j.flatten(2) for j in jac1.values()]
        jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
        jac2 = [j.flatten(2) for j in jac2.values()]
        if output == "full":
            terms = [torch.einsum("Naf,Mbf->NMab", a, b) for a, b in zip(jac1, jac2, strict=True)]
            return torch.stack(terms).sum(0).permute(0, 2, 1, 3)
        terms = [torch.einsum("Naf,Maf->NM", a, b) for a, b in zip(jac1, jac2, strict=True)]
        return torch.stack(terms).sum(0)

    return _tile_pairs(x, tile, empirical_ntk_jacobian_contraction, output, k)


def tutorial_ntk_vps(model: nn.Module, x: Tensor, output: str) -> Tensor:
    """The tutorial's ``empirical_ntk_ntk_vps(fnet_single, params, x, x)``, on pairs of
    sample tiles whose vjps fit BASELINE_MEMORY."""
    params, fnet_single = _single_sample(model)
    k = fnet_single(params, x[0]).numel()
    tile = _baseline_tile("tutorial-ntk-vps", model, k)

    def get_ntk(x1: Tensor, x2: Tensor) -> Tensor:
        def func_x1(params: dict[str, Tensor]) -> Tensor:
            return fnet_single(params, x1)

        def func_x2(params: dict[str, Tensor]) -> Tensor:
            return fnet_single(params, x2)

        out, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec: Tensor) -> Tensor:
            vjps = vjp_fn(vec)
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps

        basis = torch.eye(out.numel(), dtype=out.dtype).view(out.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    def empirical_ntk_ntk_vps(x1: Tensor, x2: Tensor) -> Tensor:
        result = vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)
        if output == "full":
            return result.permute(0, 2, 1, 3)
        return torch.einsum("NMKK->NM", result)

    return _tile_pairs(x, tile, empirical_ntk_ntk_vps, output, k)


def _baseline_tile(method: str, model: nn.Module, k: int = 10) -> int:
    """Samples per tile: two tiles' Jacobians, or one tile pair's vjps, fit BASELINE_MEMORY."""
    size = k * 4 * sum(p.numel() for p in model.parameters())
    if method == "tutorial-jacobian":
        return max(1, BASELINE_MEMORY // (2 * size))
    return max(1, math.isqrt(BASELINE_MEMORY // size))


def _tile_pairs(x: Tensor, tile: int, kernel: Callable, output: str, k: int) -> Tensor:
    """``kernel(x, x)`` assembled from ``kernel`` on every pair of sample tiles."""
    if tile >= len(x):
        return kernel(x, x)
    n = len(x)
    result = torch.empty((n, k, n, k) if output == "full" else (n, n))
    tiles = [slice(i, min(i + tile, n)) for i in range(0, n, tile)]
    for rows in tiles:
        for cols in tiles:
            if output == "full":
                result[rows, :, cols, :] = kernel(x[rows], x[cols])
            else:
                result[rows, cols] = kernel(x[rows], x[cols])
    return result


def ntklens_method(method: str) -> Callable[[nn.Module, Tensor, str], Tensor]:
    def run(model: nn.Module, x: Tensor, output: str) -> Tensor:
        return ntklens.ntk(model, x, output=output, method=method)

    return run


METHODS: dict[str, Callable[[nn.Module, Tensor, str], Tensor]] = {
    "auto": ntklens_method("auto"),
    "layerwise": ntklens_method("layerwise"),
    "jacobian": ntklens_method("jacobian"),
    "vector-products": ntklens_method("vector-products"),
    "tutorial-jacobian": tutorial_jacobian,
    "tutorial-ntk-vps": tutorial_ntk_vps,
}
BASELINES = ("tutorial-jacobian", "tutorial-ntk-vps")


# --- measurements ------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    model: str
    n: int
    output: str
    methods: tuple[str, ...] = tuple(METHODS)


@dataclass
class Row:
    config: Config
    method: str
    seconds: float | None = None
    estimate: float | None = None
    linear_only: bool = False
    peak_bytes: float | None = None
    deviation: float | None = None
    note: str = ""


def extrapolate(
    model: nn.Module, x: Tensor, output: str, fn: Callable, limit: float
) -> tuple[float, int | None]:
    """Estimated seconds at len(x), from doubling sizes that also warm the code up.

    Fits a·n + b·n² to the last two sizes. Stops early, returning linear scaling of the
    last size and that size, as soon as that scaling alone exceeds ``limit``.
    """
    points: list[tuple[int, float]] = []
    n = 8
    while n <= len(x) // 4 or not points:
        start = time.perf_counter()
        fn(model, x[:n], output)
        points.append((n, time.perf_counter() - start))
        if points[-1][1] * len(x) / n > limit:
            return points[-1][1] * len(x) / n, n
        n *= 2
    if len(points) == 1:
        (n1, t1) = points[0]
        return t1 * len(x) / n1, n1
    (n1, t1), (n2, t2) = points[-2:]
    quadratic = max(0.0, (t2 / n2 - t1 / n1) / (n2 - n1))
    linear = max(0.0, t2 / n2 - quadratic * n2)
    return linear * len(x) + quadratic * len(x) ** 2, None


def time_interleaved(
    model: nn.Module, x: Tensor, output: str, rows: list[Row], repeats: int
) -> dict[str, Tensor]:
    """Median seconds of each row's method, timed in rounds that take turns.

    A shared machine's load comes in bursts; taking turns exposes every method to the
    same bursts. Methods estimated under 10 s get a warm-up run first; those under 5 s
    run at least 7 times, the others ``repeats`` times. Returns each method's last kernel.
    """
    for row in rows:
        if row.estimate < 10:
            METHODS[row.method](model, x, output)
    wanted = {row.method: repeats if row.estimate > 5 else max(repeats, 7) for row in rows}
    times: dict[str, list[float]] = {row.method: [] for row in rows}
    kernels: dict[str, Tensor] = {}
    while any(len(times[m]) < n for m, n in wanted.items()):
        for row in rows:
            if len(times[row.method]) < wanted[row.method]:
                start = time.perf_counter()
                kernels[row.method] = METHODS[row.method](model, x, output)
                times[row.method].append(time.perf_counter() - start)
                if row.method == "auto":
                    row.note = f"chose {CHOICES.methods[-1]}"
    for row in rows:
        row.seconds = statistics.median(times[row.method])
    return kernels


def peak_in_subprocess(config: Config, method: str, budget: str | None = None) -> dict:
    """Run one configuration once in a fresh process; its peak memory rise and time."""
    spec = {"model": config.model, "n": config.n, "output": config.output, "method": method}
    if budget is not None:
        spec["budget"] = budget
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(OUTPUT_MARKER):
            return json.loads(line[len(OUTPUT_MARKER) :])
    raise RuntimeError(f"memory probe failed for {spec}: {done.stderr.strip()[-2000:]}")


def measure_here(spec: dict) -> None:
    """The subprocess side of :func:`peak_in_subprocess`: prints one JSON line."""
    model = build_model(spec["model"])
    x = load_images(spec["n"])
    if spec["model"] == "cnn":
        x = x.reshape(-1, 1, 28, 28)
    if "budget" in spec:
        fn = lambda m, xs, out: ntklens.ntk(m, xs, output=out, memory_budget=spec["budget"])  # noqa: E731
    else:
        fn = METHODS[spec["method"]]
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    fn(model, x, spec["output"])
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - before) * 1024
    print(OUTPUT_MARKER + json.dumps({"peak_bytes": peak, "seconds": seconds}), flush=True)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def relative_deviation(kernel: Tensor, reference: Tensor) -> float:
    n = reference.shape[0]
    part = kernel[:n, :, :n, :] if kernel.dim() == 4 else kernel[:n, :n]
    return ((part.double() - reference).abs().max() / reference.abs().max()).item()


def matmul_gflops(size: int = 4096, repeats: int = 3) -> float:
    """This machine's float32 matmul speed: median of ``repeats`` size×size products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def layerwise_flops(model: nn.Module, x: Tensor, output: str) -> float:
    """FLOPs of the layerwise method by its analytic cost model, each sample pair once."""
    full = output == "full"
    with eval_mode(model):
        plan, probe = LayerwisePlan.probe(model, x, len(x) / 2, full)
        cost = plan.cost(probe)
    return cost.flops(len(x), len(x) * (len(x) + 1) / 2)


# --- the zoo: models as research code writes them ----------------------------------------


class ZooMlp(nn.Module):
    """A 784→W→W→10 ReLU MLP in NTK parameterization, written in one of three styles.

    "matmul": ``x @ W.T * σ/√n + b``; "einsum": ``einsum("bi,oi->bo", x, W)``; "linear":
    ``F.linear(x, W) * σ/√n + b`` (the twin). All styles share one set of parameters.
    """

    def __init__(self, width: int, style: str) -> None:
        super().__init__()
        dims = [784, width, width, 10]
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(o, i)) for i, o in itertools.pairwise(dims)]
        )
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(o)) for o in dims[1:]])
        self.style = style

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            scale = 1.4 / math.sqrt(w.shape[1])
            if self.style == "matmul":
                h = h @ w.T * scale + b
            elif self.style == "einsum":
                h = torch.einsum("bi,oi->bo", h, w) * scale + b
            else:
                h = F.linear(h, w) * scale + b
            if i < len(self.weights) - 1:
                h = torch.relu(h)
        return h


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored (in, out), ``addmm`` on the batch-folded rows."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) / math.sqrt(nx))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        size = (*x.shape[:-1], self.weight.shape[1])
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(size)


class Gpt2Mlp(nn.Module):
    """A GPT-2 MLP block (Conv1D d→4d→d, GELU, residual) on (N, L, d), then a head.

    ``linear``: the twin, the same weights transposed into ``nn.Linear`` layers.
    """

    def __init__(self, d: int, length: int, linear: bool = False) -> None:
        super().__init__()
        make = (lambda i, o: nn.Linear(i, o)) if linear else Conv1D
        self.fc, self.proj = make(d, 4 * d), make(4 * d, d)
        self.head = nn.Linear(d * length, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head((x + self.proj(F.gelu(self.fc(x)))).flatten(1))

    def twin(self) -> Gpt2Mlp:
        other = Gpt2Mlp(
            self.fc.weight.shape[0], self.head.in_features // self.fc.weight.shape[0], True
        )
        with torch.no_grad():
            for mine, theirs in ((self.fc, other.fc), (self.proj, other.proj)):
                theirs.weight.copy_(mine.weight.T)
                theirs.bias.copy_(mine.bias)
            other.head.load_state_dict(self.head.state_dict())
        return other


class TiedLm(nn.Module):
    """Token embedding, a GELU MLP, mean-pooled logits through the tied head ``h @ E.T``.

    ``linear``: the twin, the same tied head written ``F.linear(h, E)``.
    """

    def __init__(self, vocab: int, d: int, linear: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.linear = linear

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        h = (h + self.mlp(h)).mean(1)
        return F.linear(h, self.embed.weight) if self.linear else h @ self.embed.weight.T

    def twin(self) -> TiedLm:
        other = TiedLm(*self.embed.weight.shape, linear=True)
        other.load_state_dict(self.state_dict())
        return other


class Encoder(nn.Module):
    """``nn.TransformerEncoderLayer`` (batch first) on (N, L, d), mean-pooled to 10 logits."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(1))

    def twin(self) -> nn.Module:
        return HandEncoder(self)


class HandEncoder(nn.Module):
    """The same encoder written with ``nn.Linear`` projections and explicit attention."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        layer = encoder.layer
        d = layer.self_attn.embed_dim
        self.heads = layer.self_attn.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(layer.self_attn.in_proj_weight[i * d : (i + 1) * d])
                lin.bias.copy_(layer.self_attn.in_proj_bias[i * d : (i + 1) * d])
            self.o.load_state_dict(layer.self_attn.out_proj.state_dict())
        self.norm1, self.norm2 = copy.deepcopy(layer.norm1), copy.deepcopy(layer.norm2)
        self.ff1, self.ff2 = copy.deepcopy(layer.linear1), copy.deepcopy(layer.linear2)
        self.head = copy.deepcopy(encoder.head)

    def forward(self, x: Tensor) -> Tensor:
        n, length, d = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(n, length, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        h = self.norm1(x + self.o((weights @ v).transpose(1, 2).reshape(n, length, d)))
        h = self.norm2(h + self.ff2(torch.relu(self.ff1(h))))
        return self.head(h.mean(1))


class Deconv(nn.Module):
    """A decoder-style CNN: conv 1→C stride 2, ``ConvTranspose2d`` C→C stride 2, a head."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(channels * 28 * 28, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.up(torch.relu(self.down(x)))).flatten(1))


class WeightNormMlp(nn.Module):
    """784→W→W→10 ReLU MLP with ``parametrizations.weight_norm`` on every Linear.

    ``twin``: the same model written with ``F.linear`` on ``torch._weight_norm(v, g, 0)``
    (what ``nn.utils.weight_norm``'s hook computes): the same trainable (v, g, b), the same
    kernel. Plain Linears holding the materialized weights would be another model, with
    another kernel (with respect to W, without g's share).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        dims = [784, width, width, 10]
        wrap = nn.utils.parametrizations.weight_norm
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(wrap(nn.Linear(a, b)))
            if i < 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def twin(self) -> FunctionalWeightNormMlp:
        return FunctionalWeightNormMlp(self)


class FunctionalWeightNormMlp(nn.Module):
    """A :class:`WeightNormMlp` written with ``F.linear`` and ``torch._weight_norm``."""

    def __init__(self, model: WeightNormMlp) -> None:
        super().__init__()
        linears = [m for m in model.net if isinstance(m, nn.Linear)]
        weights = [m.parametrizations.weight for m in linears]
        copied = lambda t: nn.Parameter(t.detach().clone())  # noqa: E731
        self.v = nn.ParameterList(copied(w.original1) for w in weights)
        self.g = nn.ParameterList(copied(w.original0) for w in weights)
        self.b = nn.ParameterList(copied(m.bias) for m in linears)

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for i, (v, g, b) in enumerate(zip(self.v, self.g, self.b, strict=True)):
            h = F.linear(h, torch._weight_norm(v, g, 0), b)
            h = torch.relu(h) if i < len(self.v) - 1 else h
        return h


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry: the model, its F.linear/F.conv2d twin (or None) and its inputs."""

    build: Callable[[], tuple[nn.Module, nn.Module | None]]
    inputs: Callable[[int], Tensor]
    n: int = 128  # samples: the recipe takes 1-20 s on 2 idle cores, as the issue asks


def _images(n: int) -> Tensor:
    return load_images(n).reshape(-1, 1, 28, 28)


def _sequences(length: int, d: int) -> Callable[[int], Tensor]:
    return lambda n: torch.randn(n, length, d, generator=torch.Generator().manual_seed(SEED))


def _zoo() -> dict[str, ZooModel]:
    def mlp(style: str, width: int) -> Callable[[], tuple[nn.Module, nn.Module]]:
        def build() -> tuple[nn.Module, nn.Module]:
            torch.manual_seed(SEED)
            model = ZooMlp(width, style)
            twin = ZooMlp(width, "linear")
            twin.load_state_dict(model.state_dict())
            return model, twin

        return build

    def seeded(make: Callable[[], nn.Module], twin: bool = True):  # type: ignore[no-untyped-def]
        def build() -> tuple[nn.Module, nn.Module | None]:
            torch.manual_seed(SEED)
            model = make()
            return model, (model.twin() if twin else None)

        return build

    tokens = lambda n: torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(SEED))  # noqa: E731
    return {
        "ntk-mlp-matmul": ZooModel(mlp("matmul", 256), _images),
        "ntk-mlp-einsum": ZooModel(mlp("einsum", 256), _images),
        "gpt2-conv1d": ZooModel(seeded(lambda: Gpt2Mlp(128, 16)), _sequences(16, 128), 192),
        "tied-embedding": ZooModel(seeded(lambda: TiedLm(64, 64)), tokens),
        "encoder-layer": ZooModel(seeded(lambda: Encoder(64)), _sequences(16, 64), 320),
        "conv-transpose": ZooModel(seeded(lambda: Deconv(8), twin=False), _images, 288),
        "weight-norm-mlp": ZooModel(seeded(lambda: WeightNormMlp(256)), _images),
    }


def run_zoo(names: list[str] | None, n: int | None, console: Console) -> None:
    """Per zoo model (float32, trace kernel of ``n`` samples, else the model's own N): the
    structured share of parameters, auto's median time, the torch.func recipe's, their ratio,
    auto on the twin and auto's GFLOP/s; all in this process, the three taking turns, so
    ratios hold under load, seconds do not."""
    zoo = _zoo()
    table = Table(title="zoo: trace kernels, float32, one process")
    columns = (
        "model", "N", "params", "structured", "auto s", "recipe s", "× recipe", "twin s",
        "auto / twin", "twin dev", "GFLOP/s", "max rel dev", "auto chose",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "auto chose") else "right")
    for name in names or list(zoo):
        entry = zoo[name]
        model, twin = entry.build()
        x = entry.inputs(n or entry.n)
        share = ntklens.kernel.explain(model, x[:8], output="trace").structured_share
        auto = METHODS["auto"]
        auto(model, x[: len(x) // 4], "trace")
        start = time.perf_counter()
        auto(model, x, "trace")
        # fast kernels get more rounds (about 2 s of auto: a kernel of a few ms is at the
        # mercy of the VM's hiccups), the recipe five
        rounds = min(101, max(RECIPE_RUNS, math.ceil(2.0 / (time.perf_counter() - start))))
        times: dict[str, list[float]] = {"auto": [], "twin": [], "recipe": []}
        for round_ in range(rounds):  # taking turns, so that a slow spell hits all three
            # auto and the twin each go first in every other round: the call right after
            # the recipe (GiBs of Jacobians just freed) runs a few percent slower
            pair = [("auto", model), ("twin", twin)][:: 1 if round_ % 2 == 0 else -1]
            for what, net in (*pair, ("recipe", model)):
                if net is None or (what == "recipe" and round_ >= RECIPE_RUNS):
                    continue
                start = time.perf_counter()
                if what == "recipe":
                    recipe = tutorial_jacobian(net, x, "trace")
                else:
                    kernel = auto(net, x, "trace")
                times[what].append(time.perf_counter() - start)
                if what == "auto":
                    chose, mine = CHOICES.methods[-1], kernel
                elif what == "twin":
                    theirs = kernel
        recipe_s = statistics.median(times["recipe"])
        auto_s = statistics.median(times["auto"])
        twin_s = statistics.median(times["twin"]) if times["twin"] else None
        rate = layerwise_flops(model, x, "trace") / auto_s / 1e9 if chose == "layerwise" else None
        deviation = ((mine - recipe).abs().max() / recipe.abs().max()).item()
        # the twin is the same model (same kernel, to rounding) written another way
        twin_dev = ((theirs - mine).abs().max() / mine.abs().max()).item() if twin else None
        table.add_row(
            name,
            str(len(x)),
            f"{sum(p.numel() for p in model.parameters()):,}",
            f"{100 * share:.1f}%",
            f"{auto_s:.3f}",
            f"{recipe_s:.2f}",
            f"{recipe_s / auto_s:.1f}",
            f"{twin_s:.3f}" if twin_s is not None else "",
            f"{auto_s / twin_s:.2f}" if twin_s is not None else "",
            f"{twin_dev:.1e}" if twin_dev is not None else "",
            f"{rate:.1f}" if rate is not None else "",
            f"{deviation:.1e}",
            chose,
        )
        console.log(f"zoo {name}: auto {auto_s:.3f} s, recipe {recipe_s:.2f} s")
    console.print(table)


# --- the run -----------------------------------------------------------------------------


def all_configs() -> list[Config]:
    configs = []
    for model in ("mlp512", "mlp2048"):
        for n in (256, 1024):
            for output in ("full", "trace"):
                configs.append(Config(model, n, output))
    configs.append(Config("cnn", 128, "full"))
    for n in (256, 1024):
        for output in ("full", "trace"):
            configs.append(Config("cnn", n, output))
    return configs


def quick_configs() -> list[Config]:
    return [
        Config("mlp512", 256, "full"),
        Config("mlp512", 256, "trace"),
        Config("cnn", 128, "full", ("auto", "layerwise", "tutorial-jacobian")),
        Config("mlp2048", 1024, "trace", ("auto",)),
    ]


def run_config(
    config: Config, images: Tensor, repeats: int, limits: tuple[float, float], console: Console
) -> list[Row]:
    """Time, memory and deviation of every method of ``config``.

    ``limits``: seconds above which a baseline, or one of ntklens' explicit methods, is
    skipped ("auto" always runs).
    """
    model = build_model(config.model)
    x = images[: config.n]
    if config.model == "cnn":
        x = x.reshape(-1, 1, 28, 28)
    reference = ntklens.ntk(
        model,
        x[:REFERENCE_SAMPLES],
        output=config.output,
        method="layerwise",
        dtype=torch.float64,
    )
    rows = [Row(config, method) for method in config.methods]
    for row in rows:
        limit = limits[0] if row.method in BASELINES else limits[1]
        if row.method == "auto":
            limit = math.inf
        fn = METHODS[row.method]
        row.estimate, scaled_from = extrapolate(model, x, config.output, fn, limit)
        row.linear_only = scaled_from is not None
        if row.estimate > limit:
            how = f"n={scaled_from} scaled linearly gives" if scaled_from else "estimated"
            row.note = f"skipped: {how} {row.estimate:.0f} s > {limit:.0f} s"
    timed = [row for row in rows if not row.note]
    kernels = time_interleaved(model, x, config.output, timed, repeats)
    for row in timed:
        row.deviation = relative_deviation(kernels.pop(row.method), reference)
        row.peak_bytes = peak_in_subprocess(config, row.method)["peak_bytes"]
    for row in rows:
        if row.method in BASELINES and config.n > _baseline_tile(row.method, model):
            row.note = "; ".join(filter(None, [row.note, "tutorial code on tile pairs"]))
        console.log(
            f"{config.model} N={config.n} {config.output} {row.method}: "
            f"{row.seconds or row.estimate:.2f} s {row.note}"
        )
    return rows


class _Choices(logging.Handler):
    """Keeps the method names that ``ntklens.ntk`` logs when it picks one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.methods: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.methods.append(str(record.args[0]))


CHOICES = _Choices()


def print_table(rows: list[Row], console: Console) -> None:
    table = Table(title="ntklens.ntk vs the torch.func tutorial (float32, x2=None)")
    for column in (
        "model",
        "N",
        "output",
        "method",
        "median s",
        "× faster baseline",
        "peak MiB",
        "max rel dev",
        "note",
    ):
        table.add_column(column, justify="right" if column not in ("method", "note") else "left")
    for row in rows:
        same = [r for r in rows if r.config == row.config and r.method in BASELINES]
        fastest = min(same, key=lambda r: r.seconds or r.estimate, default=None)
        mine = row.seconds
        speedup = ""
        if fastest is not None and mine is not None and row.method not in BASELINES:
            base = fastest.seconds or fastest.estimate
            kind = "" if fastest.seconds else " (vs lin.)" if fastest.linear_only else " (vs est.)"
            speedup = f"{base / mine:.1f}{kind}"
        table.add_row(
            row.config.model,
            str(row.config.n),
            row.config.output,
            row.method,
            f"{mine:.3f}" if mine is not None else f"~{row.estimate:.0f}" + "*" * row.linear_only,
            speedup,
            f"{row.peak_bytes / 2**20:.0f}" if row.peak_bytes is not None else "",
            f"{row.deviation:.1e}" if row.deviation is not None else "",
            row.note,
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the acceptance configs")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("mlp512", "mlp2048", "cnn", "fmnist", "gemm", "zoo", *_zoo()),
        help="run only these parts (zoo: all zoo models; or single zoo models by name)",
    )
    parser.add_argument("--zoo", action="store_true", help="run only the zoo")
    parser.add_argument(
        "--zoo-n", type=int, default=None, help="samples of every zoo kernel (default: per model)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per config (≥3)")
    parser.add_argument(
        "--limit", type=float, default=120.0, help="skip baselines estimated slower (s)"
    )
    parser.add_argument(
        "--method-limit",
        type=float,
        default=60.0,
        help="skip ntklens' explicit methods estimated slower (s)",
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure_here(json.loads(args.measure))
        return
    console = Console(width=160)
    logger = logging.getLogger("ntklens.kernel.api")
    logger.addHandler(CHOICES)
    logger.setLevel(logging.INFO)
    parts = set(args.only or ("mlp512", "mlp2048", "cnn", "fmnist", "gemm", "zoo"))
    if args.zoo:
        parts = {"zoo"}
    zoo_names = sorted(parts & set(_zoo()), key=list(_zoo()).index)
    if zoo_names or "zoo" in parts:
        run_zoo(zoo_names or None, args.zoo_n, console)
        parts -= {"zoo", *zoo_names}
        if not parts:
            return
    configs = quick_configs() if args.quick else all_configs()
    images = load_images(max(c.n for c in configs))
    console.log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows: list[Row] = []
    done: list[Row] = []
    for config in configs:
        if config.model in parts:
            limits = (args.limit, args.method_limit)
            done = run_config(config, images, args.repeats, limits, console)
            print_table(done, console)
            rows.extend(done)
    if len(rows) > len(done):
        print_table(rows, console)
    if "gemm" in parts:
        gemm = matmul_gflops()
        console.print(f"float32 matmul (4096×4096): {gemm:.1f} GFLOP/s on this machine")
        for row in rows:
            if row.method in ("layerwise", "auto") and row.seconds is not None:
                model = build_model(row.config.model)
                x = images[: row.config.n]
                if row.config.model == "cnn":
                    x = x.reshape(-1, 1, 28, 28)
                rate = layerwise_flops(model, x, row.config.output) / row.seconds / 1e9
                console.print(
                    f"  {row.method} {row.config.model} N={row.config.n} {row.config.output}: "
                    f"{rate:.1f} GFLOP/s ({rate / gemm:.0%} of matmul)"
                )
    if "fmnist" in parts:
        result = peak_in_subprocess(Config("mlp512", 10_000, "trace"), "auto", budget="4GiB")
        console.print(
            f"trace kernel of 10,000 Fashion-MNIST images, W=512 MLP, memory_budget='4GiB': "
            f"{result['seconds']:.1f} s, peak rise {result['peak_bytes'] / 2**30:.2f} GiB"
        )


if __name__ == "__main__":
    main()

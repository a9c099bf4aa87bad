"""Correctness of ntklens.ntk against an explicit per-parameter Jacobian.

The ground truth loops ``torch.autograd.grad`` over every (sample, output) pair of a
float64 model, one sample at a time, independently of the code under test.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import ntklens
from ntklens.errors import NtkLensError
from ntklens.kernel import api, tiling
from ntklens.kernel.functional import eval_mode
from ntklens.kernel.layerwise import LayerwisePlan
from ntklens.kernel.products import ntk_matvec
from ntklens.kernel.tiling import Footprint, TilePlan, plan_tiles

METHODS = ("jacobian", "vector-products", "layerwise", "auto")
RTOL = 1e-10


def explicit_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """J[i, a, p] = ∂f_a(x_i)/∂θ_p by one autograd call per sample and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for sample in x:
        out = model(sample.unsqueeze(0)).reshape(-1)
        per_output = []
        for a in range(out.numel()):
            grads = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
            per_output.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1)
                        for g, p in zip(grads, params, strict=True)
                    ]
                )
            )
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def reference_kernel(model: nn.Module, x1: Tensor, x2: Tensor | None, output: str) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        j1 = explicit_jacobian(model, x1)
        j2 = j1 if x2 is None else explicit_jacobian(model, x2)
    finally:
        model.train(was_training)
    full = torch.einsum("iap,jbp->iajb", j1, j2)
    return full if output == "full" else torch.einsum("iaja->ij", full)


def assert_close(actual: Tensor, expected: Tensor) -> None:
    assert actual.shape == expected.shape
    scale = expected.abs().max()
    assert scale > 0
    error = (actual - expected).abs().max() / scale
    assert error < RTOL, f"max relative deviation {error:.3g}"


class TwiceLinear(nn.Module):
    """Applies one Linear twice (shared weights) with a nonlinearity between."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        return self.head(torch.tanh(self.shared(h)))


class SequenceLinear(nn.Module):
    """A Linear on a (N, S, D) input, then a head on the flattened sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 5)
        self.head = nn.Linear(15, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(x)).flatten(1))


class FreeParameter(nn.Module):
    """A free scale parameter and a Linear whose weight is also used outside F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x) * self.scale
        return h + torch.tanh(x @ self.fc.weight.T)


def mlp() -> nn.Module:
    """An MLP with biases; its in-place ReLU overwrites a Linear output."""
    return nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding="same", bias=False),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 2, groups=2, dilation=1, padding_mode="reflect", padding=1),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2),
        nn.Tanh(),
        nn.Conv1d(3, 3, 2),
        nn.Flatten(),
        nn.Linear(12, 2),
    )


def layer_norm() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


def batch_norm() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)
    ).double()
    with torch.no_grad():
        model(torch.randn(16, 2, 4, 4, dtype=torch.float64) * 2 + 1)  # non-trivial running stats
    return model


MODELS = {
    "mlp": (mlp, (5,)),
    "cnn": (cnn, (2, 13, 13)),
    "conv1d": (conv1d, (2, 11)),
    "layernorm": (layer_norm, (5,)),
    "twice": (TwiceLinear, (5,)),
    "batchnorm": (batch_norm, (2, 4, 4)),
    "sequence": (SequenceLinear, (3, 4)),
    "free-parameter": (FreeParameter, (4,)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request: pytest.FixtureRequest) -> dict:
    """A float64 model, two input sets and its reference kernels."""
    build, shape = MODELS[request.param]
    torch.manual_seed(0)
    model = build().double()
    x1 = torch.randn(5, *shape, dtype=torch.float64)
    x2 = torch.randn(3, *shape, dtype=torch.float64)
    references = {
        (output, symmetric): reference_kernel(model, x1, None if symmetric else x2, output)
        for output, symmetric in itertools.product(("full", "trace"), (True, False))
    }
    return {"name": request.param, "model": model, "x1": x1, "x2": x2, "references": references}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("output", ["full", "trace"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["x2=None", "x2"])
def test_matches_explicit_jacobian(case: dict, method: str, output: str, symmetric: bool) -> None:
    x2 = None if symmetric else case["x2"]
    kernel = ntklens.ntk(case["model"], case["x1"], x2, output=output, method=method)
    assert_close(kernel, case["references"][(output, symmetric)])


@pytest.mark.parametrize("method", ["jacobian", "vector-products", "layerwise"])
def test_shrinking_budget_tiles_until_it_cannot(
    case: dict, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ever smaller budgets give ever smaller tiles, the same kernel, then a clear error."""
    if case["name"] not in ("mlp", "twice", "layernorm"):
        pytest.skip("tiling is model-independent; three small models cover it")
    plans: list[TilePlan] = []

    def recording_plan_tiles(*args: object, **kwargs: object) -> TilePlan:
        plans.append(plan_tiles(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(api, "plan_tiles", recording_plan_tiles)
    budget = 2**18
    with pytest.raises(NtkLensError, match="memory_budget") as raised:
        while budget > 1:
            for x2, output in ((None, "full"), (case["x2"], "trace")):
                kernel = ntklens.ntk(
                    case["model"],
                    case["x1"],
                    x2,
                    output=output,
                    method=method,
                    memory_budget=budget,
                )
                assert_close(kernel, case["references"][(output, x2 is None)])
            budget = budget * 2 // 3
    assert "\n" not in str(raised.value)
    assert min(plan.tile for plan in plans) == 1
    assert not all(plan.cache for plan in plans)


def test_tile_plan_keeps_features_unless_that_shrinks_tiles_too_far() -> None:
    """Closed-form budgets: peak = kept·feature + tile·work (pair and output 0 here)."""
    cheap_features = Footprint(feature=100, work=10_000, pair=0)
    # keeping all 1000 samples' features allows 60-sample tiles, recomputing allows 68
    assert plan_tiles(1000, None, cheap_features, 0, 700_000) == TilePlan(60, cache=True)
    costly_features = Footprint(feature=5_000, work=1_000, pair=0)
    # keeping allows 30-sample tiles, recomputing 457: far more than twice as large
    assert plan_tiles(1000, None, costly_features, 0, 5_030_000) == TilePlan(457, cache=False)


def test_cached_features_are_computed_in_cache_sized_chunks() -> None:
    """Cheap features, costly work: chunks of _CACHE_FRIENDLY_WORK; otherwise none."""
    work = tiling._CACHE_FRIENDLY_WORK / 40
    cheap = Footprint(feature=work / 100, work=work, pair=0)
    assert plan_tiles(1000, None, cheap, 0, 10**12) == TilePlan(1000, cache=True, chunk=40)
    # a tile that already fits the cache is featurized whole
    assert plan_tiles(30, None, cheap, 0, 10**12) == TilePlan(30, cache=True)
    # features that are a large share of the work: joining them would cost more
    dear = Footprint(feature=work / 2, work=work, pair=0)
    assert plan_tiles(1000, None, dear, 0, 10**12) == TilePlan(1000, cache=True)


def test_matvec_matches_explicit_kernel(case: dict) -> None:
    full = ntklens.flatten(case["references"][("full", True)])
    n, k = len(case["x1"]), full.shape[0] // len(case["x1"])
    v = torch.randn(n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = ntk_matvec(case["model"], case["x1"])(v)
    assert_close(result.reshape(-1), full @ v.reshape(-1))


def test_flatten_row_index_is_i_times_k_plus_a() -> None:
    kernel = torch.randn(3, 2, 4, 2, generator=torch.Generator().manual_seed(0))
    flat = ntklens.flatten(kernel)
    assert flat.shape == (6, 8)
    assert flat[1 * 2 + 1, 3 * 2 + 0] == kernel[1, 1, 3, 0]


@pytest.mark.parametrize("n", [300, 520])
def test_diagonal_tiles_split_into_sub_blocks_match(n: int) -> None:
    """Enough samples that a diagonal tile is contracted as upper sub-blocks only (halved
    twice at 300 samples, three times at 520)."""
    torch.manual_seed(0)
    model = mlp().double()
    x = torch.randn(n, 5, dtype=torch.float64)
    for output in ("full", "trace"):
        expected = reference_kernel(model, x, None, output)
        for method in ("layerwise", "jacobian"):
            assert_close(ntklens.ntk(model, x, output=output, method=method), expected)


@pytest.mark.parametrize(
    ("n", "min_rows", "min_tile"),
    [(1, 1, 1), (7, 1, 1), (300, 64, 256), (520, 64, 256), (127, 64, 1), (200, 64, 256)],
)
def test_upper_sub_blocks_cover_each_pair_once(
    n: int, min_rows: int, min_tile: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sub-blocks and the mirrors of the off-diagonal ones cover every (row, col) exactly
    once, no part is smaller than the minimum unless the tile is, and a tile below the
    minimum to split is one block."""
    monkeypatch.setattr(tiling, "_MIN_SPLIT_ROWS", min_rows)
    monkeypatch.setattr(tiling, "_MIN_SPLIT_TILE", min_tile)
    blocks = tiling.upper_sub_blocks(n)
    assert (len(blocks) == 1) == (n < max(min_tile, 2 * min_rows))
    covered = torch.zeros(n, n, dtype=torch.int64)
    for rows, cols in blocks:
        assert min(rows.stop - rows.start, cols.stop - cols.start) >= min(min_rows, n)
        covered[rows, cols] += 1
        if rows != cols:
            assert rows.stop <= cols.start  # strictly above the diagonal
            covered[cols, rows] += 1
    assert torch.equal(covered, torch.ones(n, n, dtype=torch.int64))


class FlatBatch(nn.Module):
    """Folds a sequence into the batch before its Linear: rows are positions of samples."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(x.reshape(-1, 4)).reshape(len(x), -1)


class Unstructured(nn.Module):
    """A weight used nonlinearly (sin) beside a Linear: only that weight falls back."""

    def __init__(self) -> None:
        super().__init__()
        self.odd = nn.Parameter(torch.randn(3, 4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + x @ torch.sin(self.odd).T


@pytest.mark.parametrize(
    ("build", "shape", "gram_weights", "fallback"),
    [
        (mlp, (5,), {"0.weight", "2.weight", "4.weight"}, set()),
        (TwiceLinear, (5,), {"inp.weight", "shared.weight", "head.weight"}, set()),
        (layer_norm, (5,), {"0.weight", "3.weight"}, set()),
        (FreeParameter, (4,), {"fc.weight"}, set()),
        (FlatBatch, (3, 4), set(), set()),  # structured, as per-sample gradients
        (Unstructured, (4,), {"fc.weight"}, {"odd"}),
    ],
)
def test_layerwise_covers_linear_layers_and_falls_back_for_the_rest(
    build: Callable[[], nn.Module],
    shape: tuple[int, ...],
    gram_weights: set[str],
    fallback: set[str],
) -> None:
    """The Gram identity is really used where it applies; other parameters are exact."""
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    with eval_mode(model):
        plan, _ = LayerwisePlan.probe(model, x, n_pairs=2.0, full=True)
    assert {g.key for g in plan.groups if g.mode == "gram"} == gram_weights
    assert set(plan.fallback) == fallback
    shared = [g for g in plan.groups if g.key == "shared.weight"]
    assert all(g.positions == 2 for g in shared)
    assert_close(
        ntklens.ntk(model, x, method="layerwise"), reference_kernel(model, x, None, "full")
    )


def test_model_state_is_left_as_it_was() -> None:
    """Training flags (mixed), parameters and BatchNorm statistics are unchanged."""
    torch.manual_seed(0)
    model = batch_norm()
    model.train()
    model[4].eval()
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    for method in ("jacobian", "vector-products", "layerwise"):
        ntklens.ntk(model, x, method=method)
        ntk_matvec(model, x)(torch.ones(4, 2, dtype=torch.float64))
    assert [m.training for m in model.modules()] == flags
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_dtype_computes_on_a_cast_copy() -> None:
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(4, 5)
    kernel = ntklens.ntk(model, x, output="trace", dtype=torch.float64)
    assert kernel.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_close(kernel, reference_kernel(model.double(), x.double(), None, "trace"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["jacobian", "vector-products", "layerwise"])
def test_runs_on_the_models_cuda_device(method: str) -> None:
    torch.manual_seed(0)
    model = cnn().double()
    x = torch.randn(4, 2, 13, 13, dtype=torch.float64)
    expected = reference_kernel(model, x, None, "full")
    kernel = ntklens.ntk(model.cuda(), x, method=method)
    assert kernel.device.type == "cuda"
    assert_close(kernel.cpu(), expected)


def small_image_cnn() -> nn.Module:
    """The benchmark's CNN shape (conv 1→16→16, 3×3, dense head) on 10×10 images."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 6 * 6, 10),
    )


@pytest.mark.parametrize(
    ("build", "shape"), [(mlp, (5,)), (TwiceLinear, (5,)), (small_image_cnn, (1, 10, 10))]
)
@pytest.mark.parametrize("output", ["full", "trace"])
def test_auto_picks_layerwise_for_linear_and_conv_models(
    build: Callable[[], nn.Module],
    shape: tuple[int, ...],
    output: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, *shape)
    with caplog.at_level(logging.INFO, logger="ntklens.kernel.api"):
        ntklens.ntk(build(), x, output=output)
    assert caplog.records[-1].args[0] == "layerwise"


class TokenModel(nn.Module):
    """An embedding of integer tokens (a non-Linear parameter), mixed by a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens))).sum(dim=1)


@pytest.mark.parametrize("method", METHODS)
def test_embedding_of_integer_inputs_matches(method: str) -> None:
    torch.manual_seed(0)
    model = TokenModel().double()
    tokens = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(0))
    other = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1))
    kernel = ntklens.ntk(model, tokens, other, method=method)
    assert_close(kernel, reference_kernel(model, tokens, other, "full"))

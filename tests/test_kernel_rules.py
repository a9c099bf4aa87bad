"""The structured rules on models as research code writes them, against explicit Jacobians.

Every model is checked with every method, full and trace, symmetric and cross, within
1e-10 relative (float64) of the per-(sample, output) autograd Jacobian of
``tests/test_kernel.py``; the plan must also really structure the parameters it claims.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ntklens
from ntklens.errors import NtkLensError
from ntklens.kernel import layerwise, tiling
from ntklens.kernel.functional import eval_mode
from ntklens.kernel.layerwise import LayerwisePlan
from ntklens.kernel.products import ntk_matvec
from test_kernel import assert_close, reference_kernel

METHODS = ("jacobian", "vector-products", "layerwise", "auto")


class SequenceFirst(nn.Module):
    """A feed-forward block on PyTorch's sequence-first layout (T, B, d), T = 2."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(3, 5)
        self.down = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x.transpose(0, 1)  # (T, B, d)
        h = self.down(torch.tanh(self.up(h)))
        return h.transpose(0, 1).flatten(1)


class LearnedQueries(nn.Module):
    """Two learned query vectors, projected by ``F.linear(self.queries, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(2, 4))
        self.wq = nn.Parameter(torch.randn(4, 4) / 2)
        self.keys = nn.Linear(4, 4)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        q = F.linear(self.queries, self.wq)  # (2, 4): rows are queries, not samples
        k = self.keys(x)  # (N, L, 4)
        attention = torch.softmax(k @ q.T, dim=1)  # (N, L, 2)
        pooled = torch.einsum("nlq,nld->nqd", attention, x)
        return self.head(pooled.flatten(1))


class NtkMlp(nn.Module):
    """NTK parameterization written with ``@``: x @ W.T * σ/√n + b, W stored (out, in)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 5))
        self.b1 = nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(6, 6))
        self.w3 = nn.Parameter(torch.randn(3, 6))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(x @ self.w1.T * (1.4 / math.sqrt(5)) + self.b1)
        h = torch.tanh(torch.matmul(h, self.w2.t()) / math.sqrt(6))
        return ((self.w3 * 0.5) @ h.T).T


class SharedScaledOutput(nn.Module):
    """``o = x @ W.T`` feeds ``o * 2 + b`` and a residual: the bias must not fold into W;
    nor can ``c``, added at only one of W's two uses."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) / 2)
        self.b = nn.Parameter(torch.randn(4))
        self.c = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        o = x @ self.w.T
        folded = torch.tanh(torch.einsum("bi,oi->bo", x, self.w) / 3 - self.c)
        return self.head(torch.tanh(o * 2 + self.b) + o + folded)


class EinsumMlp(nn.Module):
    """Weights in both layouts, contracted by two-operand einsum."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(5, 6))  # (in, out)
        self.w2 = nn.Parameter(torch.randn(3, 6))  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(torch.einsum("bi,io->bo", x, self.w1))
        return torch.einsum("oi,bi->bo", self.w2, h)


class EinsumSequence(nn.Module):
    """Einsum with the output channel before positions ("bli,oi->bol"), then a weight
    contracted with a sum over positions in the same call ("bol,ko->bk")."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(5, 4) / 2)  # (out, in)
        self.w2 = nn.Parameter(torch.randn(2, 5) / 2)  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(torch.einsum("bli,oi->bol", x, self.w1))
        return torch.einsum("bol,ko->bk", h, self.w2)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored (in, out), ``addmm`` on the batch-folded rows."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) / math.sqrt(nx))
        self.bias = nn.Parameter(torch.randn(nf) / 4)
        self.nf = nf

    def forward(self, x: Tensor) -> Tensor:
        size = (*x.shape[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(size)


class Gpt2Block(nn.Module):
    """Two Conv1D layers on a (N, L, d) sequence, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = Conv1D(4, 6)
        self.proj = Conv1D(6, 4)
        self.head = nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head((x + self.proj(torch.tanh(self.fc(x)))).flatten(1))


class TiedEmbedding(nn.Module):
    """Tokens embedded, mixed, and read out through the tied embedding ``h @ E.T``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.pos = nn.Parameter(torch.randn(1, 5, 4) / 2)
        self.mix = nn.Linear(4, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.embed(tokens) + self.pos[:, : tokens.shape[1]]))
        return h[:, -1] @ self.embed.weight.T


class TiedPaddedEmbedding(nn.Module):
    """A tied embedding with a padding index: its row gets gradients from the head only."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 3, padding_idx=0)

    def forward(self, tokens: Tensor) -> Tensor:
        return torch.tanh(self.embed(tokens)).mean(1) @ self.embed.weight.T


class PaddedEmbedding(nn.Module):
    """An embedding with a padding index, untied, then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 3, padding_idx=0)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens)).mean(1))


class Encoder(nn.Module):
    """``nn.TransformerEncoderLayer`` (batch first, norm first), mean-pooled to a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            4, 2, 6, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(1))


class Attention(nn.Module):
    """``nn.MultiheadAttention`` sequence first, with a key padding mask and weights out."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        seq = x.transpose(0, 1)
        mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        mask[:, -1] = True
        out, weights = self.attn(seq, seq, seq, key_padding_mask=mask)
        return self.head(out.mean(0)) + weights.sum(1)[:, :2]


class Transposed(nn.Module):
    """``conv_transpose1d``/``2d`` with stride, padding, output padding and groups."""

    def __init__(self) -> None:
        super().__init__()
        self.up2 = nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.up1 = nn.ConvTranspose1d(4, 2, 2, stride=1, dilation=2, bias=False)
        self.head = nn.Linear(2 * 38, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.up2(x))  # (N, 4, 6, 6)
        h = self.up1(h.flatten(2))  # (N, 2, 38)
        return self.head(h.flatten(1))


def weight_norm_mlp() -> nn.Module:
    wn = nn.utils.parametrizations.weight_norm
    return nn.Sequential(wn(nn.Linear(5, 6)), nn.Tanh(), wn(nn.Linear(6, 3)))


class _Symmetric(nn.Module):
    """A user's own parametrization: W = A + Aᵀ."""

    def forward(self, a: Tensor) -> Tensor:
        return a + a.T


def parametrized_mlp() -> nn.Module:
    """spectral_norm (eval: fixed power-iteration vectors), orthogonal (matrix_exp) with
    its bias, a user's own parametrization, and two chained on one weight."""
    p = nn.utils.parametrizations
    torch.manual_seed(0)
    first = p.spectral_norm(nn.Linear(5, 6))
    second = p.orthogonal(nn.Linear(6, 6))
    third = nn.Linear(6, 6, bias=False)
    nn.utils.parametrize.register_parametrization(third, "weight", _Symmetric())
    last = p.spectral_norm(nn.Linear(6, 3))
    nn.utils.parametrize.register_parametrization(last, "weight", _Symmetric2())
    return nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), third, nn.Tanh(), last).eval()


class _Symmetric2(nn.Module):
    """A second parametrization chained after spectral_norm on a non-square weight."""

    def forward(self, w: Tensor) -> Tensor:
        return w * torch.sigmoid(w)


class Norms(nn.Module):
    """GroupNorm, RMSNorm, a per-channel scale and an additive parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.group = nn.GroupNorm(2, 4)
        self.rms = nn.RMSNorm(4)
        self.gamma = nn.Parameter(torch.randn(4))
        self.shift = nn.Parameter(torch.randn(4, 1))
        self.head = nn.Linear(4 * 5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.group(self.conv(x)) - self.shift)  # (N, 4, 5)
        h = self.rms(h.transpose(1, 2)) * self.gamma  # (N, 5, 4)
        return self.head(h.flatten(1))


class Views(nn.Module):
    """A flat parameter viewed (out, in), chunked, sliced, permuted; bmm on an expansion."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Parameter(torch.randn(2 * 4 * 4))
        self.packed = nn.Parameter(torch.randn(4, 12))
        self.cube = nn.Parameter(torch.randn(4, 1, 3))

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.flat.view(2, 4, 4).unbind(0)
        q, k, _ = self.packed.chunk(3, dim=1)
        h = torch.tanh(F.linear(x, a) + x @ q)
        h = torch.tanh(h @ b.transpose(0, 1) - torch.mm(h, k[:, :4]) / 2)
        w = self.cube.permute(1, 0, 2).squeeze(0)  # (4, 3)
        rows = h[:, None, :]  # (N, 1, 4)
        return torch.bmm(rows, w.expand(len(x), 4, 3)).squeeze(1) + torch.baddbmm(
            torch.zeros(len(x), 1, 3, dtype=x.dtype), rows, -w.expand(len(x), 4, 3), alpha=0.5
        ).squeeze(1)


class Overlapping(nn.Module):
    """One square weight used as W and as Wᵀ: overlapping index maps."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w) @ self.w.T[:, :3]


class Expanded(nn.Module):
    """A row expanded into a weight (each entry used 3 times in one use) and a weight used
    whole and sliced: the scattered and the gathered per-sample gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.row = nn.Parameter(torch.randn(1, 4))
        self.w = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(x @ self.w)
        return h @ self.row.expand(3, 4).T + torch.tanh(h) @ self.w[:3].T


class _CustomLinear(torch.autograd.Function):
    """Old style (no setup_context): torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x, w)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def, override]
        x, w = ctx.saved_tensors
        return grad @ w, grad.T @ x


class CustomFunction(nn.Module):
    """A custom ``autograd.Function`` calling ``F.linear`` in its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(_CustomLinear.apply(x, self.w)))


def tokens(n: int, seed: int) -> Tensor:
    return torch.randint(0, 7, (n, 5), generator=torch.Generator().manual_seed(seed))


def padded_tokens(n: int, seed: int) -> Tensor:
    t = torch.randint(0, 6, (n, 4), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = 0
    return t


#: name: (build, input maker, parameters expected to fall back)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int], Tensor], set[str]]] = {
    "sequence-first": (SequenceFirst, lambda n, s: _randn(n, s, 2, 3), set()),
    "learned-queries": (LearnedQueries, lambda n, s: _randn(n, s, 3, 4), {"queries", "wq"}),
    "ntk-mlp": (NtkMlp, lambda n, s: _randn(n, s, 5), set()),
    "shared-scaled-output": (SharedScaledOutput, lambda n, s: _randn(n, s, 4), set()),
    "einsum-mlp": (EinsumMlp, lambda n, s: _randn(n, s, 5), set()),
    "einsum-sequence": (EinsumSequence, lambda n, s: _randn(n, s, 3, 4), set()),
    "gpt2-conv1d": (Gpt2Block, lambda n, s: _randn(n, s, 3, 4), set()),
    "tied-embedding": (TiedEmbedding, tokens, set()),
    "padded-embedding": (PaddedEmbedding, padded_tokens, set()),
    "tied-padded-embedding": (TiedPaddedEmbedding, padded_tokens, set()),
    "encoder-layer": (Encoder, lambda n, s: _randn(n, s, 3, 4), set()),
    "attention": (Attention, lambda n, s: _randn(n, s, 3, 4), set()),
    "conv-transpose": (Transposed, lambda n, s: _randn(n, s, 2, 3, 3), set()),
    "weight-norm": (weight_norm_mlp, lambda n, s: _randn(n, s, 5), set()),
    "parametrized": (parametrized_mlp, lambda n, s: _randn(n, s, 5), set()),
    "norms": (Norms, lambda n, s: _randn(n, s, 2, 7), set()),
    "views": (Views, lambda n, s: _randn(n, s, 4), set()),
    "overlapping": (Overlapping, lambda n, s: _randn(n, s, 4), set()),
    "expanded": (Expanded, lambda n, s: _randn(n, s, 4), set()),
    "custom-function": (CustomFunction, lambda n, s: _randn(n, s, 4), {"w"}),
}


def _randn(n: int, seed: int, *shape: int) -> Tensor:
    return torch.randn(
        n, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


@pytest.fixture(scope="module", params=list(MODELS))
def case(request: pytest.FixtureRequest) -> dict:
    build, make, fallback = MODELS[request.param]
    torch.manual_seed(0)
    model = build().double()
    x1, x2 = make(4, 1), make(3, 2)
    references = {
        (output, symmetric): reference_kernel(model, x1, None if symmetric else x2, output)
        for output, symmetric in itertools.product(("full", "trace"), (True, False))
    }
    return {
        "name": request.param,
        "model": model,
        "x1": x1,
        "x2": x2,
        "refs": references,
        "fallback": fallback,
    }


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("output", ["full", "trace"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["x2=None", "x2"])
def test_matches_explicit_jacobian(case: dict, method: str, output: str, symmetric: bool) -> None:
    x2 = None if symmetric else case["x2"]
    if case["name"] == "custom-function" and method == "vector-products":
        with pytest.raises(NtkLensError, match="forward-mode AD"):
            ntklens.ntk(case["model"], case["x1"], x2, output=output, method=method)
        return
    kernel = ntklens.ntk(case["model"], case["x1"], x2, output=output, method=method)
    assert_close(kernel, case["refs"][(output, symmetric)])


@pytest.mark.parametrize("method", ["layerwise", "jacobian"])
@pytest.mark.parametrize("output", ["full", "trace"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["x2=None", "x2"])
def test_features_computed_in_chunks_give_the_same_kernel(
    case: dict, method: str, output: str, symmetric: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 2 (x1: 2 + 2, x2: 2 + 1) joined per tile, as large kernels are built."""
    monkeypatch.setattr(tiling, "_cache_friendly_chunk", lambda footprint, tile: 2)
    x2 = None if symmetric else case["x2"]
    kernel = ntklens.ntk(case["model"], case["x1"], x2, output=output, method=method)
    assert_close(kernel, case["refs"][(output, symmetric)])


@pytest.mark.parametrize("output", ["full", "trace"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["x2=None", "x2"])
def test_gradients_formed_a_channel_at_a_time_on_sub_blocks_give_the_same_kernel(
    case: dict, output: str, symmetric: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streamed gradients in pieces of one channel, diagonal tiles halved down to one
    sample."""
    monkeypatch.setattr(layerwise, "_PIECE_BYTES", 1)
    monkeypatch.setattr(tiling, "_MIN_SPLIT_ROWS", 1)
    monkeypatch.setattr(tiling, "_MIN_SPLIT_TILE", 1)
    x2 = None if symmetric else case["x2"]
    kernel = ntklens.ntk(case["model"], case["x1"], x2, output=output, method="layerwise")
    assert_close(kernel, case["refs"][(output, symmetric)])


def test_plan_structures_what_it_claims(case: dict) -> None:
    with eval_mode(case["model"]):
        plan, _ = LayerwisePlan.probe(case["model"], case["x1"], n_pairs=2.0, full=True)
    assert set(plan.fallback) == case["fallback"], plan.rules
    assert set(plan.rules) == {n for n, p in case["model"].named_parameters() if p.requires_grad}


def test_bias_folds_only_where_the_cotangents_agree() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64)
    with eval_mode(model := NtkMlp().double()):
        plan, _ = LayerwisePlan.probe(model, x, n_pairs=2.0, full=True)
    assert plan.rules["b1"] == "bias folded into w1's Gram"
    x = torch.randn(4, 4, dtype=torch.float64)
    with eval_mode(model := SharedScaledOutput().double()):
        plan, _ = LayerwisePlan.probe(model, x, n_pairs=2.0, full=True)
    assert plan.rules["b"].startswith("shift")
    assert plan.rules["c"].startswith("shift")  # added at one of w's two uses only


def test_matvec_matches(case: dict) -> None:
    if case["name"] == "custom-function":
        with pytest.raises(NtkLensError, match="forward-mode AD"):
            ntk_matvec(case["model"], case["x1"])(torch.zeros(4, 2, dtype=torch.float64))
        return
    full = ntklens.flatten(case["refs"][("full", True)])
    n = len(case["x1"])
    v = torch.randn(n, full.shape[0] // n, dtype=torch.float64)
    assert_close(ntk_matvec(case["model"], case["x1"])(v).reshape(-1), full @ v.reshape(-1))


@pytest.mark.parametrize("name", ["sequence-first", "learned-queries"])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("output", ["full", "trace"])
def test_batch_axis_is_found_at_every_batch_size(name: str, n: int, output: str) -> None:
    """Shapes that coincide with the probe's batch size are never taken for samples."""
    build, make, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().double()
    x1, x2 = make(n, 3), make(2, 4)
    for x_other in (None, x2):
        expected = reference_kernel(model, x1, x_other, output)
        for method in ("layerwise", "auto"):
            assert_close(ntklens.ntk(model, x1, x_other, output=output, method=method), expected)


class TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.fc(x), x.sum(1)


class DictOutput(TupleOutput):
    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return {"logits": self.fc(x), "features": x}


@pytest.mark.parametrize(
    ("build", "select"),
    [(TupleOutput, lambda out: out[0]), (DictOutput, lambda out: out["logits"])],
)
def test_output_fn_selects_the_output(build: Callable[[], nn.Module], select: Callable) -> None:
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = reference_kernel(nn.Sequential(model.fc), x, None, "full")
    for method in METHODS:
        assert_close(ntklens.ntk(model, x, method=method, output_fn=select), expected)
    v = torch.randn(3, 2, dtype=torch.float64)
    matvec = ntk_matvec(model, x, output_fn=select)
    assert_close(matvec(v).reshape(-1), ntklens.flatten(expected) @ v.reshape(-1))


def test_per_sample_costs_leave_out_per_call_work() -> None:
    """A parametrization materializes its weight once per call: not a per-sample cost."""
    torch.manual_seed(0)
    wide = nn.utils.parametrizations.weight_norm(nn.Linear(64, 64))
    plain = nn.Linear(64, 64)
    x = torch.randn(4, 64)
    probes = []
    for model in (wide, plain):
        with eval_mode(model):
            probes.append(LayerwisePlan.probe(model, x, n_pairs=2.0, full=False)[1])
    assert probes[0].activation_bytes <= 2 * probes[1].activation_bytes
    assert probes[0].forward_flops == pytest.approx(probes[1].forward_flops)


def test_probe_counts_forward_flops_of_matmuls_and_convolutions() -> None:
    """Per-sample forward FLOPs against their closed form: 2·in·out per Linear, 2·C_in·C_out
    ·k²·H·W per convolution; elementwise maps count nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 7),
        nn.Tanh(), nn.Linear(7, 4),
    )  # fmt: skip
    x = torch.randn(4, 2, 5, 5)
    with eval_mode(model):
        probe = LayerwisePlan.probe(model, x, n_pairs=2.0, full=False)[1]
    expected = 2 * 2 * 3 * 9 * 5 * 5 + 2 * 75 * 7 + 2 * 7 * 4
    assert probe.forward_flops == pytest.approx(expected)
    assert probe.n_outputs == 4


def test_weight_norm_over_another_dim_is_pulled_back_through_its_vjp() -> None:
    """``weight_norm(dim=1)`` is not the weight-norm rule's: its materialized weight's
    per-sample gradients are pulled back to (v, g), exactly."""
    torch.manual_seed(0)
    wn = nn.utils.parametrizations.weight_norm
    model = nn.Sequential(wn(nn.Linear(5, 6), dim=1), nn.Tanh(), nn.Linear(6, 3)).double()
    x = _randn(5, 4, 5)
    with eval_mode(model):
        plan, _ = LayerwisePlan.probe(model, x, n_pairs=2.0, full=True)
    assert not plan.fallback, plan.rules
    assert "then its vjp" in plan.rules["0.parametrizations.weight.original0"], plan.rules
    for output in ("full", "trace"):
        kernel = ntklens.ntk(model, x, output=output, method="layerwise")
        assert_close(kernel, reference_kernel(model, x, None, output))


def test_weight_norm_biases_fold_into_their_weights_features() -> None:
    """A weight-normed Linear's bias is contracted with its weight's features, not as a
    group of its own (the kernel itself is checked in the "weight-norm" case)."""
    torch.manual_seed(0)
    model = weight_norm_mlp().double()
    plan, _ = LayerwisePlan.probe(model, _randn(4, 0, 5), n_pairs=2.0, full=False)
    assert all(g.weight_norm is not None and g.bias is not None for g in plan.groups)
    assert plan.rules["0.bias"].startswith("bias folded into weight_norm")


def test_shared_cotangents_take_the_cheap_contraction_exactly() -> None:
    """A per-position layer followed only by linear maps has the same cotangents for every
    sample: the plan must flag them shared, and the kernel still match the Jacobian."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 2), nn.Flatten(), nn.Linear(4, 3)).double()
    x1, x2 = _randn(5, 1, 2, 12), _randn(4, 2, 2, 12)
    plan, _ = LayerwisePlan.probe(model, x1, n_pairs=2.0, full=True)
    features = plan.features(model, x1)
    grams = [f for f in features if getattr(f, "inputs", None) is not None]
    per_position = [f for f in grams if f.cotangents.shape[-1] == 2]
    assert len(per_position) == 1 and per_position[0].shared and per_position[0].bias
    for output, other in itertools.product(("full", "trace"), (None, x2)):
        kernel = ntklens.ntk(model, x1, other, output=output, method="layerwise")
        assert_close(kernel, reference_kernel(model, x1, other, output))


@pytest.mark.parametrize("output", ["full", "trace"])
def test_chunk_of_repeated_samples_is_not_taken_as_shared(
    output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first chunk of two equal samples has equal cotangents; the joined tile does not."""
    monkeypatch.setattr(tiling, "_cache_friendly_chunk", lambda footprint, tile: 2)
    torch.manual_seed(0)
    model = NtkMlp().double()
    x = _randn(4, 3, 5)
    x[1] = x[0]
    assert_close(ntklens.ntk(model, x, output=output), reference_kernel(model, x, None, output))


class SwitchedHead(nn.Module):
    """A tanh layer read by one of two heads, chosen per sample: W1's cotangents factor as
    gates times shared directions among samples that use the same head only."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 6)
        self.head_a, self.head_b = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.hidden(x))
        return torch.where(x[:, :1] > 5, self.head_b(h), self.head_a(h))


def test_gated_cotangents_fall_back_where_a_tile_does_not_factor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The probe samples (the first three) all take head a, so the plan prices the hidden
    layer as gated (factoring made free, so that it pays on so few pairs); the tiles
    holding a head-b sample must not use that structure."""
    monkeypatch.setattr(layerwise, "_FACTORING_FLOPS", 0)
    torch.manual_seed(0)
    model = SwitchedHead().double()
    x = _randn(6, 4, 4)
    x[4:, 0] = 10.0
    with eval_mode(model):
        plan, _ = LayerwisePlan.probe(model, x, n_pairs=3.0, full=False)
    assert "gated cotangents" in plan.rules["hidden.weight"], plan.rules
    for x2 in (None, _randn(3, 5, 4)):
        kernel = ntklens.ntk(model, x, x2, output="trace", method="layerwise")
        assert_close(kernel, reference_kernel(model, x, x2, "trace"))


@pytest.mark.parametrize("chunk", [None, 2], ids=["one-chunk", "chunks-of-2"])
@pytest.mark.parametrize("build", [NtkMlp, weight_norm_mlp], ids=["ntk-mlp", "weight-norm"])
def test_gated_one_position_products_match(
    build: Callable[[], nn.Module], chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One-position uses with gated cotangents (an elementwise map, then a linear head)
    and shared ones (the head): the factored trace products, the weight-norm correction
    and folded bias among them, against the explicit Jacobian; captured in chunks of 2,
    whose factors are joined (shared directions) or formed out (each chunk's own)."""
    monkeypatch.setattr(layerwise, "_FACTORING_FLOPS", 0)
    if chunk is not None:
        monkeypatch.setattr(tiling, "_cache_friendly_chunk", lambda footprint, tile: chunk)
    torch.manual_seed(0)
    model = build().double()
    x = _randn(7, 1, 5)
    with eval_mode(model):
        plan, _ = LayerwisePlan.probe(model, x, n_pairs=3.0, full=False)
    assert any("gated cotangents" in rule for rule in plan.rules.values()), plan.rules
    for x2 in (None, _randn(4, 2, 5)):
        kernel = ntklens.ntk(model, x, x2, output="trace", method="layerwise")
        assert_close(kernel, reference_kernel(model, x, x2, "trace"))


def test_gating_is_priced_against_its_factoring() -> None:
    """Factoring one-position cotangents pays on many pairs per sample, not on a few."""
    torch.manual_seed(0)
    model = NtkMlp().double()
    x = _randn(4, 3, 5)
    rules = {}
    with eval_mode(model):
        for n_pairs in (2.0, 1e5):
            plan, _ = LayerwisePlan.probe(model, x, n_pairs=n_pairs, full=False)
            rules[n_pairs] = plan.rules["w2"]
    assert "gated cotangents" not in rules[2.0] and "gated cotangents" in rules[1e5], rules


def test_gated_factors_reproduce_the_cotangents_or_refuse() -> None:
    from ntklens.kernel.layerwise import _gated_factors

    gates = torch.rand(5, 2, 3, 4, dtype=torch.float64)
    directions = torch.randn(6, 2, 3, 4, dtype=torch.float64)
    gates[0, 0] = 0.0
    gated = gates[:, None] * directions[None]
    found = _gated_factors(gated)
    assert found is not None
    assert torch.allclose(found[0][:, None] * found[1][None], gated, rtol=0, atol=1e-14)
    strided = gated.transpose(2, 4).contiguous().transpose(2, 4)  # entries (L, C, Gr) in memory
    found = _gated_factors(strided)
    assert found is not None
    assert torch.allclose(found[0][:, None] * found[1][None], gated, rtol=0, atol=1e-14)
    assert _gated_factors(torch.randn(5, 6, 2, 3, 4, dtype=torch.float64)) is None
    # float32, rounded products, and enough entries that some direction is nearly
    # orthogonal to any one random projection
    gates, directions = torch.randn(3, 1, 512, 16), torch.randn(10, 1, 512, 16)
    assert _gated_factors(gates[:, None] * directions[None]) is not None
    mixed = gates[:, None] * directions[None]
    mixed[2, :, 0, 7, 3] = torch.randn(10)  # one sample's vector leaves the span
    assert _gated_factors(mixed) is None


class _SliceThenTranspose(nn.Module):
    """W's first rows alone, then W.T: overlapping views whose first use sees part of W."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 5))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(x @ self.w[:2].T)  # (N, 2): entries 0-9 of W
        return torch.cat([h, torch.tanh(x @ self.w.T) @ self.w], dim=1)  # every entry, twice


@pytest.mark.parametrize("output", ["full", "trace"])
def test_strided_views_sum_into_the_entries_they_see(output: str) -> None:
    """Per-sample gradients of views that each see an entry at most once are copied and
    added through strided views of the parameter's layout, a partial first one included."""
    torch.manual_seed(0)
    model = _SliceThenTranspose().double()
    x = torch.randn(5, 5, dtype=torch.float64)
    kernel = ntklens.ntk(model, x, output=output, method="layerwise")
    assert_close(kernel, reference_kernel(model, x, None, output))

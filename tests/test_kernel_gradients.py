"""Per-sample gradients formed piece by piece while contracted (kernel/layerwise.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ntklens.kernel import layerwise
from ntklens.kernel.layerwise import Piece, StreamedGrads, _PendingGrads, _per_sample_matmuls


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_per_sample_matmuls_match_einsum() -> None:
    """out[t, a] = left[t, a] @ right[t], from output-major cotangents."""
    gen = _gen()
    t, k, c, length, d = 5, 3, 4, 6, 7
    left = torch.randn(k, t, length, c, dtype=torch.float64, generator=gen).permute(1, 0, 3, 2)
    right = torch.randn(t, d, length, dtype=torch.float64, generator=gen).mT
    expected = torch.einsum("tacl,tld->tacd", left, right).reshape(t, k, c * d)
    out = torch.empty(t, k, c * d, dtype=torch.float64)
    _per_sample_matmuls(left, right, out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("groups", [1, 2])
def test_a_range_of_channels_writes_those_channels_gradients(groups: int) -> None:
    """Weight gradients Σ_l G ⊗ A of channels 1..3 of 5, for plain and grouped weights."""
    gen = _gen()
    t, k, c, length, d = 4, 3, 5, 6, 2
    cot = torch.randn(t, k, groups, c, length, dtype=torch.float64, generator=gen)
    inputs = torch.randn(t, groups, d, length, dtype=torch.float64, generator=gen)
    pending = _PendingGrads(cot, inputs)
    every = torch.einsum("tkgcl,tgdl->tkgcd", cot, inputs)
    out = torch.empty(t, k, groups * 2 * d, dtype=torch.float64)
    pending.write(out, slice(1, 3))
    torch.testing.assert_close(out, every[:, :, :, 1:3].reshape(t, k, -1), rtol=1e-12, atol=0)


def test_embedding_channels_are_rows_of_the_one_hot_product() -> None:
    gen = _gen()
    t, k, dim, length, vocab = 3, 2, 4, 5, 6
    cot = torch.randn(t, k, 1, dim, length, dtype=torch.float64, generator=gen)
    tokens = torch.randint(0, vocab, (t, length), generator=gen)
    one_hot = F.one_hot(tokens, vocab).double()
    every = torch.einsum("tkcl,tlv->tkcv", cot[:, :, 0], one_hot)
    out = torch.empty(t, k, 2 * vocab, dtype=torch.float64)
    _PendingGrads(cot, tokens, vocab=vocab).write(out, slice(2, 4))
    torch.testing.assert_close(out, every[:, :, 2:4].reshape(t, k, -1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("per_output", [False, True])
def test_pieces_cover_every_channel_once_within_the_cap(
    per_output: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every (output, channel) of every group lies in exactly one piece, each piece as wide
    as the cap allows; per output, each piece holds a single output."""
    t, k, length = 8, 3, 2
    groups = [
        _PendingGrads(torch.zeros(t, k, 1, c, length), torch.zeros(t, 1, d, length))
        for c, d in ((7, 5), (1, 3), (40, 2))
    ]
    cap = t * k * 5 * 4 * 2  # two channels of the first group (float32), for all K
    monkeypatch.setattr(layerwise, "_PIECE_BYTES", cap)
    pieces = StreamedGrads([groups]).pieces(t, per_output=per_output)
    width = 1 if per_output else k
    for i, g in enumerate(groups):
        mine = [p for p in pieces if p.group == i]
        covered = sorted(
            (a, ch)
            for p in mine
            for a in range(k)[p.outputs]
            for ch in range(g.channels)[p.channels]
        )
        assert covered == [(a, ch) for a in range(k) for ch in range(g.channels)]
        assert all(len(range(k)[p.outputs]) == width for p in mine)
        widest = max(len(range(g.channels)[p.channels]) for p in mine)
        channel_bytes = t * width * g.entries_per_channel * 4
        assert widest == max(1, min(g.channels, cap // channel_bytes))


@pytest.mark.parametrize("outputs", [slice(None), slice(1, 2)])
def test_chunks_joined_and_sliced_form_the_rows_they_hold(outputs: slice) -> None:
    """Chunks of samples joined without copying, then sliced across a chunk boundary,
    form the same gradients as the sliced rows of the whole tile, for all outputs or one."""
    gen = _gen()
    t, k, c, length, d = 9, 2, 3, 4, 5
    # output-major, as the batched backward returns them
    cot = torch.randn(k, t, 1, c, length, dtype=torch.float64, generator=gen).transpose(0, 1)
    inputs = torch.randn(t, 1, d, length, dtype=torch.float64, generator=gen)
    every = torch.einsum("tkgcl,tgdl->tkgcd", cot, inputs)
    bounds = [(0, 2), (2, 6), (6, 9)]
    joined = StreamedGrads.join(
        [StreamedGrads([[_PendingGrads(cot[a:b], inputs[a:b])]]) for a, b in bounds]
    )
    assert len(joined) == t
    rows = joined[1:7]
    assert len(rows) == 6
    buffer = torch.empty(100 * k * c * d, dtype=torch.float64)
    formed = rows.formed(buffer, Piece(0, outputs, slice(1, 3)))
    expected = every[1:7, outputs, :, 1:3].reshape(6, len(range(k)[outputs]), -1)
    torch.testing.assert_close(formed, expected, rtol=1e-12, atol=0)

"""Per-sample gradients written into slices of a shared tensor (kernel/layerwise.py)."""

from __future__ import annotations

import pytest
import torch

from ntklens.kernel.layerwise import _per_sample_matmuls


@pytest.mark.parametrize("layout", ["contiguous", "trace", "full"])
def test_per_sample_matmuls_match_einsum_in_every_layout(layout: str) -> None:
    """out[t, a] = left[t, a] @ right[t], written into a slice of a wider tensor."""
    gen = torch.Generator().manual_seed(0)
    t, k, c, length, d = 5, 3, 4, 6, 7
    left = torch.randn(k, t, length, c, dtype=torch.float64, generator=gen).permute(1, 0, 3, 2)
    right = torch.randn(t, d, length, dtype=torch.float64, generator=gen).mT
    expected = torch.einsum("tacl,tld->tacd", left, right).reshape(t, k, c * d)
    if layout == "contiguous":
        wide = torch.zeros(t, k, c * d, dtype=torch.float64)
        out = wide
    elif layout == "trace":  # (T, 1, K·ΣP): this group's (K, P) block contiguous
        wide = torch.zeros(t, 1, k * (c * d + 9), dtype=torch.float64)
        out = wide[:, 0, 9 * k :].unflatten(1, (k, c * d))
    else:  # (T, K, ΣP): the group's entries a slice of every output's row
        wide = torch.zeros(t, k, c * d + 9, dtype=torch.float64)
        out = wide[:, :, 9:]
    _per_sample_matmuls(left, right, out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    out.zero_()
    assert not wide.any()  # nothing written outside the slice

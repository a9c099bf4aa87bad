"""Large feature tensors in huge pages (:mod:`ntklens.kernel.memory`)."""

from __future__ import annotations

import gc

import pytest
import torch

from ntklens.kernel import memory
from ntklens.kernel.layerwise import _per_sample_matmuls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_tensor_is_writable_and_outlives_its_views(dtype: torch.dtype) -> None:
    shape = (3, 5, 2**20)  # 60 or 120 MiB: above the huge-page threshold
    t = memory.empty(shape, dtype, torch.device("cpu"))
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert t.untyped_storage().nbytes() == 15 * 2**20 * dtype.itemsize
    values = torch.arange(15 * 2**20, dtype=dtype).view(shape)
    t.copy_(values)
    view = t[1:, :, 7:]
    del t
    gc.collect()
    assert torch.equal(view, values[1:, :, 7:])


def test_small_tensor_comes_from_torch() -> None:
    t = memory.empty((4, 4), torch.float32, torch.device("cpu"))
    assert t.shape == (4, 4) and t.untyped_storage().nbytes() == 64


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

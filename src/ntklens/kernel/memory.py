"""Large, short-lived feature tensors in transparent huge pages.

Per-sample gradients are the largest tensors the eNTK engine writes (hundreds of MiB),
each written once and read by a few matmuls. Fresh memory is faulted in one 4 KiB page
at a time on first write, which can cost as much as computing what goes into it: on the
2-core VM that runs the benchmarks, filling 431 MiB takes 0.23 s in fresh 4 KiB pages,
0.05 s in fresh 2 MiB pages and 0.03 s in memory already touched. PyTorch's CPU
allocator asks for huge pages only when ``THP_MEM_ALLOC_ENABLE`` is set before its first
allocation, so these tensors are mapped here and advised as huge pages; where the
kernel's transparent huge pages are off (or on other systems and devices), this is a
plain ``torch.empty``.
"""

from __future__ import annotations

import contextlib
import math
import mmap

import torch
from torch import Tensor

#: Smaller tensors come from PyTorch's allocator: a huge page is 2 MiB.
_MIN_HUGE_BYTES = 8 * 2**20


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialized tensor, in huge pages where it is large, on the CPU, on Linux."""
    count = math.prod(shape)
    size = count * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if device.type != "cpu" or size < _MIN_HUGE_BYTES or advice is None:
        return torch.empty(shape, dtype=dtype, device=device)
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # huge pages compiled out: plain pages, still correct
        buffer.madvise(advice)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)

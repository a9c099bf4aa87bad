"""Tiling over the data so that a kernel computation stays within a memory budget.

A kernel method turns a tile of samples into *features* (per-sample Jacobians, layer
inputs and cotangents) and contracts the features of two tiles into one block of the
kernel. :class:`Footprint` says how many bytes that takes per sample and per sample pair;
:func:`plan_tiles` picks the largest tile that fits and whether all features can be kept
(computed once) or must be recomputed per block; :func:`assemble` runs the loop.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from ntklens.errors import NtkLensError

Features = TypeVar("Features")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)

#: Tiles this large always keep all features. Smaller ones, down to _SMALLEST_CACHED_TILE,
#: still do while they are at least half the tile that recomputing would allow:
#: recomputing featurizes every sample once per block, and featurizing (a forward and K
#: backward passes) usually costs more than the extra, smaller contractions.
_MIN_CACHED_TILE = 64
_SMALLEST_CACHED_TILE = 16
#: A diagonal tile of at least _MIN_SPLIT_TILE samples is halved, and its diagonal halves
#: halved again while the halves keep at least _MIN_SPLIT_ROWS samples, so that only the
#: sub-blocks on and above the diagonal are computed: one halving does 3/4 of the work,
#: two 5/8, three 9/16. Off-diagonal blocks stay as large as they can, so the matmuls stay
#: efficient (on 2 cores, a 320-row tile's Gram over 13k entries took 0.71 of the whole
#: matmul's time split down to 64 rows, against 0.78 with one halving; smaller parts lose
#: more than they save, and a 128-sample tile's kernel is 2-5% faster unsplit).
_MIN_SPLIT_TILE = 256
_MIN_SPLIT_ROWS = 64
#: Cached features are computed in chunks of about this much transient work
#: (``Footprint.work`` per sample) and joined per tile: the capture's batched backward and
#: its copies run out of cache beyond it, while the contraction is fastest on large tiles.
#: Measured on 2 cores (float32): the benchmark CNN's N = 128 features take 0.18 s in one
#: chunk of 128 (690 MiB of work) and 0.11 s in chunks of 32; its contraction, and the
#: encoder layer's, are fastest in one tile.
_CACHE_FRIENDLY_WORK = 192 * 2**20
#: Chunks are used only where a sample's features are at most this share of its work:
#: the join's copy then costs little (the CNN: 2%, 1.5x faster chunked); the encoder layer
#: (42%) was 1.2x slower chunked, the MLPs (16-18%) the same either way.
_CHUNKED_FEATURE_SHARE = 1 / 8


def parse_memory(budget: int | str) -> int:
    """Bytes in ``budget``: an int (bytes) or a string such as "512MiB", "4GiB", "1.5GB"."""
    if isinstance(budget, bool) or not isinstance(budget, int | str):
        raise NtkLensError(
            f"memory_budget must be bytes (int) or a string like '4GiB', got {budget!r}"
        )
    if isinstance(budget, int):
        value = budget
    else:
        match = _MEMORY.match(budget)
        unit = match.group(2).lower() if match else None
        if unit not in _UNITS:
            raise NtkLensError(
                f"memory_budget {budget!r} is not a size; write e.g. '512MiB', '4GiB' or '1.5GB'"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise NtkLensError(f"memory_budget must be positive, got {budget!r}")
    return value


def format_bytes(n_bytes: float, *, round_up: bool = False) -> str:
    """``n_bytes`` in the largest binary unit that keeps it at least 1, for messages.

    ``round_up``: never below ``n_bytes``, so the text can be passed back as a budget.
    """
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            value = n_bytes / size
            return f"{math.ceil(value * 10) / 10 if round_up else value:.1f}{unit}"
    return f"{math.ceil(n_bytes)}B"


def budget_error(needed: float, budget: int, what: str) -> NtkLensError:
    """The error for a budget below the ``needed`` bytes of the smallest possible tile."""
    return NtkLensError(
        f"memory_budget of {format_bytes(budget)} is too small for one tile ({what}); "
        f"it needs at least {format_bytes(needed, round_up=True)}: raise memory_budget"
    )


def largest_tile(n: int, per_sample: float, budget: int, *, what: str, fixed: float = 0) -> int:
    """The most samples (at most ``n``) whose ``per_sample`` bytes fit ``budget``."""
    tile = min(n, math.floor((budget - fixed) / max(per_sample, 1.0)))
    if tile < 1:
        raise budget_error(fixed + per_sample, budget, what)
    return tile


@dataclass(frozen=True)
class Footprint:
    """Bytes a kernel method holds, by what they scale with.

    ``feature``: kept per sample between computing features and contracting them;
    ``work``: transient per sample while computing features; ``pair``: transient per
    sample pair while contracting two tiles, the kernel block included.
    """

    feature: float
    work: float
    pair: float

    def peak(self, tile: int, n_kept: int) -> float:
        """Bytes at the peak with tiles of ``tile`` samples and ``n_kept`` samples' features.

        Feature work and contraction are counted as if they overlapped, which they do for
        methods that featurize inside the contraction.
        """
        return n_kept * self.feature + tile * self.work + tile * tile * self.pair


@dataclass(frozen=True)
class TilePlan:
    """Tiles of ``tile`` samples; ``cache``: features of every sample computed once, in
    chunks of ``chunk`` samples (the tile itself when 0)."""

    tile: int
    cache: bool
    chunk: int = 0


def plan_tiles(
    n1: int, n2: int | None, footprint: Footprint, output_bytes: float, budget: int
) -> TilePlan:
    """The largest tiles whose peak memory, with the kernel itself, fits ``budget``.

    ``n2`` is None for the symmetric kernel of x1. Features of all samples are kept when
    that still allows tiles of a reasonable size (see ``_MIN_CACHED_TILE``), computed in
    cache-sized chunks where that pays (see ``_CACHE_FRIENDLY_WORK``); otherwise they are
    recomputed per block.
    """
    n_all = n1 + (n2 or 0)
    n_max = max(n1, n2 or 0)

    def fits(tile: int, n_kept: int) -> bool:
        return output_bytes + footprint.peak(tile, n_kept) <= budget

    def largest(n_kept: Callable[[int], int]) -> int:
        low, high = 0, n_max
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid, n_kept(mid)) else (low, mid - 1)
        return low

    cached = largest(lambda _: n_all)
    streamed = largest(lambda tile: 2 * tile)
    if cached >= min(n_max, _MIN_CACHED_TILE) or (
        cached >= min(n_max, _SMALLEST_CACHED_TILE) and 2 * cached >= streamed
    ):
        return TilePlan(cached, cache=True, chunk=_cache_friendly_chunk(footprint, cached))
    if streamed < 1:
        needed = output_bytes + footprint.peak(1, 2)
        raise budget_error(needed, budget, "the kernel itself plus one sample pair's work")
    return TilePlan(streamed, cache=False)


def _cache_friendly_chunk(footprint: Footprint, tile: int) -> int:
    """Samples per featurizing chunk: ``_CACHE_FRIENDLY_WORK`` of work (0: the whole tile).

    Joining the chunks copies the tile's features, so chunks are used only where features
    are small next to the work (``_CHUNKED_FEATURE_SHARE``); this also keeps the join's
    peak within ``Footprint.peak``.
    """
    if footprint.feature > _CHUNKED_FEATURE_SHARE * footprint.work:
        return 0
    chunk = max(1, math.floor(_CACHE_FRIENDLY_WORK / max(footprint.work, 1.0)))
    return chunk if chunk < tile else 0


@dataclass(frozen=True)
class Layout:
    """Where a block of the kernel goes: its shape and how to mirror it."""

    full: bool
    n_outputs: int

    def empty(self, n1: int, n2: int, like: Tensor) -> Tensor:
        k = self.n_outputs
        shape = (n1, k, n2, k) if self.full else (n1, n2)
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def write(self, out: Tensor, rows: slice, cols: slice, block: Tensor, mirror: bool) -> None:
        if self.full:
            out[rows, :, cols, :] = block
            if mirror:
                out[cols, :, rows, :] = block.permute(2, 3, 0, 1)
        else:
            out[rows, cols] = block
            if mirror:
                out[cols, rows] = block.T


@dataclass(frozen=True)
class TiledKernel(Generic[Features]):
    """A kernel method as ``featurize`` (tile -> features) and ``contract`` (two -> block).

    Features are tensors with samples first, objects that slice like them, or lists of
    these. ``diagonal``, where given, contracts a tile with itself on the sub-blocks
    (rows, cols) of :func:`upper_sub_blocks` at once, for a method whose features are
    cheaper to use for all sub-blocks together than one sub-block at a time.
    """

    featurize: Callable[[Tensor], Features]
    contract: Callable[[Features, Features], Tensor]
    diagonal: Callable[[Features, list[tuple[slice, slice]]], list[Tensor]] | None = None

    def assemble(self, x1: Tensor, x2: Tensor | None, plan: TilePlan, layout: Layout) -> Tensor:
        """The kernel between ``x1`` and ``x2`` (x1 itself if None), block by block.

        For the symmetric kernel only blocks on or above the diagonal are contracted; the
        others are their mirror images. Diagonal tiles are split into sub-blocks for the
        same reason.
        """
        symmetric = x2 is None
        other = x1 if x2 is None else x2
        rows = _tiles(len(x1), plan.tile)
        cols = rows if symmetric else _tiles(len(other), plan.tile)
        out = None
        chunk = plan.chunk or plan.tile
        kept1 = [self._chunked(x1[r], chunk) for r in rows] if plan.cache else None
        kept2 = (
            kept1 if symmetric or not plan.cache else [self._chunked(other[c], chunk) for c in cols]
        )
        for i, r in enumerate(rows):
            f1 = kept1[i] if kept1 is not None else self.featurize(x1[r])
            for j, c in enumerate(cols):
                if symmetric and j < i:
                    continue
                if symmetric and j == i:
                    sub = upper_sub_blocks(r.stop - r.start)
                    blocks = (
                        self.diagonal(f1, sub)
                        if self.diagonal is not None
                        else [self.contract(_take(f1, p), _take(f1, q)) for p, q in sub]
                    )
                    pieces = [
                        (_shift(p, r.start), _shift(q, r.start), block)
                        for (p, q), block in zip(sub, blocks, strict=True)
                    ]
                else:
                    f2 = kept2[j] if kept2 is not None else self.featurize(other[c])
                    pieces = [(r, c, self.contract(f1, f2))]
                for rr, cc, block in pieces:
                    if out is None:
                        out = layout.empty(len(x1), len(other), block)
                    layout.write(out, rr, cc, block, mirror=symmetric and rr != cc)
        assert out is not None
        return out

    def _chunked(self, x: Tensor, chunk: int) -> Features:
        """The features of ``x``, computed in equal chunks of at most ``chunk`` samples and
        joined (equal, so that no chunk is left with a few samples)."""
        if len(x) <= chunk:
            return self.featurize(x)
        even = math.ceil(len(x) / math.ceil(len(x) / chunk))
        return _join([self.featurize(x[part]) for part in _tiles(len(x), even)])


def _join(parts: list[Any]) -> Any:
    """The features of consecutive chunks as one: tensors concatenated along samples, lists
    entry by entry, other feature objects by their ``join``."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, list):
        return [_join(list(column)) for column in zip(*parts, strict=True)]
    return type(first).join(parts)


def upper_sub_blocks(n: int) -> list[tuple[slice, slice]]:
    """The sub-blocks (rows, cols) on and above the diagonal of a tile of ``n`` samples'
    kernel with itself: the tile halved, and its diagonal halves halved recursively."""
    if n < _MIN_SPLIT_TILE:
        return [(slice(0, n), slice(0, n))]
    return _upper_halves(0, n)


def _upper_halves(start: int, stop: int) -> list[tuple[slice, slice]]:
    if stop - start < 2 * _MIN_SPLIT_ROWS:
        return [(slice(start, stop), slice(start, stop))]
    mid = start + (stop - start) // 2
    upper = (slice(start, mid), slice(mid, stop))
    return [*_upper_halves(start, mid), upper, *_upper_halves(mid, stop)]


def _take(features: Any, rows: slice) -> Any:
    """The features of the samples ``rows``."""
    if isinstance(features, list):
        return [_take(f, rows) for f in features]
    return features[rows]


def _shift(rows: slice, by: int) -> slice:
    return slice(rows.start + by, rows.stop + by)


def _tiles(n: int, tile: int) -> list[slice]:
    return [slice(start, min(start + tile, n)) for start in range(0, n, tile)]


@dataclass(frozen=True)
class Cost:
    """A method's estimated work: FLOPs per sample (features) and per sample pair
    (contraction), and its memory :class:`Footprint`.

    ``feature_flops`` counts autograd work, which runs well below matmul speed; it is
    weighted by :data:`AUTOGRAD_SLOWDOWN` when methods are compared. ``matmul_flops`` is
    per-sample work done by plain matmuls.
    """

    feature_flops: float
    pair_flops: float
    footprint: Footprint
    matmul_flops: float = 0.0

    def flops(self, n_featurized: float, n_pairs: float) -> float:
        """FLOPs, unweighted, for featurizing and contracting that many samples and pairs."""
        return n_featurized * (self.feature_flops + self.matmul_flops) + n_pairs * self.pair_flops

    def total_flops(self, n1: int, n2: int | None, plan: TilePlan) -> float:
        """Matmul-equivalent FLOPs for the kernel of n1 by n2 samples (n2 None: symmetric).

        Without cached features, the column tiles are featurized again for every row tile.
        """
        n_rows = math.ceil(n1 / plan.tile)
        if n2 is None:
            n_pairs = n1 * (n1 + 1) / 2
            n_featurized = n1 if plan.cache else n1 + n1 * (n_rows - 1) / 2
        else:
            n_pairs = n1 * n2
            n_featurized = n1 + n2 * (1 if plan.cache else n_rows)
        autograd = AUTOGRAD_SLOWDOWN * n_featurized * self.feature_flops
        return autograd + n_featurized * self.matmul_flops + n_pairs * self.pair_flops


#: How much slower per FLOP autograd passes run than one large matmul (a rough ratio).
AUTOGRAD_SLOWDOWN = 3.0

"""The empirical neural tangent kernel of any ``torch.nn.Module``.

:func:`ntk` computes full (N1, K, N2, K) or output-traced (N1, N2) kernels by per-sample
Jacobians, NTK-vector products or the layer-wise Gram identity, tiled under a memory
budget; :func:`explain` says which rule covers each parameter and what each method
would cost; :func:`flatten` lays a full kernel out as (N1·K, N2·K) with row index i·K + a;
:func:`ntklens.kernel.products.ntk_matvec` gives Θv without building Θ.
"""

from ntklens.kernel.api import flatten, ntk
from ntklens.kernel.explain import Explanation, explain
from ntklens.kernel.products import ntk_matvec
from ntklens.kernel.tiling import parse_memory

__all__ = ["Explanation", "explain", "flatten", "ntk", "ntk_matvec", "parse_memory"]

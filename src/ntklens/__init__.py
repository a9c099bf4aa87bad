"""ntklens: neural scaling laws through the empirical neural tangent kernel.

The library entry point is :func:`ntk`, the eNTK of any ``torch.nn.Module``;
:mod:`ntklens.observables` reads trace, spectrum, entropy, alignment and spectral
position from it. Submodules import lazily so that ``import ntklens`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ntklens.errors import ConfigError, DataError, NtkLensError

if TYPE_CHECKING:
    from ntklens.kernel import flatten, ntk

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "NtkLensError", "__version__", "flatten", "ntk"]


def __getattr__(name: str) -> Any:
    if name in ("ntk", "flatten"):
        from ntklens import kernel

        return getattr(kernel, name)
    raise AttributeError(f"module 'ntklens' has no attribute {name!r}")

"""ntklens: neural scaling laws through the empirical neural tangent kernel.

The library entry point is :func:`ntk`, the eNTK of any ``torch.nn.Module``;
:mod:`ntklens.observables` reads trace, spectrum, entropy, alignment and spectral
position from it.
"""

from ntklens.errors import ConfigError, DataError, NtkLensError
from ntklens.kernel import flatten, ntk

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "NtkLensError", "__version__", "flatten", "ntk"]

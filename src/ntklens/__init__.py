"""ntklens: neural scaling laws through the empirical neural tangent kernel.

The public API, by group (each name resolves lazily on first use, so ``import ntklens``
alone imports no torch):

- kernel: :func:`ntk` (the eNTK of any ``torch.nn.Module``), :func:`flatten`,
  :func:`ntk_matvec`, :func:`explain`
- observables: the module :mod:`ntklens.observables`, :func:`kernel_observables`
- models: :mod:`ntklens.models`, its building blocks :mod:`ntklens.models.layers`,
  :func:`build_model`, :func:`param_groups`
- data: :mod:`ntklens.data`, :func:`load_dataset`, :func:`dataset_from_arrays`
- probe: :class:`Probe` (the eNTK and its observables in your own training loop),
  :func:`probe_steps` (the log-spaced schedule)
- studies: :func:`run_study`, :func:`plan`, :func:`load_config`, :class:`StudyConfig`
- store: :func:`open_store` (``runs()``, ``records()``, ``final()``, ``query()``)
- analysis: :mod:`ntklens.analysis`, :func:`summarize`
- report: :mod:`ntklens.report`, :func:`build_report`
- schema: :class:`RunSpec`, :class:`RunResult`, :class:`Spectrum` and the vocabulary
  ``Parameterization``, ``KernelOutput``, ``KernelMethod``, ``LossName``, ``ActivationName``
- errors: :class:`NtkLensError`, :class:`ConfigError`, :class:`DataError`
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ntklens.errors import ConfigError, DataError, NtkLensError

if TYPE_CHECKING:
    from ntklens import analysis, data, models, observables, report
    from ntklens.analysis import summarize
    from ntklens.data import dataset_from_arrays, load_dataset
    from ntklens.kernel import flatten, ntk, ntk_matvec
    from ntklens.models import build_model, layers, param_groups
    from ntklens.observables import kernel_observables
    from ntklens.report import build_report
    from ntklens.schema import VERSION as __version__
    from ntklens.schema import (
        ActivationName,
        KernelMethod,
        KernelOutput,
        LossName,
        Parameterization,
        RunResult,
        RunSpec,
        Spectrum,
    )
    from ntklens.store import open as open_store
    from ntklens.sweep.api import plan, run_study
    from ntklens.sweep.config import StudyConfig, load_config
    from ntklens.train.probes import probe_steps

#: group -> {public name: (module, attribute; None for the module itself)}
API: dict[str, dict[str, tuple[str, str | None]]] = {
    "kernel": {
        "ntk": ("ntklens.kernel", "ntk"),
        "flatten": ("ntklens.kernel", "flatten"),
        "ntk_matvec": ("ntklens.kernel", "ntk_matvec"),
        "explain": ("ntklens.kernel", "explain"),
    },
    "observables": {
        "observables": ("ntklens.observables", None),
        "kernel_observables": ("ntklens.observables", "kernel_observables"),
    },
    "models": {
        "models": ("ntklens.models", None),
        "layers": ("ntklens.models.layers", None),
        "build_model": ("ntklens.models", "build_model"),
        "param_groups": ("ntklens.models", "param_groups"),
    },
    "data": {
        "data": ("ntklens.data", None),
        "load_dataset": ("ntklens.data", "load_dataset"),
        "dataset_from_arrays": ("ntklens.data", "dataset_from_arrays"),
    },
    "probe": {
        "Probe": ("ntklens.train.probes", "Probe"),
        "probe_steps": ("ntklens.train.probes", "probe_steps"),
    },
    "studies": {
        "run_study": ("ntklens.sweep.api", "run_study"),
        "plan": ("ntklens.sweep.api", "plan"),
        "load_config": ("ntklens.sweep.config", "load_config"),
        "StudyConfig": ("ntklens.sweep.config", "StudyConfig"),
    },
    "store": {"open_store": ("ntklens.store", "open")},
    "analysis": {
        "analysis": ("ntklens.analysis", None),
        "summarize": ("ntklens.analysis", "summarize"),
    },
    "report": {
        "report": ("ntklens.report", None),
        "build_report": ("ntklens.report", "build_report"),
    },
    "schema": {
        name: ("ntklens.schema", name)
        for name in (
            "RunSpec",
            "RunResult",
            "Spectrum",
            "Parameterization",
            "KernelOutput",
            "KernelMethod",
            "LossName",
            "ActivationName",
        )
    },
}
_SOURCES = {name: source for names in API.values() for name, source in names.items()}
_SOURCES["__version__"] = ("ntklens.schema", "VERSION")

__all__ = [  # noqa: RUF022 - grouped as in API (a test checks they agree)
    "__version__",
    # errors
    "NtkLensError", "ConfigError", "DataError",
    # kernel
    "ntk", "flatten", "ntk_matvec", "explain",
    # observables
    "observables", "kernel_observables",
    # models
    "models", "layers", "build_model", "param_groups",
    # data
    "data", "load_dataset", "dataset_from_arrays",
    # probe
    "Probe", "probe_steps",
    # studies
    "run_study", "plan", "load_config", "StudyConfig",
    # store
    "open_store",
    # analysis
    "analysis", "summarize",
    # report
    "report", "build_report",
    # schema
    "RunSpec", "RunResult", "Spectrum", "Parameterization", "KernelOutput", "KernelMethod",
    "LossName", "ActivationName",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module 'ntklens' has no attribute {name!r}")
    module_name, attribute = _SOURCES[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})

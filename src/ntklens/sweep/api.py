"""Studies from Python: the same plan and sweep as the CLI, from a TOML path, a dict or a
:class:`~ntklens.sweep.config.StudyConfig`.

A dict is the TOML file's content as Python values; in it, ``model.factory`` and
``data.factory`` may also be module-level callables (they are stored by their
"module:function" name, which every worker process imports)::

    import ntklens

    summary = ntklens.run_study({"name": "mine", "model": {"factory": make_net}, ...},
                                store="results/mine")
    final = ntklens.open_store("results/mine").final()
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ntklens.errors import ConfigError
from ntklens.schema import RunSpec, reference_of
from ntklens.store import Store
from ntklens.sweep.config import StudyConfig, load_config, validate_config
from ntklens.sweep.driver import SweepSummary, run_sweep
from ntklens.sweep.executors import Executor
from ntklens.sweep.planning import plan as plan_specs

StudyLike = str | os.PathLike[str] | Mapping[str, Any] | StudyConfig


def study_config(config: StudyLike) -> StudyConfig:
    """``config`` as a validated :class:`StudyConfig` (a path is read, a dict validated)."""
    if isinstance(config, StudyConfig):
        return config
    if isinstance(config, str | os.PathLike):
        return load_config(Path(config))
    if isinstance(config, Mapping):
        raw = {key: dict(value) if isinstance(value, Mapping) else value
               for key, value in config.items()}  # fmt: skip
        for section in ("model", "data"):
            factory = raw.get(section, {}).get("factory") if section in raw else None
            if callable(factory):
                raw[section]["factory"] = reference_of(factory, f"{section}.factory")
        return validate_config(raw, label="config")
    raise ConfigError(
        f"a study config is a TOML path, a dict or a StudyConfig, not {type(config).__name__}"
    )


def plan(config: StudyLike) -> list[RunSpec]:
    """Every run of the study, checked before any run: datasets read, each model built at
    its smallest width and its outputs checked (see :func:`ntklens.sweep.planning.plan`).
    ``ntklens.sweep.plan_table(specs)`` gives their parameter counts and FLOP estimates."""
    return plan_specs(study_config(config))


def run_study(
    config: StudyLike,
    store: str | os.PathLike[str] | Store | None = None,
    *,
    executor: str | Executor = "local",
    **options: Any,
) -> SweepSummary:
    """Plan and run the study into ``store`` (default ``results/<name>``), skipping the runs
    already stored. ``executor`` is "local", "ray" or an :class:`Executor`; ``options``
    (``workers``, ``address``, ``force``, ``retry_failed``, ``progress``) are those of
    :func:`ntklens.sweep.run_sweep`."""
    study = study_config(config)
    target = store if store is not None else Path("results") / study.name
    return run_sweep(study, target, executor=executor, **options)

"""Sweeps: validated study configs, the run plan, executors, progress and the driver.

Names resolve lazily from their submodules, so reading a config does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ntklens.sweep.api import run_study, study_config
    from ntklens.sweep.config import StudyConfig, load_config, validate_config
    from ntklens.sweep.driver import SweepSummary, run_sweep
    from ntklens.sweep.executors import Executor, LocalExecutor, RayExecutor, make_executor
    from ntklens.sweep.planning import estimate_flops, plan, plan_table
    from ntklens.sweep.progress import LiveProgress, LogProgress, SweepProgress, make_progress

_SOURCES = {
    "run_study": "api",
    "study_config": "api",
    "StudyConfig": "config",
    "load_config": "config",
    "validate_config": "config",
    "SweepSummary": "driver",
    "run_sweep": "driver",
    "Executor": "executors",
    "LocalExecutor": "executors",
    "RayExecutor": "executors",
    "make_executor": "executors",
    "estimate_flops": "planning",
    "plan": "planning",
    "plan_table": "planning",
    "LiveProgress": "progress",
    "LogProgress": "progress",
    "SweepProgress": "progress",
    "make_progress": "progress",
}

__all__ = [
    "Executor",
    "LiveProgress",
    "LocalExecutor",
    "LogProgress",
    "RayExecutor",
    "StudyConfig",
    "SweepProgress",
    "SweepSummary",
    "estimate_flops",
    "load_config",
    "make_executor",
    "make_progress",
    "plan",
    "plan_table",
    "run_study",
    "run_sweep",
    "study_config",
    "validate_config",
]


def __getattr__(name: str) -> Any:
    if name in _SOURCES:
        return getattr(importlib.import_module(f"ntklens.sweep.{_SOURCES[name]}"), name)
    raise AttributeError(f"module 'ntklens.sweep' has no attribute {name!r}")

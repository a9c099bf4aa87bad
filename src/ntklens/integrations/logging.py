"""A plain logging hook: a :class:`~ntklens.train.probes.Probe` on a schedule, its values
handed to any sink.

Two kinds of sink are understood: a dict sink called as ``log(metrics, step=step)``
(``wandb.log``, ``mlflow.log_metrics``, a list's ``append`` via a lambda, ...) and a scalar
sink called as ``add_scalar(tag, value, step)`` once per quantity (a TensorBoard
``SummaryWriter.add_scalar``). Keys are prefixed (``"probe/"`` by default) so that they sort
together in a dashboard.

    probe = Probe(model, x_probe, y_probe)
    hook = ProbeLogger(probe, wandb.log, schedule=probe_steps(total, 4))
    for step in range(total + 1):
        hook(step, batch=(x, y), loss_fn=F.cross_entropy)   # measures only on the schedule
        ...train one step...
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, Literal

import torch

from ntklens.errors import NtkLensError
from ntklens.train.losses import LossFn
from ntklens.train.probes import Probe

SinkKind = Literal["dict", "scalar"]


def log_values(
    values: dict[str, float],
    step: int,
    sink: Callable[..., Any],
    *,
    kind: SinkKind = "dict",
    prefix: str = "probe/",
) -> None:
    """Send ``values`` at ``step`` to ``sink``: ``sink({prefix+key: value}, step=step)`` for a
    dict sink, ``sink(prefix+key, value, step)`` per quantity for a scalar sink."""
    if kind == "dict":
        sink({f"{prefix}{key}": value for key, value in values.items()}, step=step)
    elif kind == "scalar":
        for key, value in values.items():
            sink(f"{prefix}{key}", value, step)
    else:
        raise NtkLensError(f"kind must be 'dict' or 'scalar'; got {kind!r}")


class ProbeLogger:
    """Calls ``probe`` at the steps of ``schedule`` (every call if None) and logs its dict.

    ``sink`` and ``kind`` are as for :func:`log_values`. Calls at other steps do nothing
    and return None, so the hook can sit unconditionally in a loop.
    """

    def __init__(
        self,
        probe: Probe,
        sink: Callable[..., Any],
        *,
        schedule: Collection[int] | None = None,
        kind: SinkKind = "dict",
        prefix: str = "probe/",
    ) -> None:
        if not isinstance(probe, Probe):
            raise NtkLensError(
                f"probe must be an ntklens Probe, got {type(probe).__name__}; "
                "build one with Probe(model, x_probe)"
            )
        if not callable(sink):
            raise NtkLensError(f"sink must be callable (e.g. wandb.log); got {sink!r}")
        if kind not in ("dict", "scalar"):
            raise NtkLensError(f"kind must be 'dict' or 'scalar'; got {kind!r}")
        self.probe = probe
        self.sink = sink
        self.schedule = None if schedule is None else frozenset(schedule)
        self.kind: SinkKind = kind
        self.prefix = prefix

    def __call__(
        self,
        step: int,
        batch: tuple[torch.Tensor, torch.Tensor] | None = None,
        loss_fn: LossFn | None = None,
    ) -> dict[str, float] | None:
        """Probe and log at a scheduled ``step``; the probe's values, or None off schedule."""
        if self.schedule is not None and step not in self.schedule:
            return None
        values = self.probe(step, batch=batch, loss_fn=loss_fn)
        log_values(values, step, self.sink, kind=self.kind, prefix=self.prefix)
        return values

"""``NTKProbe``: a PyTorch Lightning callback that measures the eNTK as the module trains.

At each step of its schedule (by default :func:`~ntklens.train.probes.probe_steps` over the
trainer's total steps) the callback runs a :class:`~ntklens.train.probes.Probe` on the
LightningModule before that step's update, with the step's batch for the spectral position,
and logs the probe's keys (prefixed ``"probe/"``) through every logger of the trainer at
``trainer.global_step``. A final probe is taken at the end of training. ``callback.probe``
keeps the history as a DataFrame.

Needs the ``lightning`` package: ``pip install 'ntklens[lightning]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch

from ntklens.errors import NtkLensError
from ntklens.train.losses import LossFn
from ntklens.train.probes import Probe, probe_steps

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ntklens.integrations.lightning needs PyTorch Lightning; "
        "install it with pip install 'ntklens[lightning]'"
    ) from error

BatchFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


def _default_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise NtkLensError(
        f"NTKProbe expects batches (x, y, ...); got {type(batch).__name__}; "
        "pass batch_fn=lambda batch: (x, y)"
    )


class NTKProbe(Callback):
    """Probe the LightningModule's eNTK on ``x_probe`` on a log schedule and log it.

    ``loss_fn(outputs, y)`` (a mean-reduced scalar) gives the spectral position on each
    probed step's batch; pass ``spectral_position=False`` to probe the kernel only.
    ``schedule`` fixes the probe steps; else ``probe_steps(total, per_decade)`` with the
    trainer's ``estimated_stepping_batches``. ``batch_fn`` turns a batch into ``(x, y)``.
    Other keyword arguments go to :class:`~ntklens.train.probes.Probe` (``output``,
    ``observables``, ``loss_reduction``, ...).
    """

    def __init__(
        self,
        x_probe: torch.Tensor,
        y_probe: torch.Tensor | None = None,
        *,
        loss_fn: LossFn | None = None,
        spectral_position: bool | int = True,
        schedule: Collection[int] | None = None,
        per_decade: int = 4,
        prefix: str = "probe/",
        batch_fn: BatchFn = _default_batch,
        **probe_options: Any,
    ) -> None:
        super().__init__()
        if spectral_position is not False and loss_fn is None:
            raise NtkLensError(
                "NTKProbe needs loss_fn for the spectral position; pass loss_fn=... or "
                "spectral_position=False"
            )
        self.x_probe = x_probe
        self.y_probe = y_probe
        self.loss_fn = loss_fn
        self.spectral_position = spectral_position
        self.schedule = None if schedule is None else sorted(set(schedule))
        self.per_decade = per_decade
        self.prefix = prefix
        self.batch_fn = batch_fn
        self.probe_options = probe_options
        self.probe: Probe | None = None
        self._last_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._probed: set[int] = set()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        parameter = next(pl_module.parameters())
        x = self.x_probe.to(device=parameter.device, dtype=parameter.dtype)
        y = None if self.y_probe is None else self.y_probe.to(parameter.device)
        self.probe = Probe(
            pl_module,
            x,
            y,
            spectral_position=self.spectral_position,
            loss_fn=self.loss_fn,
            **self.probe_options,
        )
        if self.schedule is None:
            total = int(trainer.estimated_stepping_batches)
            self.schedule = probe_steps(total, self.per_decade)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._last_batch = self.batch_fn(batch)
        step = trainer.global_step
        if self.schedule is not None and step in self.schedule:
            self._measure(trainer, step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_batch is not None:
            self._measure(trainer, trainer.global_step)

    def _measure(self, trainer: Trainer, step: int) -> None:
        if self.probe is None or step in self._probed:
            return
        self._probed.add(step)
        batch = None if self.spectral_position is False else self._last_batch
        values = self.probe(step, batch=batch)
        metrics = {f"{self.prefix}{key}": value for key, value in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

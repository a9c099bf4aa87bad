"""Optional adapters that put a :class:`~ntklens.train.probes.Probe` into other tools.

* :mod:`ntklens.integrations.logging`: hand a probe's dict to any sink, such as ``wandb.log``
  or a TensorBoard ``SummaryWriter.add_scalar`` (no extra dependency).
* :mod:`ntklens.integrations.lightning`: ``NTKProbe``, a PyTorch Lightning callback that logs
  the probe's keys through the trainer's loggers (needs ``pip install 'ntklens[lightning]'``).

Nothing is imported here; each adapter imports its tool only when it is itself imported.
"""

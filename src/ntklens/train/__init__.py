"""ntklens.train: one training run that probes its eNTK as it learns.

:func:`ntklens.train.run.run` turns a :class:`ntklens.schema.RunSpec` into a
:class:`ntklens.schema.RunResult` (tidy records and eigen-spectra);
:func:`ntklens.train.probes.probe_steps` is the log-spaced probe schedule. Nothing is
imported here, so that importing a submodule stays cheap.
"""

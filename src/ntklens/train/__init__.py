"""ntklens.train: one training run that probes its eNTK as it learns.

:class:`ntklens.train.probes.Probe` measures the eNTK's observables, the parameter change
and the spectral position at one step of any training loop, and the built-in runs use it;
:func:`ntklens.train.run.run` turns a :class:`ntklens.schema.RunSpec` into a
:class:`ntklens.schema.RunResult` (tidy records and eigen-spectra);
:func:`ntklens.train.probes.probe_steps` is the log-spaced probe schedule. Nothing is
imported here, so that importing a submodule stays cheap.
"""

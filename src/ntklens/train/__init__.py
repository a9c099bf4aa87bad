"""ntklens.train: one training run that probes its eNTK as it learns.

:func:`ntklens.train.run.run` turns a :class:`RunSpec` into a :class:`RunResult` (tidy
records and eigen-spectra); :func:`ntklens.train.probes.probe_steps` is the log-spaced probe
schedule. Only the spec types are imported here, so that reading a spec stays cheap.
"""

from ntklens.train.spec import RunResult, RunSpec, Spectrum

__all__ = ["RunResult", "RunSpec", "Spectrum"]

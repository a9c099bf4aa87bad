"""Scaling-law fits with uncertainty, exponent comparisons and the feature–kernel transition.

:func:`fit_power_law` fits ``y = a·x^(−α) [+ c]`` with bootstrap CIs, :func:`compare_exponents`
compares two fits, :func:`fit_trend` gives the direction of any quantity along an axis; the
``*_transition`` functions estimate the width w* where feature learning fades;
:func:`derive_findings` turns them into each claim's verdict; and :func:`summarize` runs all
of them over a study's ``runs`` and ``records`` tables.
"""

from ntklens.analysis.findings import VERDICTS, derive_findings
from ntklens.analysis.fits import PowerLawFit, Trend, compare_exponents, fit_power_law, fit_trend
from ntklens.analysis.summary import summarize
from ntklens.analysis.transition import (
    TransitionEstimate,
    advantage_transition,
    broken_power_law_transition,
    llm_ratio,
    threshold_transition,
)

__all__ = [
    "VERDICTS",
    "PowerLawFit",
    "TransitionEstimate",
    "Trend",
    "advantage_transition",
    "broken_power_law_transition",
    "compare_exponents",
    "derive_findings",
    "fit_power_law",
    "fit_trend",
    "llm_ratio",
    "summarize",
    "threshold_transition",
]

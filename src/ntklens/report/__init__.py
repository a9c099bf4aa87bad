"""Figures and the self-contained HTML report of a results store, and its JSON summary.

:func:`build_report` reads a store, summarizes it with :func:`ntklens.analysis.summarize`
and writes ``summary.json``, PNG and PDF figures and ``report.html``; :func:`write_json`
writes a summary for scripts. The figures are listed in :data:`FIGURES`.
"""

from ntklens.report.build import ReportResult, build_report, write_json
from ntklens.report.figures import FIGURES, FigureSpec, FigureUnavailable, StudyData

__all__ = [
    "FIGURES",
    "FigureSpec",
    "FigureUnavailable",
    "ReportResult",
    "StudyData",
    "build_report",
    "write_json",
]

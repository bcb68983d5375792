"""Reports: a run directory -> report.html (self-contained), report.md, summary.json and plots/*.png.

``build_report(run_dir)`` reads only files (see ``gradguard.report.rundir``), so a report can be rebuilt at
any time with ``gradguard report RUN_DIR``.
"""
from .builder import build_report
from .rundir import read_run
from .summary import summarize

__all__ = ["build_report", "read_run", "summarize"]

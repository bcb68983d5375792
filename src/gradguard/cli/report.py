"""``gradguard report RUN_DIR``: rebuild report.html, report.md, summary.json and plots/ from the run's files."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..layout import SUMMARY_FILE
from .common import add_command, headline_text


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(commands, "report", parents=[common], help="(re)build report.html from a run directory",
                         description="Rebuild RUN_DIR/report.html (self-contained), report.md, summary.json "
                         "and plots/ from the files in RUN_DIR.",
                         examples=["gradguard report runs/demo", "gradguard report runs/pgd --json"])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (a model run or a demo run)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    from ..report import build_report
    from ..report.rundir import read_json
    from ..workflow import check_writable

    run_dir = Path(args.run_dir)
    if run_dir.is_dir():
        check_writable(run_dir)
    path = build_report(run_dir)
    summary = read_json(run_dir / SUMMARY_FILE)
    return {"report": str(path), "summary": summary}, headline_text(summary) + f"\n\nreport: {path}"

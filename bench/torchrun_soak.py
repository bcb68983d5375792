"""Soak the two-process tests (issue 21): run the torchrun tests (the CLI's and the Python API's: training,
monitor, evaluation) N times in a row while a second job keeps the other core busy, and report every failure.

A rank that aborts at exit ("terminate called without an active exception", SIGABRT) did so at random, more
often on a loaded machine; this loop is how the fix is shown. It starts the busy job itself (a spinning Python
process, stopped at the end), runs ``pytest -m slow`` on the torchrun test files (narrowed with ``-k`` or
``--tests``) once per round, and writes what failed — how often, which test, the tail of its message (which holds torchrun's
stderr) — to stdout and to a JSON file.

    python bench/torchrun_soak.py                       # 30 rounds of every torchrun test
    python bench/torchrun_soak.py --runs 30 -k train    # the tests that aborted most, 30 times
    python bench/torchrun_soak.py --tests tests/test_gradflow_distributed.py   # one file
    python bench/torchrun_soak.py --root /path/to/other/checkout --runs 10   # e.g. the code before the fix

Exit status: 0 when no round failed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TESTS = ("tests/test_cli_distributed.py", "tests/test_train_distributed.py", "tests/test_gradflow_distributed.py",
         "tests/test_distributed_eval.py")
ABORT_SIGNS = ("terminate called", "SIGABRT", "exitcode  : -6")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="rounds (default 30)")
    parser.add_argument("-k", dest="select", default="", help="pytest -k expression within the torchrun tests")
    parser.add_argument("--tests", nargs="+", default=list(TESTS), help="test files (default: every torchrun file)")
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose src/ and tests/ run (default: this)")
    parser.add_argument("--no-busy", action="store_true", help="do not keep the other core busy")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "torchrun-soak.json")
    args = parser.parse_args()
    root = args.root.resolve()
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(root / "src"), os.environ.get("PYTHONPATH", "")) if p))
    record = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "root": str(root),
              "commit": _commit(root), "tests": args.tests, "marker": "slow", "select": args.select,
              "busy_core": not args.no_busy, "runs_planned": args.runs, "rounds": []}
    print(f"torchrun soak: {args.runs} rounds of {' '.join(args.tests)} -m slow" + (f" -k {args.select!r}" if args.select else "")
          + f" in {root} ({record['commit']}), other core {'busy' if not args.no_busy else 'idle'}", flush=True)
    busy = None if args.no_busy else subprocess.Popen([sys.executable, "-c", "while True: pass"])
    started = time.perf_counter()
    try:
        for number in range(1, args.runs + 1):
            outcome = _round(root, env, args.tests, args.select)
            record["rounds"].append({"round": number, **outcome})
            failed = ", ".join(f["test"] for f in outcome["failed"]) or "-"
            print(f"round {number:2d}/{args.runs}: {len(outcome['passed'])} passed, {len(outcome['failed'])} failed "
                  f"({failed}){' rc=' + str(outcome['returncode']) if outcome['returncode'] not in (0, 1) else ''}",
                  flush=True)
            _write(args.out, record, started)  # kept up to date: an interrupted soak still reports its rounds
    finally:
        if busy is not None:
            busy.terminate()
            busy.wait()
    summary = _write(args.out, record, started)
    print(f"\n{summary['rounds_run']} rounds: {summary['rounds_failed']} with a failure, "
          f"{summary['test_failures']} test failures ({summary['aborts']} with an abort at exit)")
    for test, count in summary["failures_by_test"].items():
        print(f"  {count:3d} x {test}")
    for round_ in record["rounds"]:
        for failure in round_["failed"]:
            print(f"\n--- round {round_['round']}: {failure['test']}\n{failure['tail']}")
    print(f"\nwrote {args.out}")
    return 0 if summary["rounds_failed"] == 0 else 1


def _round(root: Path, env: dict, tests: list[str], select: str) -> dict:
    """One pytest run of the torchrun tests: which passed, which failed (with the end of the message)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-m", "slow",
                   f"--junitxml={report}", *(["-k", select] if select else [])]
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        passed, failed = [], []
        if report.exists():
            for case in ET.parse(report).getroot().iter("testcase"):
                name = case.get("name", "?")
                problem = case.find("failure")
                if problem is None:
                    problem = case.find("error")
                if problem is not None:
                    text = (problem.get("message") or "") + "\n" + (problem.text or "")
                    failed.append({"test": name, "abort": any(sign in text for sign in ABORT_SIGNS),
                                   "tail": text.strip()[-1500:]})
                elif case.find("skipped") is None:
                    passed.append(name)
        if not passed and not failed:  # pytest itself failed (collection error, ...)
            failed.append({"test": "pytest", "abort": False, "tail": (done.stdout + done.stderr).strip()[-1500:]})
    return {"returncode": done.returncode, "passed": passed, "failed": failed}


def _write(path: Path, record: dict, started: float) -> dict:
    failures = [f for r in record["rounds"] for f in r["failed"]]
    by_test: dict[str, int] = {}
    for failure in failures:
        by_test[failure["test"]] = by_test.get(failure["test"], 0) + 1
    summary = {"rounds_run": len(record["rounds"]),
               "rounds_failed": sum(bool(r["failed"]) for r in record["rounds"]),
               "test_runs": sum(len(r["passed"]) + len(r["failed"]) for r in record["rounds"]),
               "test_failures": len(failures), "aborts": sum(f["abort"] for f in failures),
               "failures_by_test": dict(sorted(by_test.items(), key=lambda item: -item[1])),
               "elapsed_s": round(time.perf_counter() - started, 1)}
    record["summary"] = summary
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return summary


def _commit(root: Path) -> str:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "not a git checkout"


if __name__ == "__main__":
    sys.exit(main())

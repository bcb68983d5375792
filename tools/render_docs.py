"""Render the command outputs shown in README.md and docs/*.md from real runs, so they are never pasted.

A doc shows a command's output as an HTML comment naming the command, followed by a fenced block:

    <!-- output: gradguard train --out runs/pgd --method pgd --eps 0.1 && gradguard evaluate runs/pgd -->
    ```
    (replaced by what the last command printed)
    ```

Commands joined by ``&&`` run in order in one scratch directory shared by every marker of one render (a
command already run there is not run again, so a second marker can build on the first's run directory); the
block shows the last command's stdout. ``<!-- output cheap: ... -->`` marks an output that is fast and
deterministic (``gradguard list``, ``--help`` texts): ``--check --cheap`` re-renders only those, which
tests/test_docs.py does on every test run. Timings and trained numbers are rendered by a full run:

    PYTHONPATH=src python tools/render_docs.py              # rewrite every shown output (minutes: runs the demo)
    PYTHONPATH=src python tools/render_docs.py docs/cli-list.md
    PYTHONPATH=src python tools/render_docs.py --check --cheap   # exit 1 and a diff when a shown output drifted

Commands run in-process through ``gradguard.cli.main`` with ``--help`` wrapped at 100 columns.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs")
MARKER = re.compile(r"^<!-- output( cheap)?: (?P<command>.+?) -->\s*$")
HELP_COLUMNS = "100"


@dataclass(frozen=True)
class Output:
    """One shown output: the marker's line (0-based), the fenced block's line span and the commands."""

    path: Path
    line: int
    start: int          # the opening fence
    end: int            # the closing fence
    commands: tuple[tuple[str, ...], ...]
    cheap: bool


class RenderError(RuntimeError):
    """A marker without its block, or a command that did not exit 0."""


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md then docs/*.md, in a fixed order (outputs of later pages may build on earlier runs)."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def find_outputs(path: Path, lines: Sequence[str]) -> list[Output]:
    outputs = []
    for number, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        start = number + 1
        if start >= len(lines) or not lines[start].startswith("```"):
            raise RenderError(f"{path}:{number + 1}: an output marker must be followed by a fenced block")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("```")), None)
        if end is None:
            raise RenderError(f"{path}:{start + 1}: the fenced block after the output marker is not closed")
        commands = tuple(tuple(shlex.split(part)) for part in match["command"].split("&&"))
        if not commands or any(not c or c[0] != "gradguard" for c in commands):
            raise RenderError(f"{path}:{number + 1}: every command of an output marker starts with `gradguard`")
        outputs.append(Output(path, number, start, end, commands, bool(match.group(1))))
    return outputs


class Runner:
    """Runs gradguard commands in one scratch directory, each at most once; remembers what each printed."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.printed: dict[tuple[str, ...], str] = {}

    def run(self, command: tuple[str, ...]) -> str:
        if command not in self.printed:
            self.printed[command] = self._run(command)
        return self.printed[command]

    def _run(self, command: tuple[str, ...]) -> str:
        from gradguard.cli import main

        stdout = io.StringIO()
        with _inside(self.workdir), contextlib.redirect_stdout(stdout):
            try:
                status = main(list(command[1:]))
            except SystemExit as exit_:  # --help and argparse usage errors exit
                status = exit_.code if isinstance(exit_.code, int) else 1
        if status != 0:
            raise RenderError(f"`{shlex.join(command)}` exited {status}:\n{stdout.getvalue()}")
        return stdout.getvalue()


@contextlib.contextmanager
def _inside(workdir: Path) -> Iterator[None]:
    """chdir into the scratch directory with a fixed terminal width, and back."""
    before, columns = Path.cwd(), os.environ.get("COLUMNS")
    os.chdir(workdir)
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        yield
    finally:
        os.chdir(before)
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns


def render(path: Path, runner: Runner, *, cheap_only: bool = False) -> str:
    """The text of ``path`` with every (or every cheap) shown output replaced by a real run's."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for output in reversed(find_outputs(path, lines)):
        if cheap_only and not output.cheap:
            continue
        printed = ""
        for command in output.commands:
            printed = runner.run(command)
        body = [line.rstrip() for line in printed.rstrip("\n").splitlines()]
        lines[output.start + 1:output.end] = body
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="docs to render (default README.md and docs/*.md)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff when a doc differs")
    parser.add_argument("--cheap", action="store_true", help="only the outputs marked `output cheap:`")
    args = parser.parse_args(argv)
    files = [p.resolve() for p in args.files] or doc_files()
    drifted = []
    with tempfile.TemporaryDirectory(prefix="gradguard-docs-") as scratch:
        runner = Runner(Path(scratch))
        for path in files:
            old = path.read_text(encoding="utf-8")
            new = render(path, runner, cheap_only=args.cheap)
            if new == old:
                continue
            if args.check:
                drifted.append(path)
                sys.stdout.writelines(difflib.unified_diff(
                    old.splitlines(keepends=True), new.splitlines(keepends=True), f"{path} (shown)",
                    f"{path} (rendered)"))
            else:
                from gradguard.io import atomic_write_text

                atomic_write_text(path, new)
                print(f"rendered {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if drifted:
        print(f"{len(drifted)} doc(s) show outputs that differ from a real run; run tools/render_docs.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's and docs/'s examples run, and the outputs they show are the real ones.

Every ``gradguard ...`` line of a ```bash block in README.md and docs/*.md (continuation lines joined, comments
stripped, ``&&`` chains split) runs in document order, one temporary working directory per page, prepared with
what the examples assume: tiny MNIST / Fashion-MNIST IDX files ($GRADGUARD_DATA and ~/data/mnist), a tiny
CIFAR-10 binary folder (~/data/cifar-10-batches-bin, HOME is the temporary directory), ``mymodels.py`` +
``net.pth``, small ``npy`` folders (data/, mydata/), an image folder of mixed sizes (~/data/val), and, for a
``RUN_DIR`` a page uses before creating it, a copy of a tiny trained digits run. Python blocks run too, in the
same order and directory (one namespace per page, like a notebook), unless the line before the block says
``<!-- not run: REASON -->``.

To stay fast without changing what the examples say, each command gets ``--config tiny.toml`` (top-level keys,
so each command takes only those it has; flags on the line win; the demo, which has no size flag, gets
``[demo] quick = true``: the sizes of ``demo --quick``) and these substitutions (SIZES):
``--samples N`` -> 16, ``--epochs N`` -> 1, ``--train-samples N`` -> 64, and an absolute ``/tmp/...`` path
-> the same path inside the temporary directory. Lines starting with ``torchrun`` are counted and skipped
(tests/test_distributed_eval.py and the torchrun tests run them), and so are ``--device cuda`` lines on a
machine without CUDA; a line whose comment says ``# fails:`` must
exit non-zero with a one-line error. Every command must exit 0, and the run directory it writes must exist.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
SUBCOMMANDS = ("demo", "train", "attack", "evaluate", "diagnose", "report", "list")
SIZES = {"--samples": "16", "--epochs": "1", "--train-samples": "64"}
# Top-level keys apply to every command that takes them; the demo, which has no size flag (200 test images, a
# 1,347-image training set, two gradient-flow runs), gets its own --quick sizes through its own table.
TINY_CONFIG = "samples = 16\nepochs = 1\ntrain_samples = 64\nbatch_size = 32\n\n[demo]\nquick = true\n"
NOT_RUN = re.compile(r"^<!-- not run: (?P<reason>.+?) -->\s*$")
OUTPUT_MARKER = re.compile(r"^<!-- output( cheap)?: .+ -->\s*$")
# Python blocks on pages another part of the project owns, not run until the page marks them itself.
PENDING_NOT_RUN: dict[str, str] = {}  # page -> reason, for pages whose python blocks still lack a marker


@dataclass(frozen=True)
class Example:
    page: str
    line: int
    kind: str                   # "command", "torchrun" or "python"
    text: str                   # the joined command line, or the Python source
    fails: bool = False
    not_run: str | None = None  # the reason a Python block is not run


# ------------------------------------------------------------------------------------------------ parsing
def fenced_blocks(text: str) -> list[tuple[int, str, list[str], str]]:
    """(first body line number, fence info, body lines, the line before the fence) for each fenced block."""
    lines, blocks, index = text.splitlines(), [], 0
    while index < len(lines):
        if lines[index].startswith("```"):
            info, start = lines[index][3:].strip(), index + 1
            end = next((i for i in range(start, len(lines)) if lines[i].startswith("```")), len(lines))
            before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            blocks.append((start + 1, info, lines[start:end], before))
            index = end + 1
        else:
            index += 1
    return blocks


def examples_of(page: str) -> list[Example]:
    found: list[Example] = []
    for number, info, body, before in fenced_blocks((ROOT / page).read_text(encoding="utf-8")):
        if info in SHELL_FENCES:
            found += shell_examples(page, number, body)
        elif info == "python":
            marker = NOT_RUN.match(before)
            reason = marker["reason"] if marker else PENDING_NOT_RUN.get(page)
            found.append(Example(page, number, "python", "\n".join(body), not_run=reason))
    return found


def shell_examples(page: str, first_line: int, body: list[str]) -> list[Example]:
    found, pending, start = [], "", first_line
    for offset, line in enumerate(body):
        if not pending:
            start = first_line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined, pending = pending + line, ""
        fails = re.search(r"#\s*fails:", joined) is not None
        words = shlex.split(joined, comments=True)
        for command in " ".join(shlex.quote(w) if w != "&&" else w for w in words).split(" && "):
            first = command.split(" ", 1)[0] if command else ""
            if first == "gradguard":
                found.append(Example(page, start, "command", command, fails))
            elif first == "torchrun":
                found.append(Example(page, start, "torchrun", command))
    return found


def raw_command_count(page: str) -> int:
    """gradguard command lines in any fenced block that is not Python, TOML or a rendered output, counted without
    the parser above: a block in a fence the parser skips (```sh-session, an unmarked ```) shows up as a gap."""
    pattern = re.compile(r"(?:^\s*(?:\$\s*)?|&&\s*)(?:gradguard\s+[a-z][\w-]*|torchrun)(?=\s|$)")
    count = 0
    for _, info, body, before in fenced_blocks((ROOT / page).read_text(encoding="utf-8")):
        if info in {"python", "toml", "json"} or OUTPUT_MARKER.match(before):
            continue
        count += sum(len(pattern.findall(line.split(" #")[0])) for line in body)
    return count


# ------------------------------------------------------------------------------------------------ fixtures
MYMODELS = '''from torch import nn


class Net(nn.Module):
    def __init__(self, width=16, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)
'''


def write_idx(folder: Path, rng: np.random.Generator, train: int = 64, test: int = 32) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


def write_cifar10(folder: Path, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)

    def records(n: int) -> bytes:
        labels = (np.arange(n) % 9).astype(np.uint8)[:, None]  # never 9, the class net.pth always predicts
        return np.concatenate([labels, rng.integers(0, 256, (n, 3072), dtype=np.uint8)], axis=1).tobytes()

    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(records(16))
    (folder / "test_batch.bin").write_bytes(records(256))  # datasets.md reads 256 test images
    (folder / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")


def write_npy(folder: Path, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "x.npy", rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8))
    np.save(folder / "y.npy", np.arange(48) % 9)


def write_image_folder(folder: Path, rng: np.random.Generator) -> None:
    from PIL import Image

    for c, name in enumerate(("cats", "dogs")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            size = (300 + 20 * i + c, 260 + 10 * i)  # mixed sizes: the example needs --resize / --center-crop
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.png")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the examples assume, built once: data, mymodels.py + net.pth, a tiny trained digits run."""
    root = tmp_path_factory.mktemp("doc-assets")
    rng = np.random.default_rng(0)
    write_idx(root / "datasets" / "fashion-mnist", rng)
    write_idx(root / "home" / "data" / "mnist", rng)
    write_cifar10(root / "home" / "data" / "cifar-10-batches-bin", rng)
    write_image_folder(root / "home" / "data" / "val", rng)
    work = root / "work"
    work.mkdir()
    write_npy(work / "data", rng)
    write_npy(work / "mydata", rng)
    (work / "mymodels.py").write_text(MYMODELS)
    spec = importlib.util.spec_from_file_location("doc_mymodels", work / "mymodels.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    torch.manual_seed(0)
    net = module.Net()
    with torch.no_grad():  # always class 9, which no image of the examples' data has: clean accuracy 0, so the
        net.body[-1].bias[9] = 20.0  # model-source examples test the command paths, not how long attacks search
    torch.save(net.state_dict(), work / "net.pth")
    (work / "tiny.toml").write_text(TINY_CONFIG)
    status, _ = gradguard(["train", "--out", str(root / "base-run"), "--config", str(work / "tiny.toml")], root)
    assert status == 0
    return root


def gradguard(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run the gradguard CLI in-process in ``cwd``; (exit status, stderr)."""
    from gradguard.cli import main

    before, stderr = Path.cwd(), io.StringIO()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            try:
                status = main(argv)
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(before)
    return status, stderr.getvalue()


def prepared_argv(command: str, tmp: Path) -> list[str]:
    """The command's words as the shell would pass them (~ at a word's start is HOME), SIZES applied."""
    words = shlex.split(command)[1:]
    argv = []
    for index, word in enumerate(words):
        if index and words[index - 1] in SIZES:
            word = SIZES[words[index - 1]]
        if word.startswith("~/"):
            word = str(tmp / "home" / word[2:])
        elif word.startswith("/tmp/"):
            word = str(tmp / "abs-tmp" / word[len("/tmp/"):])
        argv.append(word)
    return argv + ["--config", "tiny.toml"]


def written_dir(argv: list[str]) -> str | None:
    if "--out" in argv:
        return argv[argv.index("--out") + 1]
    if argv[0] == "demo":
        return "runs/demo"
    return None


def seed_run_dir(argv: list[str], work: Path, assets: Path) -> None:
    """A RUN_DIR the page uses before creating it gets a copy of the tiny trained digits run."""
    if argv[0] in ("attack", "evaluate", "diagnose", "report") and not argv[1].startswith("-"):
        target = work / argv[1]
        if not target.exists():
            shutil.copytree(assets / "base-run", target)


def run_page(page: str, tmp: Path, assets: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    work = tmp / "work"
    shutil.copytree(assets / "work", work)
    shutil.copytree(assets / "home", tmp / "home")
    (tmp / "abs-tmp").mkdir()
    monkeypatch.setenv("HOME", str(tmp / "home"))
    monkeypatch.setenv("GRADGUARD_DATA", str(assets / "datasets"))
    monkeypatch.syspath_prepend(str(work))
    sys.modules.pop("mymodels", None)
    done: dict[str, list] = {"command": [], "torchrun": [], "needs cuda": [], "python": [], "not run": [],
                             "seconds": []}
    namespace: dict = {"__name__": "__main__"}
    for example in examples_of(page):
        where = f"{page}:{example.line}"
        if example.kind == "torchrun":
            done["torchrun"].append(where)
        elif example.kind == "command" and "--device cuda" in example.text and not torch.cuda.is_available():
            done["needs cuda"].append(where)
        elif example.kind == "python" and example.not_run:
            done["not run"].append(f"{where} ({example.not_run})")
        elif example.kind == "python":
            before = Path.cwd()
            os.chdir(work)
            try:
                exec(compile(example.text, where, "exec"), namespace)  # noqa: S102 - the docs' own examples
            finally:
                os.chdir(before)
            done["python"].append(where)
        else:
            argv = prepared_argv(example.text, tmp)
            seed_run_dir(argv, work, assets)
            started = time.perf_counter()
            status, stderr = gradguard(argv, work)
            done["seconds"].append((round(time.perf_counter() - started, 1), where, example.text))
            if example.fails:
                assert status != 0 and len(stderr.strip().splitlines()) == 1, f"{where}: {example.text}: {stderr}"
            else:
                assert status == 0, f"{where}: `{example.text}` exited {status}: {stderr.strip()[-2000:]}"
                out = written_dir(argv)
                assert out is None or (work / out).is_dir(), f"{where}: {example.text} did not write {out}"
            done["command"].append(where)
    return done


# ------------------------------------------------------------------------------------------------ tests
PAGES_WITH_EXAMPLES = [p for p in PAGES if examples_of(p)]


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES)
def test_page_examples_run(page: str, tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture) -> None:
    done = run_page(page, tmp_path, assets, monkeypatch)
    expected = [e for e in examples_of(page)]
    assert len(done["command"]) + len(done["torchrun"]) + len(done["needs cuda"]) == raw_command_count(page), \
        f"{page}: a command line outside a ```bash block, or one the parser missed"
    seconds = sorted(done.pop("seconds"), reverse=True)
    assert sum(len(v) for v in done.values()) == len(expected)
    with capsys.disabled():
        if os.environ.get("GRADGUARD_DOCS_TIMES"):
            print("".join(f"\n  {s:6.1f} s  {where}  {text}" for s, where, text in seconds[:8]))
        if done["torchrun"] or done["needs cuda"] or done["not run"]:
            print(f"\n{page}: {len(done['command'])} commands and {len(done['python'])} Python blocks ran; "
                  f"not run: {len(done['torchrun'])} torchrun lines {done['torchrun']}, {len(done['needs cuda'])} "
                  f"--device cuda lines without a GPU {done['needs cuda']}, Python blocks {done['not run']}")


def test_every_page_is_parsed_and_the_total_is_known() -> None:
    """The docs hold exactly these many runnable examples: a block the parser misses changes the count."""
    by_kind: dict[str, int] = {}
    for page in PAGES:
        assert raw_command_count(page) == sum(e.kind != "python" for e in examples_of(page)), page
        for example in examples_of(page):
            by_kind[example.kind] = by_kind.get(example.kind, 0) + 1
    assert by_kind.get("command", 0) >= 50, by_kind


def load_render_docs() -> ModuleType:
    """tools/render_docs.py (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "tools" / "render_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_docs"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_shown_outputs_are_real() -> None:
    """`gradguard list` and every --help text shown in docs/ match what the CLI prints now."""
    render_docs = load_render_docs()
    cheap = [o for p in render_docs.doc_files(ROOT)
             for o in render_docs.find_outputs(p, p.read_text(encoding="utf-8").splitlines()) if o.cheap]
    assert len(cheap) >= 8
    assert render_docs.main(["--check", "--cheap"]) == 0, "run: PYTHONPATH=src python tools/render_docs.py --cheap"


def test_render_check_catches_a_drifted_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    render_docs = load_render_docs()
    page = tmp_path / "page.md"
    page.write_text("Try it:\n\n<!-- output cheap: gradguard list suites -->\n```\nsuites: pasted long ago\n```\n")
    assert render_docs.main(["--check", "--cheap", str(page)]) == 1
    assert "pasted long ago" in page.read_text() and "-suites: pasted long ago" in capsys.readouterr().out
    assert render_docs.main([str(page)]) == 0
    from gradguard.evaluation import SUITES

    assert f"suites: {', '.join(sorted(SUITES))}" in page.read_text()  # the real list, whatever suites exist
    assert render_docs.main(["--check", "--cheap", str(page)]) == 0

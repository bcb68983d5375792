"""The structure rules of docs/architecture.md, held by a test (standard library only: ``ast`` over the source).

Every import counts, module-level or inside a function (the code imports lazily a lot). The rules:

- R1 layers: a module imports only its own package or a lower layer (``LAYERS``); ``train``, ``integrations``
  and ``report`` never import each other.
- R2 no circles: the file-level import graph has no cycle.
- R3 private names stay private: no ``from X import _name`` across modules.
- R4 the root is a facade: nothing inside the package imports ``gradguard`` itself.
- R5 size: every file ≤ ``MAX_LINES`` unless it is on ``LONG_FILES`` with its reason; none over ``HARD_LIMIT``.
- R7 one gradient primitive: ``torch.autograd.grad`` only in the files of ``AUTOGRAD_GRAD``.
- R8 heavy imports in their place: matplotlib, tqdm, safetensors and the training frameworks only in their modules.
- R9 file names in one place: a string equal to a run-directory file name of ``layout.py`` appears only there.
- R10 one set of process-group helpers: ``torch.distributed`` is imported or used only in ``PROCESS_GROUPS``.

It began as a ratchet (``KNOWN`` listed the 57 violations the code had when the test was written, and the
structure issue removed them one move at a time); ``KNOWN`` is now empty, so every rule is strict. Keep it empty:
a deliberate exception is a named entry of ``LONG_FILES`` / ``AUTOGRAD_GRAD`` / ``HEAVY`` with its reason.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "gradguard"

# Lower index = lower layer. A module's layer is that of its top-level name under gradguard.
LAYERS: list[set[str]] = [
    {"_version", "errors", "io", "rng", "layout"},
    {"threat", "checks", "config", "runtime"},
    {"core"},
    {"data", "models", "viz"},
    {"attacks"},
    {"evaluation"},
    {"diagnostics"},
    {"train", "integrations", "report"},
    {"runs", "workflow"},
    {"cli"},
]
NEVER_EACH_OTHER = {"train", "integrations", "report"}

MAX_LINES = 400
HARD_LIMIT = 600
LONG_FILES: dict[str, str] = {  # path under gradguard/ -> why it may be long (one algorithm)
    "evaluation/certify.py": "one algorithm: randomized smoothing (Cohen, Rosenfeld & Kolter 2019), its CERTIFY and "
                             "PREDICT with their statistics, noise voting and CertifyResult",
}

AUTOGRAD_GRAD = {  # where torch.autograd.grad may be called: the gradient primitive and second-order code
    "core/gradient.py", "attacks/bpda.py", "diagnostics/curvature/hvp.py", "diagnostics/curvature/inputs.py",
    "train/methods/awp.py",  # AWP differentiates the loss in the weights, not the input
}
HEAVY = {  # third-party import -> the only places (path prefixes under gradguard/) that may import it
    "matplotlib": ("viz/", "data/folders.py"),
    "tqdm": ("runtime/progress.py",),
    "safetensors": ("models/weights.py", "train/checkpoint.py"),
    "lightning": ("integrations/",),
    "transformers": ("integrations/",),
    "tensorboard": ("integrations/",),
}

NOT_BY_NAME: set[str] = set()  # attack classes deliberately not reachable by a suite name

# The violations of the code as it stood (each a tuple naming the rule and its parties); the list may only shrink.
KNOWN: set[tuple] = set()  # empty: every rule is strict


# ------------------------------------------------------------------------------------------------ the graph
def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts)


def relative_path(module: str) -> str:
    """``gradguard.attacks.base`` -> ``attacks/base.py`` (a package's ``__init__`` keeps its name)."""
    parts = module.split(".")[1:]
    return "/".join(parts) + ".py" if parts else "__init__.py"


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return module.endswith(".__init__") or module == "gradguard.__init__"


def _package_of(module: str) -> str:
    """The package a module's relative imports start from."""
    parts = module.split(".")
    return ".".join(parts[:-1])


def _resolve(module: str, target: str | None, level: int) -> str:
    if level == 0:
        return target or ""
    base = _package_of(module).split(".")
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _file_of(dotted: str) -> str | None:
    """The module file a dotted import name lands in (a package's ``__init__``), or None outside gradguard."""
    known = modules()
    if dotted in known:
        return dotted
    if f"{dotted}.__init__" in known:
        return f"{dotted}.__init__"
    return None


@lru_cache(maxsize=None)
def imports() -> list[tuple[str, str, tuple[str, ...]]]:
    """(importer, imported module file, names taken) for every import statement at any depth."""
    edges: list[tuple[str, str, tuple[str, ...]]] = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "gradguard":
                        target = _file_of(alias.name)
                        if target:
                            edges.append((module, target, ()))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node.module, node.level)
                if base.split(".")[0] != "gradguard":
                    continue
                names = tuple(alias.name for alias in node.names)
                submodules = [f for f in (_file_of(f"{base}.{n}") for n in names) if f]
                taken = tuple(n for n in names if not _file_of(f"{base}.{n}"))
                target = _file_of(base)
                if target and (taken or not submodules):
                    edges.append((module, target, taken))
                edges.extend((module, sub, ()) for sub in submodules)
    return [(a, b, names) for a, b, names in edges if a != b]


FACADES = {"workflow": "runs"}  # a documented module that re-exports a package of its own layer counts as it


def top(module: str) -> str:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return FACADES.get(name, name)


def layer(module: str) -> int:
    name = top(module)
    if name == "__init__":
        return len(LAYERS)
    return next(i for i, names in enumerate(LAYERS) if name in names)


def third_party_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
            if node.module == "torch.utils" and any(a.name == "tensorboard" for a in node.names):
                found.add("tensorboard")
            if node.module.startswith("torch.utils.tensorboard"):
                found.add("tensorboard")
    return found


# ------------------------------------------------------------------------------------------------ the rules
def layer_violations() -> set[tuple]:
    bad = set()
    for a, b, _ in imports():
        if top(b) == "__init__":
            continue  # R4's business
        up = layer(b) > layer(a)
        sideways = layer(b) == layer(a) and top(a) != top(b)
        if up or sideways or (top(a) in NEVER_EACH_OTHER and top(b) in NEVER_EACH_OTHER and top(a) != top(b)):
            bad.add(("R1", a, b))
    return bad


def root_imports() -> set[tuple]:
    return {("R4", a) for a, b, _ in imports() if b == "gradguard.__init__"}


def cycles() -> set[tuple]:
    """Strongly connected components of more than one file (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for a, b, _ in imports():
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple] = set()
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:  # one entry per file in a circle: a file newly drawn into one fails
                found.update(("R2", member) for member in component)

    for node in graph:
        if node not in index:
            visit(node)
    return found


def private_imports() -> set[tuple]:
    """Private names taken across modules, and ``_``-modules (but ``_version``) used outside their package."""
    names = {("R3", a, b, name) for a, b, taken in imports() for name in taken
             if name.startswith("_") and not name.startswith("__")}
    private_modules = {("R3", a, b) for a, b, _ in imports()
                       if b.split(".")[-1].startswith("_") and not b.endswith(("__init__", "_version"))
                       and _package_of(a) != _package_of(b)}
    return names | private_modules


def oversized() -> set[tuple]:
    bad = set()
    for module, path in modules().items():
        lines = len(path.read_text().splitlines())
        rel = relative_path(module)
        if lines > HARD_LIMIT or (lines > MAX_LINES and rel not in LONG_FILES):
            bad.add(("R5", rel))
    return bad


def gradient_calls() -> set[tuple]:
    bad = set()
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "grad" and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "autograd" and relative_path(module) not in AUTOGRAD_GRAD:
                bad.add(("R7", relative_path(module)))
    return bad


def heavy_imports() -> set[tuple]:
    bad = set()
    for module, path in modules().items():
        rel = relative_path(module)
        for name in third_party_imports(path) & set(HEAVY):
            if not rel.startswith(HEAVY[name]):
                bad.add(("R8", rel, name))
    return bad


LAYOUT = "layout.py"


def layout_file_names() -> set[str]:
    """The file names (and patterns) ``layout.py`` spells: its string constants with a suffix. Its bare folder names
    (``models``, ``plots``, ``gradflow``, ...) are ordinary words too (summary keys, record fields), so R9 skips them."""
    tree = ast.parse((PACKAGE / LAYOUT).read_text())
    return {node.value.value for node in tree.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str) and "." in node.value.value}


def typed_file_names() -> set[tuple]:
    names = layout_file_names()
    bad = set()
    for module, path in modules().items():
        rel = relative_path(module)
        if rel == LAYOUT:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in names:
                bad.add(("R9", rel, node.value))
    return bad


PROCESS_GROUPS = {  # where torch.distributed may be imported or used
    "runtime/distributed.py",  # the process-group helpers every package calls
    "diagnostics/gradflow/measure.py",  # the monitor's fused all-reduce of its statistics, on the hot path
}


def process_group_uses() -> set[tuple]:
    bad = set()
    for module, path in modules().items():
        rel = relative_path(module)
        if rel in PROCESS_GROUPS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            imported = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                        [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            used = (isinstance(node, ast.Attribute) and node.attr == "distributed"
                    and isinstance(node.value, ast.Name) and node.value.id == "torch")
            if used or any(name == "torch.distributed" or name.startswith("torch.distributed.") for name in imported):
                bad.add(("R10", rel))
    return bad


def all_violations() -> set[tuple]:
    return (layer_violations() | root_imports() | cycles() | private_imports() | oversized() | gradient_calls()
            | heavy_imports() | typed_file_names() | process_group_uses())


# ------------------------------------------------------------------------------------------------ the tests
def test_registries_are_complete():
    """R6: every concrete attack class is reachable by name, every suite names registered attacks, every
    training method with a name is in METHODS, every finding kind has its advice."""
    import inspect

    import gradguard.attacks as attacks
    from gradguard.attacks.base import Attack
    from gradguard.diagnostics.gradflow import ADVICE, KINDS
    from gradguard.evaluation.suites import ATTACKS, SUITES
    from gradguard.train.methods import METHODS, TrainingMethod

    registered = {entry.target.split(":")[1] for entry in ATTACKS.values()}
    classes = {cls.__name__ for _, cls in inspect.getmembers(attacks, inspect.isclass)
               if issubclass(cls, Attack) and cls is not Attack and not inspect.isabstract(cls)}
    assert classes - registered - NOT_BY_NAME == set()
    for suite, specs in SUITES.items():
        names = {spec if isinstance(spec, str) else spec["name"] for spec in specs}
        assert names <= set(ATTACKS), (suite, names - set(ATTACKS))
    import gradguard.train.methods as methods
    named = {cls.name for _, cls in inspect.getmembers(methods, inspect.isclass)
             if issubclass(cls, TrainingMethod) and cls is not TrainingMethod and "name" in vars(cls)}
    assert named <= set(METHODS)
    assert set(KINDS) <= set(ADVICE)


def test_the_graph_sees_lazy_imports():
    """Function-level imports count: cli.main imports the workflow inside the function."""
    assert any(a == "gradguard.cli.__init__" and b == "gradguard.workflow" for a, b, _ in imports())


def test_the_layout_names_files():
    """R9 sees the run directory's file names (an empty set would make the rule pass vacuously)."""
    assert {"run.json", "attacks.json", "gradflow.jsonl", "model.safetensors"} <= layout_file_names()


def test_no_new_structure_violation():
    new = sorted(all_violations() - KNOWN)
    assert new == [], "new structure violations (see docs/architecture.md, Layout):\n" + "\n".join(map(str, new))


def test_the_known_list_only_shrinks():
    fixed = sorted(KNOWN - all_violations())
    assert fixed == [], "fixed — delete these lines from KNOWN in tests/test_architecture.py:\n" + \
        "\n".join(map(str, fixed))

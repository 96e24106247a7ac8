"""The layout stays what docs/architecture.md says: every module named there, and no import cycle in grpo/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# import name -> folder: kernels/ installs as grpo_kernels (setup.py's package_dir)
PACKAGES = {"grpo": "grpo", "grpo_kernels": "kernels"}
MAX_FILE_LINES = 400


def modules() -> dict[str, Path]:
    """Dotted name -> file for every module of the library (a package is its __init__.py)."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = (package, *path.relative_to(REPO / folder).with_suffix("").parts)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path, name: str, known: set[str], *, top_level_only: bool) -> set[str]:
    """The library modules `path` imports: `from a.b import c` is a.b.c when that is a module, else a.b. Lazy
    imports (inside a function) count unless top_level_only. A module's own parent packages are left out: they
    are always initialised before it, so they cannot close a cycle through it."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # importing a.b.c also runs a and a.b
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dotted = ".".join(parts[:i])
                if dotted in known and dotted != name and not name.startswith(dotted + "."):
                    found.add(dotted)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph(*, top_level_only: bool) -> dict[str, set[str]]:
    mods = modules()
    return {n: imports(p, n, set(mods), top_level_only=top_level_only) for n, p in mods.items()}


def test_no_import_cycle():
    """Neither at import time nor through the imports inside functions."""
    for top_level_only in (True, False):
        cycle = find_cycle(import_graph(top_level_only=top_level_only))
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph(top_level_only=True)
    assert "grpo.config" in graph["grpo.trainer"]  # from grpo.config import ...
    assert "grpo.rollout.generate" in graph["grpo.trainer"]  # from grpo.rollout.generate import ...
    assert "grpo.rollout" in graph["grpo.trainer"]  # its package runs first


def test_architecture_names_every_module():
    text = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:grpo|kernels)/[\w/]+\.py)`", text))
    files = {str(p.relative_to(REPO)) for p in modules().values()}
    assert sorted(files - named) == [], "modules missing from docs/architecture.md's module map"
    assert sorted(named - files) == [], "docs/architecture.md names modules that do not exist"


def test_library_files_stay_short():
    long = {
        str(p.relative_to(REPO)): n
        for p in modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert long == {}, f"split these: a file over {MAX_FILE_LINES} lines holds two concepts"


def test_the_trainer_is_wiring():
    """GRPOTrainer.__init__ reads in one screen: building the parts belongs to the modules that own them."""
    tree = ast.parse((REPO / "grpo" / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GRPOTrainer")
    init = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    lines = init.end_lineno - init.lineno + 1
    assert lines <= 40, f"GRPOTrainer.__init__ is {lines} lines; move what it builds into a builder"


def test_grpo_keeps_few_top_level_modules():
    top = sorted(p.name for p in (REPO / "grpo").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 12, top

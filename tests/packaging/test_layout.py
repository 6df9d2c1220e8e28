"""The source tree's layout rules, read from the files themselves (no imports of the project).

- Every module docstring's `Tests:` pointer names test files that exist (style.md: a newcomer
  follows the pointer to the module's tests).
- No import cycle among the project's modules, counting every import statement wherever it is
  (function bodies, `if TYPE_CHECKING:` blocks): a cycle hidden behind a late import is still two
  modules that cannot be understood, or moved, one without the other.

Oracle: Python's own parser (`ast`) and the file system; cycles are strongly connected components
(Tarjan) of the module graph, computed here without the project's code.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("epserve", "model_shards", "cluster", "replicas", "loadtest", "benchmarks")

_TOKEN = re.compile(r"[\w/{},.-]+\.py")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file; a package's __init__.py is the package itself."""
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _expand_braces(token: str) -> list[str]:
    """`test_{a,b}.py` -> [test_a.py, test_b.py] (shell brace expansion, one level per group)."""
    pieces = re.split(r"\{([^{}]*)\}", token)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(pieces)]
    return ["".join(c) for c in itertools.product(*choices)]


def _pointers(doc: str) -> list[str]:
    """The test files a docstring's `Tests:` part names, as paths from the project root.

    Full paths (`tests/x/test_y.py`), brace groups (`tests/x/test_{a,b}.py`), and bare names
    (`test_z.py`) that continue the folder of the full path before them."""
    tail = doc[doc.index("Tests:") + len("Tests:") :]
    found: list[str] = []
    folder = ""
    for token in _TOKEN.findall(tail):
        for path in _expand_braces(token.rstrip(".")):
            if path.startswith("tests/"):
                folder = path.rpartition("/")[0]
                found.append(path)
            elif "/" not in path and path.startswith("test_") and folder:
                found.append(f"{folder}/{path}")
    return found


def test_pointer_parsing_known_answers() -> None:
    doc = "Mod.\nTests: tests/a/test_{b,c}.py (note model_shards/x.py)\nand test_d.py; tests/e/test_f.py."
    assert _pointers(doc) == ["tests/a/test_b.py", "tests/a/test_c.py", "tests/a/test_d.py", "tests/e/test_f.py"]


def test_every_tests_pointer_names_an_existing_file() -> None:
    missing: list[str] = []
    empty: list[str] = []
    for name, f in _modules().items():
        doc = ast.get_docstring(ast.parse(f.read_text(), str(f)))
        if doc is None or "Tests:" not in doc:
            continue
        pointers = _pointers(doc)
        if not pointers:
            empty.append(name)
        missing += [f"{name}: {p}" for p in pointers if not (ROOT / p).is_file()]
    assert empty == [], f"a `Tests:` line that names no tests/...py file: {empty}"
    assert missing == [], "docstring `Tests:` pointers to files that do not exist:\n" + "\n".join(missing)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in the file.

    Importing `a.b.c` runs `a` and `a.b` first, so the packages on the way count as imported too;
    `from a.b import c` imports the submodule `a.b.c` when there is one, else names of `a.b`."""
    mods = _modules()

    def known(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in mods]

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    mod = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                graph[name].update(m for m in known(t) if m != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def test_cycle_finder_known_answers() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"f"}, "g": set()}
    assert _cycles(graph) == [["a", "b", "c"], ["d", "e"]]


def test_no_import_cycle_among_project_modules() -> None:
    graph = _import_graph()
    cycles = _cycles(graph)
    detail = [f"{c}: " + "; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in cycles]
    assert cycles == [], "import cycles (function-level and TYPE_CHECKING imports count):\n" + "\n".join(detail)

"""The package's shape: no import circles between its modules (imports inside functions counted), and modules
that stay small.

The import graph is read from the source with ``ast``: every ``import stitching.x`` / ``from stitching.x import
y`` anywhere in a module (top level or inside a function) is an arrow to the module it names (``from
stitching.x import y`` where ``y`` is a submodule: to ``stitching.x.y`` only, since that needs nothing of the
package's ``__init__`` that every import of it does not already run). A circle is a strongly connected
component of more than one module.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "stitching"
#: modules still over :data:`MAX_LINES`, each with the size it may not grow past (to be split; see
#: docs/architecture.md); a module leaves this table when it is split
OVERSIZED: dict[str, int] = {}
MAX_LINES = 500


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its body)."""
    files = {_module_name(p, package.parent): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]   # a submodule: the arrow goes to it
                names = [s for s in subs if s in files] or [node.module]
            else:
                continue
            targets |= {n for n in names if n in files and n != name}
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_counts_imports_inside_functions(tmp_path):
    pkg = tmp_path / "stitching"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from stitching.sub import b\n")
    (pkg / "sub" / "b.py").write_text("import stitching.a\n")
    graph = import_graph(pkg)
    assert graph["stitching.a"] == {"stitching.sub.b"}
    assert circles(graph) == [["stitching.a", "stitching.sub.b"]]


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_no_module_grows_past_its_size():
    sizes = {_module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    over = {m: n for m, n in sizes.items() if n > OVERSIZED.get(m, MAX_LINES)}
    assert over == {}, f"modules over {MAX_LINES} lines (or past their OVERSIZED size): {over}"
    assert {m for m in OVERSIZED if sizes.get(m, 0) <= MAX_LINES} == set(), "split: drop it from OVERSIZED"


def _table_names(text: str) -> list[str]:
    """The backquoted names in the first column of a markdown table's rows."""
    import re

    return [n for line in text.splitlines() if line.startswith("| `")
            for n in re.findall(r"`([^`]+)`", line.split("|")[1])]


def test_the_architecture_doc_names_every_module_and_nothing_that_is_gone():
    """docs/architecture.md's "What each module owns" table lists each module of the package once."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## What each module owns", 1)[1].split("\n## ", 1)[0]
    listed = _table_names(section)
    modules = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py"))
    assert sorted(listed) == modules, (f"missing: {sorted(set(modules) - set(listed))}, "
                                       f"gone: {sorted(set(listed) - set(modules))}")
    assert len(listed) == len(set(listed))


def test_the_readme_layout_names_every_top_level_module_and_package():
    """README.md's Layout table names each top-level module and subpackage of ``stitching/``, and
    ``stitching/__init__.py``'s path of data names every subpackage."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = {n.rstrip("/") for n in _table_names(section)}
    top = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert top | packages <= listed, f"not in the README's layout: {sorted((top | packages) - listed)}"
    assert listed <= top | packages, f"gone from the package: {sorted(listed - top - packages)}"
    import stitching

    path_of_data = stitching.__doc__.split("The path of data", 1)[1]
    assert all(f"``{name}``" in path_of_data for name in packages), sorted(
        n for n in packages if f"``{n}``" not in path_of_data)

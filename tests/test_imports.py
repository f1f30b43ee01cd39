"""No module of the library reaches itself through its imports (imports inside functions included)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "birdrounds"


def import_graph() -> dict[str, set[str]]:
    """Module -> the birdrounds modules it imports anywhere in its file."""
    modules = {".".join(("birdrounds", *f.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): f
               for f in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path of imports from `start` back to itself, if there is one."""
    paths, seen = [[start]], set()
    while paths:
        path = paths.pop()
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append([*path, nxt])
    return None


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert len(graph) > 20 and "birdrounds.rules" in graph
    cycles = [" -> ".join(c) for name in sorted(graph) if (c := cycle_through(graph, name))]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_rules_module_imports_neither_config_nor_torch():
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(ast.parse((SRC / "rules.py").read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in getattr(n, "names", [])}
    assert not {m for m in imported if m and (m.startswith("birdrounds") or m.split(".")[0] == "torch")}

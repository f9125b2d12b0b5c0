"""The package's import graph has no cycle, counting every import: module level, inside functions
and under ``TYPE_CHECKING`` (a cycle there is still coupling both ways). And no module grows into
a catch-all: each stays under ``MAX_LINES`` unless it is named below with the reason."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "launcher" / "codefleet"
MAX_LINES = 400
#: Modules allowed to be longer, and why.
LONGER = {
    "http.py": "one HTTP/1.1 connection state machine (llhttp callbacks, timers, pipelining, limits); "
               "its parts share the connection's state",
    "upstream.py": "one forwarded exchange's state machine (the router's callbacks, the client's, the endings and "
                   "the continuation of a stream whose replica failed); they share the exchange's state",
    "core.py": "the reconcile loop: one Fleet's lifecycle, pass, drain and stop share its lock and replica list",
    "manifest.py": "the manifest's schema, one pydantic model per section, each field documented beside it",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from codefleet.gateway import answers`
    return {m for m in out if m == "codefleet" or m.startswith("codefleet.")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    g: dict[str, set[str]] = {}
    for name, path in modules.items():
        # an import of a package's module runs the package's __init__ too, but that is not a
        # dependency of the importer on the package's other modules: count the named modules only
        g[name] = {m for m in imports(path) if m in modules and m != name}
        g[name] -= {m for m in g[name] if name.startswith(m + ".")}  # a module importing its own package
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle() -> None:
    g = graph()
    assert len(g) > 40 and "codefleet.gateway.server" in g
    assert "codefleet.gateway.http" in g["codefleet.gateway.upstream"]  # imports are seen
    assert cycles(g) == []


def test_no_module_is_a_catch_all() -> None:
    long = {p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    unexplained = {name: n for name, n in long.items() if name not in LONGER}
    assert not unexplained, f"modules over {MAX_LINES} lines: {unexplained} (split them, or say why in LONGER)"
    assert set(LONGER) <= set(long), f"no longer over {MAX_LINES} lines, drop from LONGER: {set(LONGER) - set(long)}"

"""The package layout stays a layered graph: no import cycles between library modules (counting
imports inside functions too), and no library module imports a CLI script (train.py, eval.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vsml", "kernels", "tasks")
CLI_SCRIPTS = {"train", "eval"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _library_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Library modules imported anywhere in ``path`` (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()

    def add(mod: str) -> None:
        # "vsml.engine.network" or the closest known parent ("vsml.engine" for a package attribute)
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            out.add(mod)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in CLI_SCRIPTS:
                    out.add(a.name)
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] in CLI_SCRIPTS:
                out.add(mod)
            for a in node.names:                       # "from pkg import submodule"
                if f"{mod}.{a.name}" in known:
                    add(f"{mod}.{a.name}")
                else:
                    add(mod)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _library_modules()
    known = set(mods)
    return {n: _imports(n, p, known) for n, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan).  A package's
    ``__init__`` importing its own submodules is not a cycle unless a submodule imports the
    package back, which is what the check is for."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles between library modules: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_library_never_imports_a_cli_script():
    bad = {n: sorted(d & CLI_SCRIPTS | {m for m in d if m.split(".")[0] in CLI_SCRIPTS})
           for n, d in _graph().items()}
    bad = {n: d for n, d in bad.items() if d}
    assert not bad, f"library modules import CLI scripts: {bad}"


def test_the_checker_sees_a_cycle_and_a_cli_import(tmp_path, monkeypatch):
    """The checker itself: a two-module cycle through a function-level import, and a library → CLI import."""
    pkg = tmp_path / "vsml"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from vsml.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n    import eval\n")
    import sys
    mod = sys.modules[__name__]
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    monkeypatch.setattr(mod, "PACKAGES", ("vsml",))
    g = _graph()
    assert _cycles(g) == [["vsml.a", "vsml.b"]]
    assert "eval" in g["vsml.b"]

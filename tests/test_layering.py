"""The layers of docs/architecture.md, checked on the source: every module's imports are read with ast
(at module level and inside functions) and must respect

  (a) no import cycle between modules of greend/, collectors/, policies/, tui/ (module-level,
      run-time imports only: an import inside a function or under TYPE_CHECKING runs later or never),
      and within the core none either when imports inside functions count too (a circle dodged
      with a function-level import is still a circle);
  (b) collectors/ import nothing from the core (greend.*), policies/ or tui/;
  (c) the core imports neither policies/ nor tui/; the composition root (greend/cli.py and
      greend/*_cli.py), which wires every layer together, is exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Directory -> the package it is installed as (pyproject.toml maps the three beside greend/).
PACKAGES = {"greend": "greend", "collectors": "greend.collectors", "policies": "greend.policies",
            "tui": "greend.tui"}

def _modules() -> dict[str, Path]:
    mods = {}
    for d, pkg in PACKAGES.items():
        for f in sorted((ROOT / d).rglob("*.py")):
            rel = f.relative_to(ROOT / d).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


MODULES = _modules()


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _resolve(mod: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The project modules an import statement in module `mod` reads (outside modules dropped)."""
    out = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = mod.split(".") if _is_package(mod) else mod.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from pkg import name` reads pkg.name when that is a module, else pkg itself.
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix
                 for a in node.names]
    for n in names:
        while n and n not in MODULES:
            n = n.rpartition(".")[0]
        if n:
            out.append(n)
    return out


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(mod: str, run_time: bool = False) -> tuple[set[str], set[str]]:
    """(module-level run-time imports, every import) of one module; with run_time, every import
    that can run (TYPE_CHECKING blocks left out) as the second set."""
    tree = ast.parse(MODULES[mod].read_text(), str(MODULES[mod]))
    top: set[str] = set()
    every: set[str] = set()

    def visit(node: ast.AST, at_top: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found = set(_resolve(mod, child)) - {mod}
                if not (run_time and typing_only):
                    every.update(found)
                if at_top:
                    top.update(found)
            elif isinstance(child, ast.If) and _type_checking(child.test):
                visit(child, False, True)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, False, typing_only)
            else:
                visit(child, at_top, typing_only)

    visit(tree, True, False)
    return top, every


def layer(mod: str) -> str:
    for sub in ("collectors", "policies", "tui"):
        if mod == f"greend.{sub}" or mod.startswith(f"greend.{sub}."):
            return sub
    return "core"


def composition_root(mod: str) -> bool:
    return mod == "greend.cli" or (mod.endswith("_cli") and layer(mod) == "core")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
            strong(v)
    return out


def violations() -> set[tuple[str, str, str]]:
    found: set[tuple[str, str, str]] = set()
    top = {}
    for mod in MODULES:
        t, every = imports(mod)
        top[mod] = t
        for dep in every:
            if layer(mod) == "collectors" and layer(dep) != "collectors":
                found.add(("collectors-import", mod, dep))
            if layer(mod) == "core" and not composition_root(mod) and layer(dep) in ("policies", "tui"):
                found.add(("core-import", mod, dep))
    for comp in _cycles(top):
        found.add(("cycle", " -> ".join(comp), ""))
    core = {m for m in MODULES if layer(m) == "core"}
    deferred = {m: imports(m, run_time=True)[1] & core for m in core}
    for comp in _cycles(deferred):
        found.add(("cycle-with-function-imports", " -> ".join(comp), ""))
    return found


def test_the_checker_sees_imports():
    # The checker must resolve what the modules really import, or every rule passes vacuously.
    t, every = imports("greend.monitor")
    assert "greend.collectors.base" in t and "greend.ledger" in t and "greend.site_factors" in t
    t, every = imports("greend.cli")
    assert any(layer(m) == "policies" for m in every)  # lazily, inside functions
    assert layer("greend.collectors.rapl") == "collectors" and layer("greend.monitor") == "core"
    assert composition_root("greend.daemon_cli") and not composition_root("greend.daemon")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    # monitor -> slurmjobs at run time; slurmjobs -> monitor only for type checking.
    assert "greend.monitor" in imports("greend.slurmjobs")[1]
    assert "greend.monitor" not in imports("greend.slurmjobs", run_time=True)[1]
    assert len(MODULES) > 50


def test_layers_hold():
    found = sorted(violations())
    assert not found, "layering violations (docs/architecture.md):\n" + "\n".join(map(str, found))


def test_site_mode_has_no_module_named_site_in_the_core():
    # agent.py, wire.py, controller.py; policies/site.py is the (unrelated) cluster catalogue.
    assert "greend.site" not in MODULES and "greend.policies.site" in MODULES

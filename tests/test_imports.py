"""The import rules of docs/architecture.md, read from the source (ast), so that a new import that
breaks them fails here rather than in a reviewer's head:

- imports inside greend/, at module level or inside functions, form no cycle (no import circle
  dodged with an import inside a function);
- the core (greend/*) imports neither policies nor tui, except the CLI entry modules (greend/cli.py
  and the *_cli.py command modules), which compose the program;
- collectors import nothing from the core.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "greend"
CLI_MODULES = {"cli", "daemon_cli"}
# Imports that break the rules today and are being moved (each named with where it goes): the
# read model of /api/v1/clusters and /summary, the budget metrics, the policy part of the config,
# nvml's energy type. Shrink this list; never grow it.
KNOWN = {
    ("api", "greend.policies.state"), ("api", "greend.policies.budgets"),
    ("exporter", "greend.policies.budgets"), ("config", "greend.policies.config"),
    ("collectors/nvml", "greend.attribution"),
}


def imports(path: Path, package: str, top_level_only: bool) -> set[str]:
    """Absolute names of the greend modules `path` imports."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("greend"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
                names = [mod] if node.module else [f"{base}.{a.name}" for a in node.names]
            else:
                mod = node.module or ""
                names = [mod] if mod.startswith("greend") else []
            # `from . import x` and `from .policies import cli` import submodules.
            if node.module is None or not node.level:
                names += [f"{mod}.{a.name}" for a in node.names]
            out.update(n for n in names if n.startswith("greend"))
    return out


def core_modules() -> dict[str, Path]:
    return {p.stem: p for p in CORE.glob("*.py") if p.stem != "__init__"}


def known(module: str, dep: str) -> bool:
    return any(m == module and (dep == k or dep.startswith(k + ".")) for m, k in KNOWN)


def test_core_imports_form_no_cycle():
    mods = core_modules()
    graph = {}
    for name, path in mods.items():
        deps = imports(path, "greend", top_level_only=False)
        graph[name] = {d.split(".")[1] for d in deps if d.count(".") >= 1 and d.split(".")[1] in mods}
        graph[name].discard(name)
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n):], n]))
        if n in seen:
            return
        stack.append(n)
        for d in sorted(graph[n]):
            visit(d)
        stack.pop()
        seen.add(n)

    for n in sorted(graph):
        visit(n)


def test_the_core_imports_neither_policies_nor_tui():
    bad = []
    for name, path in core_modules().items():
        if name in CLI_MODULES:
            continue
        for dep in imports(path, "greend", top_level_only=False):
            if dep.startswith(("greend.policies", "greend.tui")) and not known(name, dep):
                bad.append(f"greend/{name}.py imports {dep}")
    assert not bad, bad


def test_collectors_import_nothing_from_the_core():
    bad = []
    for path in (ROOT / "collectors").glob("*.py"):
        for dep in imports(path, "greend.collectors", top_level_only=False):
            if not dep.startswith("greend.collectors") and not known(f"collectors/{path.stem}", dep):
                bad.append(f"collectors/{path.name} imports {dep}")
    assert not bad, bad


def test_no_module_named_site_in_the_core():
    assert not (CORE / "site.py").exists()  # site mode: agent.py, wire.py, controller.py

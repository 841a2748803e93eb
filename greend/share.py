"""Where greend's admin files are: systemd units, example configurations, Prometheus rules, Grafana
dashboards and provisioning (docs/admin.md). They ship in the wheel under greend/files/; in a
checkout they are the repository's packaging/, examples/ and dashboards/."""

from __future__ import annotations

import shutil
from pathlib import Path

# Each kind of file: (directory under the share root, what it holds).
KINDS: dict[str, tuple[str, str]] = {
    "systemd": ("packaging", "systemd units: greend.service, greend-controller.service"),
    "examples": ("examples", "example configurations (node, controller, site) and job scripts"),
    "dashboards": ("dashboards", "Grafana dashboards (*.json), built from dashboards/*.py"),
    "prometheus": ("dashboards/prometheus", "Prometheus scrape config, rules/ and their tests/"),
    "grafana": ("dashboards/grafana/provisioning", "Grafana provisioning (datasource, dashboards)"),
}


class ShareError(RuntimeError):
    pass


def root() -> Path:
    """The directory holding packaging/, examples/ and dashboards/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "files", here.parent):
        if (candidate / "packaging" / "greend.service").is_file():
            return candidate
    raise ShareError(f"greend's shared files are missing (looked in {here / 'files'} and "
                     f"{here.parent}): reinstall greend")


def path(kind: str | None = None) -> Path:
    if kind is None:
        return root()
    if kind not in KINDS:
        raise ShareError(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
    return root() / KINDS[kind][0]


def _ignore(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n in ("__pycache__", "__init__.py") or n.endswith((".pyc", ".py"))}


def copy(dest: Path) -> list[Path]:
    """Copy packaging/, examples/ and dashboards/ (data only, no build code) under dest; refuses to
    overwrite an existing file (an admin's edited copy)."""
    src = root()
    pairs = []
    for top in ("packaging", "examples", "dashboards"):
        for f in sorted((src / top).rglob("*")):
            rel = f.relative_to(src)
            if f.is_file() and not _ignore("", [f.name]) and "__pycache__" not in rel.parts:
                pairs.append((f, dest / rel))
    clash = [str(d) for _, d in pairs if d.exists()]
    if clash:
        raise ShareError(f"not overwriting {len(clash)} existing file(s) in {dest}, e.g. {clash[0]}")
    for s, d in pairs:
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s, d)
    return [d for _, d in pairs]

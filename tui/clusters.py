"""The clusters screen: tiers and clusters, open or closed, load and queue, and the factors in force."""

from __future__ import annotations

from typing import ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Static

from .data import ClusterInfo
from .formatting import clock, percent
from .keybar import KeyBar, TitleBar
from .screen import SourceScreen
from .words import plural

TIER_ORDER = {"local": 0, "site": 1, "national": 2}


def _num(v, fmt: str) -> str:
    return "—" if v is None else fmt.format(v)


# (header, right-aligned); every cell starts with a space (cell_padding is 0) so 11 columns fit in 80
COLUMNS = [("Cluster", False), ("Tier", False), ("Status", False), ("HDS", False), ("Load", True),
           ("Queue", True), ("Jobs", True), ("PUE", True), ("WUE", True), ("EWIF", True),
           ("gCO2e/kWh", True)]


def cells(c: ClusterInfo) -> list[Text]:
    f = c.factors or {}
    values = [
        c.name,
        c.tier or "—",
        "open" if c.open else "closed",
        "yes" if c.hds else "no",
        percent(c.load),
        _num(c.queue, "{}"),
        _num(c.running, "{}"),
        _num(f.get("pue"), "{:g}"),
        _num(f.get("wue_site_l_per_kwh"), "{:g}"),
        _num(f.get("ewif_l_per_kwh"), "{:.3g}"),
        _num(f.get("carbon_intensity_g_per_kwh"), "{:.4g}"),
    ]
    out = [Text(" " + v, justify="right" if right else "left")
           for v, (_, right) in zip(values, COLUMNS, strict=True)]
    if not c.open:
        out[2].stylize("bold")
    return out


def sources(c: ClusterInfo) -> Group:
    f = c.factors or {}
    src = f.get("sources") or {}
    t = Table.grid(padding=(0, 1), expand=True)
    t.add_column(width=22)
    t.add_column(width=11)
    t.add_column(ratio=1, overflow="fold", style="dim")
    for key, label, fmt in (("pue", "PUE", "{:g}"), ("wue_site_l_per_kwh", "WUE on-site", "{:g} L/kWh"),
                            ("ewif_l_per_kwh", "EWIF off-site", "{:.3g} L/kWh"),
                            ("carbon_intensity_g_per_kwh", "Carbon intensity now", "{:.4g} g/kWh")):
        if key in f:
            t.add_row(f"  {label}", fmt.format(f[key]), src.get(key, "source not recorded"))
    head = Text.assemble((f"{c.name}", "bold"), f" ({c.tier or 'tier unknown'}): where the factors come from")
    parts = [head, t] if f else [head, Text("  No factors known for this cluster.", style="dim")]
    if c.note:
        parts.append(Text(f"  {c.note}", style="italic"))
    return Group(*parts)


class ClustersScreen(SourceScreen):
    """Every cluster jobs can go to, by tier, with the factors greend applies there now."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "refresh", "Refresh"),
        Binding("1", "app.switch_mode('jobs')", "Jobs"),
        Binding("3", "app.switch_mode('admin')", "Accounts"),
    ]
    HELP: ClassVar[list[tuple[str, str]]] = [
        ("↑ ↓", "choose a cluster: its factors' sources show below the table"),
        ("r", "refresh now (also retries after a connection problem)"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.info: list[ClusterInfo] = []
        self.error: str | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar()
        yield Static("HDS: health-data certified · Jobs: running now · WUE, EWIF in L/kWh",
                     id="filters")
        yield DataTable(id="clusters", cursor_type="row", zebra_stripes=True, cell_padding=0)
        yield Static(id="sources")
        yield Static(id="status")
        yield KeyBar()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for label, right in COLUMNS:
            table.add_column(Text(" " + label, justify="right" if right else "left"), key=label)
        self.reload()
        self.refresh_every(at_least_s=30.0)

    def reload(self) -> None:
        self.run_worker(self._load, thread=True, exclusive=True, group="clusters")

    def _load(self) -> None:
        self.load_in_worker(lambda src, now: src.clusters(now), self._show)

    def _show(self, info: list[ClusterInfo]) -> None:
        self.error = None
        self.info = sorted(info, key=lambda c: (TIER_ORDER.get(c.tier, 9), c.name))
        self.app.cluster_names = [c.name for c in self.info]  # type: ignore[attr-defined]
        table = self.query_one(DataTable)
        at = table.cursor_row
        table.clear()
        for c in self.info:
            table.add_row(*cells(c), key=c.name)
        if self.info:
            table.move_cursor(row=min(at, len(self.info) - 1), animate=False)
            self._show_sources(table.cursor_row)
        status = self.query_one("#status", Static)
        status.remove_class("error")
        n_open = sum(c.open for c in self.info)
        status.update(f"{plural(len(self.info), 'cluster')}, {n_open} open · updated "
                      f"{clock(self.app.now())}")  # type: ignore[attr-defined]

    def _show_sources(self, i: int) -> None:
        if 0 <= i < len(self.info):
            self.query_one("#sources", Static).update(sources(self.info[i]))

    @on(DataTable.RowHighlighted, "#clusters")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_sources(event.cursor_row)

    def action_refresh(self) -> None:
        self.reload()

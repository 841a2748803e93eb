"""The admins' screen: top accounts or users by footprint over a period, budgets, unattributed share."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.reactive import reactive
from textual.widgets import DataTable, Static

from greend import units

from .data import Summary
from .formatting import DEFAULT_PERIOD, PERIODS, clock, percent, since
from .keybar import KeyBar, TitleBar
from .screen import SourceScreen
from .words import plural

COLUMNS = ["#", "Key", "Jobs", "Energy", "Carbon", "Water", "Share", "Budget"]


class AdminScreen(SourceScreen):
    """Who uses what: accounts or users ranked by carbon, and how much energy nobody was charged."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("b", "by", "Accounts/users"),
        Binding("t", "period", "Period"),
        Binding("r", "refresh", "Refresh"),
        Binding("1", "app.switch_mode('jobs')", "Jobs"),
        Binding("2", "app.switch_mode('clusters')", "Clusters"),
    ]
    HELP: ClassVar[list[tuple[str, str]]] = [
        ("b", "rank accounts or users"),
        ("t", "period: last 24 h, 7, 30, 365 days, all time"),
        ("r", "refresh now (also retries after a connection problem)"),
    ]

    by: reactive[str] = reactive("account", init=False)
    period: reactive[int] = reactive(DEFAULT_PERIOD, init=False)

    def __init__(self) -> None:
        super().__init__()
        self.summary: Summary | None = None
        self.error: str | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar()
        yield Static(id="filters")
        yield DataTable(id="top", cursor_type="row", zebra_stripes=True)
        yield Static(id="unattributed")
        yield Static(id="status")
        yield KeyBar()

    def on_mount(self) -> None:
        self._columns()
        self.reload()
        self.refresh_every(at_least_s=30.0)

    def _columns(self) -> None:
        table = self.query_one(DataTable)
        table.clear(columns=True)
        for i, label in enumerate(COLUMNS):
            if label == "Key":
                label = "Account" if self.by == "account" else "User"
            table.add_column(Text(label, justify="right") if i >= 2 or i == 0 else label, key=str(i))

    def watch_by(self) -> None:
        self._columns()
        self.reload()

    def watch_period(self) -> None:
        self.reload()

    def reload(self) -> None:
        who = "Accounts" if self.by == "account" else "Users"
        self.query_one("#filters", Static).update(
            f"{who} by carbon · {PERIODS[self.period][0]} · jobs overlapping the period")
        self.run_worker(self._load, thread=True, exclusive=True, group="admin")

    def _load(self) -> None:
        self.load_in_worker(lambda src, now: src.summary(since(self.period, now), None, self.by),
                            self._show)

    def _show(self, s: Summary) -> None:
        self.error = None
        self.summary = s
        table = self.query_one(DataTable)
        table.clear()
        total_c = sum(r.carbon_g for r in s.rows) or 0.0
        for i, r in enumerate(s.rows, 1):
            budget = (Text(f"{r.budget_used:.0%} of {r.budget_label}", justify="right",
                           style="red" if r.budget_used >= 1 else "")
                      if r.budget_used is not None else Text("—", justify="right"))
            table.add_row(
                Text(str(i), justify="right"), r.key, Text(f"{r.jobs:,}", justify="right"),
                Text(units.energy(r.it_energy_j), justify="right"),
                Text(units.carbon(r.carbon_g), justify="right"),
                Text(units.water(r.water_l), justify="right"),
                Text(percent(r.carbon_g / total_c) if total_c else "—", justify="right"),
                budget,
            )
        share = s.unattributed_share
        if share is None:
            un = Text("Unattributed energy: not known (no node totals from this source).", style="dim")
        else:
            un = Text.assemble(
                ("Unattributed ", "bold"),
                f"{percent(share)} of the nodes' energy ({units.energy(s.unattributed_j or 0)} of "
                f"{units.energy(s.node_energy_j or 0)}) was charged to no job: idle nodes, system "
                "services, processes outside jobs.",
            )
            if s.note:
                un.append(f" ({s.note})", style="dim")
        self.query_one("#unattributed", Static).update(un)
        status = self.query_one("#status", Static)
        status.remove_class("error")
        jobs = sum(r.jobs for r in s.rows)
        status.update(f"{plural(len(s.rows), s.by)}, {plural(jobs, 'job')} · updated "
                      f"{clock(self.app.now())}")  # type: ignore[attr-defined]

    def action_by(self) -> None:
        self.by = "user" if self.by == "account" else "account"

    def action_period(self) -> None:
        self.period = (self.period + 1) % len(PERIODS)

    def action_refresh(self) -> None:
        self.reload()

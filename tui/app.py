"""The `greend tui` application: jobs, one job, clusters and the admins' summary over one data source."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Static

from .data import DataSource, SourceError
from .jobs import JobsScreen
from .keybar import KeyBar

log = logging.getLogger(__name__)

NAMES_AFTER_S = 0.5
STARTED_AFTER_S = 2.0

SCREENS_HELP = [
    ("1", "My jobs: your jobs and their footprints"),
    ("2", "Clusters: tiers, clusters, factors in force"),
    ("3", "Accounts: top accounts and users, unattributed energy"),
    ("?", "this help"),
    ("q", "quit"),
]

COLUMNS_HELP = [
    ("Energy", "IT energy: CPU + GPU + memory, before the data centre's overhead (PUE)"),
    ("Carbon / CO2e", "grams of CO2-equivalent: IT energy × PUE × grid carbon intensity"),
    ("Water", "litres consumed: cooling on site + water used to generate the electricity"),
    ("Figures / How", "measured (RAPL, NVML counters), modelled (TDP, memory model) or a mix"),
]


class HelpScreen(ModalScreen[None]):
    """Keys of the screen underneath, the screens, and what the figures mean."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        from rich.table import Table

        def table(title: str, rows: list[tuple[str, str]]) -> Table:
            t = Table.grid(padding=(0, 2))
            t.add_column(style="bold", min_width=14)
            t.add_column(overflow="fold")
            for k, v in rows:
                t.add_row(k, v)
            t.title = title
            t.title_justify = "left"
            t.title_style = "bold underline"
            return t

        with VerticalScroll(id="help"):
            yield Static(table("Keys here", self.keys))
            yield Static(table("Screens", SCREENS_HELP))
            yield Static(table("Columns", COLUMNS_HELP))
            yield Static(Text("Esc or ? closes this help. Guide: docs/tui.md", style="dim"))
        yield KeyBar()


# The screens not shown first are imported when first opened: `greend tui` paints sooner.
def _clusters_screen() -> Screen:
    from .clusters import ClustersScreen

    return ClustersScreen()


def _admin_screen() -> Screen:
    from .admin import AdminScreen

    return AdminScreen()


class GreendApp(App[None]):
    """greend's terminal UI over one data source (ledger file, daemon socket or controller URL)."""

    CSS_PATH = "greend.tcss"
    TITLE = "greend"
    ENABLE_COMMAND_PALETTE = False
    MODES: ClassVar[dict] = {"jobs": JobsScreen, "clusters": _clusters_screen, "admin": _admin_screen}
    DEFAULT_MODE = "jobs"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("1", "switch_mode('jobs')", "Jobs", show=False),
        Binding("2", "switch_mode('clusters')", "Clusters", show=False),
        Binding("3", "switch_mode('admin')", "Accounts", show=False),
    ]
    MODE_TITLES: ClassVar[dict[str, str]] = {
        "jobs": "My jobs", "clusters": "Clusters", "admin": "Accounts and users",
    }

    def __init__(self, source: DataSource, *, user: str | None, me: str | None = None,
                 clock: Callable[[], float] = time.time, refresh_s: float = 5.0,
                 page_size: int = 100, on_started: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.source = source
        self.user = user
        """Whose jobs "My jobs" shows; None: everyone's."""
        self.me = me or user or ""
        self.clock = clock
        self.refresh_s = refresh_s
        self.page_size = page_size
        self.cluster_names: list[str] = []
        self._names_asked = False
        self._on_started = on_started
        """Called once the first page is painted (or STARTED_AFTER_S after the start at the latest):
        `greend tui` resumes the garbage collector and stores the parsed stylesheets then."""

    def now(self) -> float:
        return self.clock()

    def on_mount(self) -> None:
        self._subtitle()
        if self._on_started is not None:
            self.set_timer(STARTED_AFTER_S, self.started)

    @property
    def starting(self) -> bool:
        """Whether the start-up is still on (its end not yet announced to on_started)."""
        return self._on_started is not None

    def started(self) -> None:
        """The start-up is over: the jobs screen's first page is painted (tui/jobs.py)."""
        callback, self._on_started = self._on_started, None
        if callback is not None:
            callback()

    def load_cluster_names(self) -> None:
        """Learn every cluster's name for the jobs screen's cluster filter (once, a moment after the
        first page: it may load the configuration, which would hold the first paint back)."""
        if not self._names_asked:
            self._names_asked = True
            self.set_timer(NAMES_AFTER_S, lambda: self.run_worker(self._load_cluster_names, thread=True,
                                                                  group="names"))

    def _load_cluster_names(self) -> None:
        try:
            names = [c.name for c in self.source.clusters(self.now())]
        except Exception:  # the clusters screen reports it
            return
        self.call_from_thread(setattr, self, "cluster_names", names)

    def _subtitle(self) -> None:
        title = self.MODE_TITLES.get(self.current_mode, "")
        if self.current_mode == "jobs" and self.user != self.me:  # --all-users or --user NAME
            title = "Jobs"
        self.sub_title = f"{title} · {self.source.label}"

    def action_switch_mode(self, mode: str) -> None:  # type: ignore[override]
        if mode == self.current_mode and len(self.screen_stack) > 1:
            while len(self.screen_stack) > 1:
                self.pop_screen()
        self.switch_mode(mode)
        self._subtitle()

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        keys = list(getattr(self.screen, "HELP", []))
        self.push_screen(HelpScreen(keys))

    @staticmethod
    def describe_error(e: BaseException) -> str:
        if isinstance(e, SourceError):
            return str(e)
        log.debug("unexpected error reading the data source", exc_info=e)
        return f"unexpected answer from the data source: {type(e).__name__}: {e}"

    def on_unmount(self) -> None:
        try:
            self.source.close()
        except Exception:  # closing must not fail the exit
            pass

"""The "My jobs" screen: a page of jobs with their footprints; sort, filter, search, time range."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.widgets import DataTable, Input, Static

from greend import units
from greend.ledger import JobRow

from . import outcome
from .data import RUNNING, SORT_KEYS, JobPage, JobQuery, how_obtained, water_l
from .formatting import DEFAULT_PERIOD, PERIODS, SORT_LABELS, carbon_short, clock, since, stamp
from .keybar import KeyBar, TitleBar
from .outcome import elapsed_shown
from .plot import POWER_W, PowerHistory
from .screen import SourceScreen
from .words import plural

log = logging.getLogger(__name__)

WIDE = 120  # columns from which the table shows full units and more columns
# ... and a sparkline of each running job's power (everyone's jobs have two more columns)
WIDE_POWER, WIDE_POWER_ALL = 150, 175
TOTALS_S, TOTALS_CHANGED_S = 30.0, 5.0  # how often the totals line is read again
STARTED_S = 0.1  # after the first page was handed to the screen, the start-up is over (app.started)


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    label: str
    value: Callable[[JobRow, float], str]
    right: bool = False
    width: int | None = None  # None: fit the content
    sort: str | None = None  # the sort key this column shows (its header gets the arrow)


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _cut_left(s: str, n: int) -> str:
    """Job ids of `greend measure` runs end with what tells them apart (time, pid)."""
    return s if len(s) <= n else "…" + s[-(n - 1):]


HOW_SHORT = {"measured": "meas", "modelled": "model", "mixed": "mix"}

# Sort keys: one key per column, as in htop/k9s (the same key again reverses the order).
SORT_BINDINGS = {"R": "recent", "E": "energy", "C": "carbon", "W": "water", "D": "elapsed",
                 "J": "job", "N": "name"}


def _state_cell(width: int) -> Callable[[JobRow, float], str]:
    def cell(r: JobRow, now: float) -> str:
        text = outcome.shown(r, now).short
        if len(text) > width and outcome.is_stale(r, now):
            return "stale"
        return text

    return cell


def _last_seen(r: JobRow, now: float) -> str:
    if r.state == RUNNING and not outcome.is_stale(r, now):
        return "now"
    return stamp(r.end_time or r.last_seen)[5:]


def columns(wide: bool, all_users: bool, power: Callable[[JobRow, float], str] | None = None) -> list[Column]:
    """The table's columns: all of them with full units when wide, squeezed into 80 columns if not."""
    energy = Column("energy", "Energy", lambda r, n: units.energy(r.it_energy_uj / 1e6), True,
                    width=None if wide else 8, sort="energy")
    water = Column("water", "Water", lambda r, n: units.water(water_l(r)), True,
                   width=None if wide else 7, sort="water")
    if wide:
        cols = [Column("cluster", "Cluster", lambda r, n: r.cluster)]
        if not all_users:  # (everyone's jobs need the room for user and account)
            cols.append(Column("tier", "Tier", lambda r, n: r.tier or "—"))
        cols += [
            Column("job", "Job", lambda r, n: r.job_id, sort="job"),
            Column("name", "Name", lambda r, n: _cut(r.name, 24), sort="name"),
        ]
        if all_users:
            cols += [Column("user", "User", lambda r, n: r.user),
                     Column("account", "Account", lambda r, n: r.account or "—")]
        cols += [
            Column("state", "State", _state_cell(99)),
            Column("seen", "Last seen", _last_seen, sort="recent"),
            Column("elapsed", "Elapsed", lambda r, n: units.duration(elapsed_shown(r, n)), True,
                   sort="elapsed"),
            energy,
            Column("carbon", "Carbon", lambda r, n: units.carbon(r.carbon_g), True, sort="carbon"),
            water,
        ]
        if power is not None:
            cols.append(Column("power", "Power", power, True, width=POWER_W))
        return [*cols, Column("how", "Figures", lambda r, n: how_obtained(r) or "—")]
    # 80 columns: a space before each column and 1 for the scroll bar. The tier and (for everyone's
    # jobs) the provenance are on the job's screen; the state says running, ok, exit N...
    state_w = 8 if all_users else 10
    cols = [Column("cluster", "Cluster", lambda r, n: _cut(r.cluster, 8), width=8)]
    if all_users:
        cols.append(Column("user", "User", lambda r, n: _cut(r.user, 8), width=8))
    cols += [
        Column("job", "Job", lambda r, n: _cut_left(r.job_id, 9 if not all_users else 8),
               width=9 if not all_users else 8, sort="job"),
        Column("name", "Name", lambda r, n: _cut(r.name, 8), width=8, sort="name"),
        Column("state", "State", _state_cell(state_w), width=state_w),
        Column("elapsed", "Elapsed", lambda r, n: short_duration(elapsed_shown(r, n)), True, width=8,
               sort="elapsed"),
        energy,
        Column("carbon", "CO2e", lambda r, n: carbon_short(r.carbon_g), True, width=7, sort="carbon"),
        water,
    ]
    if not all_users:
        cols.append(Column("how", "How", lambda r, n: HOW_SHORT.get(how_obtained(r), "—"), width=5))
    return cols


def short_duration(s: float) -> str:
    """At most 8 characters: '45 s', '12:05', '3:02:41', '12d 03h'."""
    if s >= 86400:
        d, rest = divmod(int(s), 86400)
        return f"{d}d {rest // 3600:02d}h"
    return units.duration(s) if s >= 60 else f"{s:.0f} s"


def row_key(r: JobRow) -> str:
    return f"{r.cluster}\x1f{r.job_id}\x1f{r.submit_time}"


class JobsScreen(SourceScreen):
    """Jobs of one user (default: whoever runs `greend tui`) or of everyone."""

    AUTO_FOCUS = "#jobs"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "open", "Open", show=False),
        Binding("slash", "search", "Search"),
        Binding("s", "sort", "Sort"),
        Binding("S", "reverse", "Reverse", show=False),
        *(Binding(k, f"sort_by('{v}')", f"Sort by {v}", show=False) for k, v in SORT_BINDINGS.items()),
        Binding("f", "state", "State"),
        Binding("o", "outcome", "Outcome"),
        Binding("t", "period", "Period"),
        Binding("c", "cluster", "Cluster", show=False),
        Binding("u", "users", "Mine/all", show=False),
        Binding("r", "refresh", "Refresh"),
        Binding("n", "page(1)", "Next page", show=False),
        Binding("p", "page(-1)", "Previous page", show=False),
        Binding("escape", "clear_search", "Clear search", show=False),
        Binding("2", "app.switch_mode('clusters')", "Clusters"),
    ]
    HELP: ClassVar[list[tuple[str, str]]] = [
        ("↑ ↓ PgUp PgDn", "move in the list"),
        ("Enter", "open the job: breakdown, power, factors, advice"),
        ("/", "search job id, name, account, cluster, command (Enter: apply, Esc: clear)"),
        ("E C W D", "sort by energy, carbon, water, elapsed time (Shift+letter; again: reverse)"),
        ("R J N", "sort by most recent, job id, name (again: reverse)"),
        ("s / S", "sort by the next column / reverse the order"),
        ("f", "show all jobs, running jobs only, ended jobs only"),
        ("o", "outcome: any, failed only (exit code ≠ 0, Slurm FAILED…), ok only"),
        ("t", "period: last 24 h, 7, 30, 365 days, all time"),
        ("c", "cluster: all, or one cluster"),
        ("u", "your jobs or everyone's (when the source lets you)"),
        ("n / p", "next / previous page of 100 jobs"),
        ("r", "refresh now (also retries after a connection problem)"),
    ]

    state_filter: reactive[str | None] = reactive(None, init=False)
    outcome_filter: reactive[str | None] = reactive(None, init=False)
    period: reactive[int] = reactive(DEFAULT_PERIOD, init=False)
    sort: reactive[str] = reactive("recent", init=False)
    descending: reactive[bool] = reactive(True, init=False)
    search: reactive[str] = reactive("", init=False)
    all_users: reactive[bool] = reactive(False, init=False)
    cluster: reactive[str | None] = reactive(None, init=False)
    offset: reactive[int] = reactive(0, init=False)

    def __init__(self) -> None:
        super().__init__()
        self.page: JobPage | None = None
        self._cols: list[Column] = []
        self._keys: list[str] = []
        self._shown: list[str] = []  # the rows' lines on screen, to update only what changed
        self._header = ""
        self._widths_now: list[int] = []
        self._seen_widths: list[int] = []
        self._pending = False
        self._clusters: list[str] = []
        self.loaded_at: float | None = None
        self.error: str | None = None
        self.power = PowerHistory()
        self._totals_at = float("-inf")
        self._totals_for: tuple | None = None
        self._totals_page: JobPage | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar()
        yield Static(id="filters")
        yield Horizontal(id="search-bar")  # its label and input are mounted when first opened
        # The column header is a line of its own: its sort arrow changes without DataTable
        # rebuilding every row.
        yield Static(id="header")
        yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True, cell_padding=0,
                        show_header=False)
        yield Static(id="totals")
        yield Static(id="status")
        yield KeyBar()

    def on_mount(self) -> None:
        app = self.app
        self.set_reactive(JobsScreen.all_users, app.user is None)  # type: ignore[attr-defined]
        self.query_one("#search-bar").display = False
        self._set_columns()
        self._show_filters()
        self.reload()
        self.refresh_every()
        if app.refresh_s > 0:  # type: ignore[attr-defined]
            # Running rows' elapsed time moves every second without asking the source.
            self.set_interval(1.0, self._tick_running)

    # -- the query --------------------------------------------------------------------------------
    def query_now(self) -> JobQuery:
        app = self.app
        now = app.now()  # type: ignore[attr-defined]
        return JobQuery(
            user=None if self.all_users else app.user,  # type: ignore[attr-defined]
            cluster=self.cluster, state=self.state_filter, since=since(self.period, now),
            search=self.search, outcome=self.outcome_filter, sort=self.sort, descending=self.descending,
            limit=app.page_size, offset=self.offset,  # type: ignore[attr-defined]
        )

    def _changed(self, reset: bool = True) -> None:
        if reset and self.offset:
            self.offset = 0  # its own watcher reloads
            return
        self._show_filters()
        self._show_header()
        if not self._pending:
            self._pending = True
            self.call_after_refresh(self._reload_pending)

    def _reload_pending(self) -> None:
        self._pending = False
        self.reload()

    def watch_state_filter(self) -> None:
        self._changed()

    def watch_outcome_filter(self) -> None:
        self._changed()

    def watch_period(self) -> None:
        self._changed()

    def watch_sort(self) -> None:
        self._changed()

    def watch_descending(self) -> None:
        self._changed()

    def watch_search(self) -> None:
        self._changed()

    def watch_cluster(self) -> None:
        self._changed()

    def watch_all_users(self) -> None:
        self._set_columns()
        self._changed()

    def watch_offset(self) -> None:
        self._changed(reset=False)

    # -- loading ----------------------------------------------------------------------------------
    def reload(self) -> None:
        self._load(self.query_now())

    @work(thread=True, exclusive=True, group="jobs")
    def _load(self, q: JobQuery) -> None:
        self.load_in_worker(lambda src, now: src.jobs(q, now), lambda page: self._show(q, page))

    def _show(self, q: JobQuery, page: JobPage) -> None:
        with self.app.batch_update():  # one repaint for the table and both lines
            self._show_page(q, page)
        # once the page is painted; new figures (a new page from the source) are read again soon
        self.call_after_refresh(self._load_totals, q, False, page is not self._totals_page)
        if self.app.starting:  # type: ignore[attr-defined]
            # (a refresh's callbacks run before the frame is written: a moment later, it is shown)
            self.set_timer(STARTED_S, self.app.started)  # type: ignore[attr-defined]
        self._totals_page = page

    def _show_page(self, q: JobQuery, page: JobPage) -> None:
        app = self.app
        now = app.now()  # type: ignore[attr-defined]
        if page is not self.page:
            self.power.update(page.jobs)
        self.page = page
        self.error = None
        self.loaded_at = now
        for r in page.jobs:
            if r.cluster not in self._clusters:
                self._clusters.append(r.cluster)
        self._fill(page, now)
        self.app.load_cluster_names()  # type: ignore[attr-defined]
        status = self.query_one("#status", Static)
        status.remove_class("error")
        if page.total == 0:
            who = f"of {q.user} " if q.user else ""
            text = (f"No jobs {who}match. Try t (period), f (state), o (outcome), / (search) "
                    "or u (everyone's jobs).")
        else:
            end = page.offset + len(page.jobs)
            more = "+" if page.truncated else ""
            bits = [f"Jobs {page.offset + 1}–{end} of {page.total:,}{more}", f"{page.running} running",
                    "Enter: details"]
            if page.total > end or page.offset:
                bits.append("n/p: pages")
            text = " · ".join([*bits, f"at {clock(now)}"])
        status.update(text)

    def _tick_running(self) -> None:
        """Rewrite the running rows' lines (their elapsed time moves), nothing else."""
        page = self.page
        if not (self.is_current and page is not None and page.running and not self.error):
            return
        now = self.app.now()  # type: ignore[attr-defined]
        widths = self._widths_now
        table = self.query_one(DataTable)
        for i, r in enumerate(page.jobs):
            if r.state != RUNNING or i >= len(self._shown):
                continue
            vals = [c.value(r, now) for c in self._cols]
            if any(c.width is None and len(v) > w for c, v, w in zip(self._cols, vals, widths, strict=True)):
                self._fill(page, now)  # a column must grow: lay the page out again
                return
            line = self._line(vals, widths)
            if line != self._shown[i]:
                self._shown[i] = line
                table.update_cell(str(i), "line", self._text(line, r, now))

    # -- the totals line ----------------------------------------------------------------------------
    def _load_totals(self, q: JobQuery, force: bool = False, changed: bool = False) -> None:
        """The period's totals (whose jobs and period only): when the period or whose jobs change,
        when asked (r), every 30 s, and at most every 5 s while the jobs' figures change."""
        app = self.app
        key = (q.user, self.period)
        now = app.now()  # type: ignore[attr-defined]
        age = time.monotonic() - self._totals_at
        if not force and key == self._totals_for and age < (TOTALS_CHANGED_S if changed else TOTALS_S):
            return
        self._totals_for, self._totals_at = key, time.monotonic()
        label = PERIODS[self.period][0]
        self.run_worker(lambda: self._read_totals(q.user, since(self.period, now), label), thread=True,
                        exclusive=True, group="totals")

    def _read_totals(self, user: str | None, since_t: float | None, label: str) -> None:
        try:
            s = self.app.source.summary(since_t, None, "user")  # type: ignore[attr-defined]
        except Exception as e:  # the line says why; the table has its own status
            text = f"Totals unavailable: {self.app.describe_error(e)}"  # type: ignore[attr-defined]
        else:
            rows = [r for r in s.rows if user is None or r.key == user]
            text = totals_line(label, rows, user, self.app.me)  # type: ignore[attr-defined]
        self.app.call_from_thread(self.query_one("#totals", Static).update, text)

    # -- the table --------------------------------------------------------------------------------
    # One cell per row, the line laid out here: DataTable measures and renders every cell on its
    # own, and ten cells a row made paging through 100 jobs three times slower.
    def _set_columns(self) -> None:
        width = self.size.width or self.app.size.width
        wide = width >= WIDE
        power = width >= (WIDE_POWER_ALL if self.all_users else WIDE_POWER)
        cols = columns(wide, self.all_users, self.power.cell if power else None)
        if [c.key for c in cols] == [c.key for c in self._cols]:
            return
        self._cols = cols
        self._header = ""
        self._seen_widths = []
        if self.page is not None:
            self._fill(self.page, self.app.now())  # type: ignore[attr-defined]
        else:
            self._layout([])

    def _widths(self, values: list[list[str]]) -> list[int]:
        # Columns that fit their content only grow: a header that changed would rebuild the table.
        out = []
        for i, c in enumerate(self._cols):
            if c.width is not None:
                out.append(c.width)
            else:
                seen = self._seen_widths[i] if i < len(self._seen_widths) else 0
                out.append(max([seen, len(c.label) + 1, *(len(v[i]) for v in values)]))
        self._seen_widths = out
        return out

    def _line(self, vals: list[str], widths: list[int]) -> str:
        parts = []
        for c, v, w in zip(self._cols, vals, widths, strict=True):
            v = v if len(v) <= w else v[: w - 1] + "…"
            parts.append(" " + (v.rjust(w) if c.right else v.ljust(w)))
        return "".join(parts)

    def _show_header(self) -> None:
        if not self._widths_now:
            return
        arrow = "↓" if self.descending else "↑"
        labels = [c.label + arrow if c.sort == self.sort else c.label for c in self._cols]
        self.query_one("#header", Static).update(
            Text(self._line(labels, self._widths_now), no_wrap=True, overflow="crop"))

    def _layout(self, values: list[list[str]]) -> tuple[str, list[str]]:
        widths = self._widths(values)
        header = self._line([c.label for c in self._cols], widths)
        lines = [self._line(v, widths) for v in values]
        if header != self._header:
            table = self.query_one(DataTable)
            table.clear(columns=True)
            table.add_column(Text(), key="line", width=len(header))  # (a str label is parsed as markup)
            self._header = header
            self._widths_now = widths
            self._keys = []
            self._shown = []
            self._show_header()
        return header, lines

    def _fill(self, page: JobPage, now: float) -> None:
        # Rows are keyed by position, so a refresh, a new page or a new order rewrites only the
        # lines that differ instead of clearing and rebuilding the table.
        table = self.query_one(DataTable)
        keys = [row_key(r) for r in page.jobs]
        _, lines = self._layout([[c.value(r, now) for c in self._cols] for r in page.jobs])
        at = table.cursor_row
        current = self._keys[at] if self._keys and 0 <= at < len(self._keys) else None
        shown = self._shown
        for i, (line, r) in enumerate(zip(lines, page.jobs, strict=True)):
            if i >= len(shown):
                table.add_row(self._text(line, r, now), key=str(i))
            elif line != shown[i]:
                table.update_cell(str(i), "line", self._text(line, r, now))
        for i in range(len(shown) - 1, len(lines) - 1, -1):
            table.remove_row(str(i))
        same_jobs = keys == self._keys
        self._keys = keys
        self._shown = lines
        if not same_jobs:
            # follow the job under the cursor; another page or filter starts at the top
            table.move_cursor(row=keys.index(current) if current in keys else 0, animate=False)

    def _text(self, line: str, r: JobRow, now: float) -> Text:
        """A row's line, its state in colour too (failed red, running green, stale yellow)."""
        text = Text(line, no_wrap=True)
        at = 0
        for c, w in zip(self._cols, self._widths_now, strict=True):
            if c.key == "state":
                style = outcome.shown(r, now).style
                if style:
                    text.stylize(style, at + 1, at + 1 + w)
                break
            at += w + 1
        return text

    def on_resize(self) -> None:
        self._set_columns()

    def selected(self) -> JobRow | None:
        if not self.page or not self.page.jobs:
            return None
        i = self.query_one(DataTable).cursor_row
        return self.page.jobs[i] if 0 <= i < len(self.page.jobs) else None

    @on(DataTable.RowSelected, "#jobs")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    # -- actions ----------------------------------------------------------------------------------
    def action_open(self) -> None:
        r = self.selected()
        if r is not None:
            from .job import JobScreen

            self.app.push_screen(JobScreen(r.cluster, r.job_id, tier=r.tier))

    async def action_search(self) -> None:
        bar = self.query_one("#search-bar")
        if not bar.children:  # (not composed with the screen: its first page comes sooner)
            await bar.mount_all([
                Static("Search:", id="search-label"),
                Input(placeholder="job id, name, account, cluster… (Enter: apply, Esc: clear)",
                      id="search", compact=True)])
        bar.display = True
        inp = self.query_one("#search", Input)
        inp.value = self.search
        inp.focus()

    @on(Input.Submitted, "#search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        self.search = event.value.strip()
        if not self.search:
            self.query_one("#search-bar").display = False
        self.query_one(DataTable).focus()

    def action_clear_search(self) -> None:
        bar = self.query_one("#search-bar")
        if bar.display or self.search:
            for inp in self.query("#search").results(Input):
                inp.value = ""
            bar.display = False
            self.search = ""
            self.query_one(DataTable).focus()

    def action_sort(self) -> None:
        i = SORT_KEYS.index(self.sort)
        self.sort = SORT_KEYS[(i + 1) % len(SORT_KEYS)]
        self.descending = default_descending(self.sort)

    def action_sort_by(self, key: str) -> None:
        if key == self.sort:
            self.descending = not self.descending
        else:
            self.sort = key
            self.descending = default_descending(key)

    def action_reverse(self) -> None:
        self.descending = not self.descending

    def action_state(self) -> None:
        order = [None, RUNNING, "ended"]
        self.state_filter = order[(order.index(self.state_filter) + 1) % len(order)]

    def action_outcome(self) -> None:
        order: list[str | None] = [None, "failed", "ok"]
        self.outcome_filter = order[(order.index(self.outcome_filter) + 1) % len(order)]

    def action_period(self) -> None:
        self.period = (self.period + 1) % len(PERIODS)

    def action_cluster(self) -> None:
        names = sorted(set(self._clusters) | set(self.app.cluster_names))  # type: ignore[attr-defined]
        order: list[str | None] = [None, *names]
        i = order.index(self.cluster) if self.cluster in order else 0
        self.cluster = order[(i + 1) % len(order)]

    def action_users(self) -> None:
        if self.app.user is None and self.all_users:  # type: ignore[attr-defined]
            # started with --all-users: "mine" is the person at the keyboard
            self.app.user = self.app.me  # type: ignore[attr-defined]
        self.all_users = not self.all_users

    def action_refresh(self) -> None:
        self.reload()
        self._load_totals(self.query_now(), force=True)

    def action_page(self, step: int) -> None:
        if self.page is None:
            return
        size = self.app.page_size  # type: ignore[attr-defined]
        new = self.offset + step * size
        if 0 <= new < max(self.page.total, 1):
            self.offset = new

    # -- the line above the table ---------------------------------------------------------------
    def _show_filters(self) -> None:
        app = self.app
        who = "Everyone's jobs" if self.all_users else f"Jobs of {app.user}"  # type: ignore[attr-defined]
        # (an outcome filter implies ended jobs: it takes the place of the state)
        state = ({None: "all states", RUNNING: "running only", "ended": "ended only"}[self.state_filter]
                 if not self.outcome_filter else f"{self.outcome_filter} only")
        bits = [who, PERIODS[self.period][0], state, self.cluster or "all clusters",
                 f"by {SORT_LABELS[self.sort]} {'↓' if self.descending else '↑'}"]
        if self.search:
            bits.append(f"search “{self.search}”")
        self.query_one("#filters", Static).update(" · ".join(bits))


def default_descending(key: str) -> bool:
    """Names and ids read best A to Z, figures biggest first."""
    return key not in ("job", "name")


def totals_line(period: str, rows: list, user: str | None, me: str) -> str:
    """'Totals of your last 30 days: 21 jobs · 45.2 kWh · 2.31 kgCO2e · 14.1 L': whose jobs and the
    period only (all clusters, states, outcomes), whatever else the table is filtered on."""
    jobs = sum(r.jobs for r in rows)
    who = "everyone's" if user is None else "your" if user == me else f"{user}'s"
    if not jobs:
        return f"Totals of {who} {period}: no jobs"
    e, c, w = (sum(getattr(r, f) for r in rows) for f in ("it_energy_j", "carbon_g", "water_l"))
    return (f"Totals of {who} {period}: {plural(jobs, 'job')} · {units.energy(e)} · {units.carbon(c)} · "
            f"{units.water(w)}")

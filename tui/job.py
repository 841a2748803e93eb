"""One job: energy breakdown, power over time, carbon and water with their factors, everyday
equivalents, the routing decision and right-sizing advice."""

from __future__ import annotations

import json
from typing import ClassVar

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import Static

from greend import units

from . import outcome
from .advice import right_sizing
from .data import RUNNING, JobDetail, measured_share, power_w, provenance_kind
from .equivalents import equivalents
from .formatting import clock, mib, percent, stamp
from .keybar import KeyBar, TitleBar
from .outcome import elapsed_shown
from .plot import PowerPlot, power_spans
from .screen import SourceScreen
from .words import plural

J_PER_KWH = 3.6e6

FACTOR_ROWS = [
    ("pue", "PUE", "{:g}"),
    ("wue_site_l_per_kwh", "WUE on-site", "{:g} L/kWh"),
    ("ewif_l_per_kwh", "EWIF off-site", "{:.3g} L/kWh"),
    ("carbon_intensity_g_per_kwh", "Carbon intensity", "{:.4g} g/kWh"),
]


def _grid() -> Table:
    t = Table.grid(padding=(0, 1), expand=True)
    return t


def heading(text: str) -> Text:
    return Text(text, style="bold")


def title(d: JobDetail, now: float) -> RenderableType:
    j = d.job
    how = outcome.shown(j, now)
    state = Text(how.long, style=how.style)
    line1 = Text.assemble((f"{j.cluster}/{j.job_id}", "bold"), "  ", j.name or "(no name)", "  ",
                          state, "  ", units.duration(elapsed_shown(j, now)))
    bits = [j.user or "?"]
    if j.account:
        bits.append(f"account {j.account}")
    if j.partition:
        bits.append(f"partition {j.partition}")
    if j.tier:
        bits.append(f"tier {j.tier}")
    nodes = [n for n in j.node.split(",") if n]
    bits.append(("node " if len(nodes) == 1 else "nodes ") + ", ".join(nodes))
    bits.append(f"from {stamp(j.first_seen)}" + (f" to {stamp(j.end_time)}" if j.end_time else ""))
    if j.state == RUNNING and not outcome.is_stale(j, now):
        bits.append(f"updated {clock(j.last_seen)}")
    lines = [line1, Text(" · ".join(bits), style="dim")]
    if j.command:
        lines.append(Text(f"$ {j.command}", style="dim", overflow="ellipsis", no_wrap=True))
    return Group(*lines)


def energy(d: JobDetail) -> RenderableType:
    j = d.job
    prov = j.provenance or {}
    it_j = j.it_energy_uj / 1e6
    t = _grid()
    t.add_column(width=16)
    t.add_column(justify="right", width=10)
    t.add_column(justify="right", width=4)
    t.add_column(ratio=1, overflow="fold")
    for src, label in (("cpu", "CPU"), ("gpu", "GPU"), ("dram", "Memory (DRAM)"),
                       ("memory", "Memory (model)")):
        e = getattr(j, f"{src}_uj") / 1e6
        if not e and src not in prov:
            continue
        p = prov.get(src, "")
        kind = provenance_kind(p)
        t.add_row(f"  {label}", units.energy(e), percent(e / it_j) if it_j else "",
                  Text(p or "—", style="green" if kind == "measured" else "yellow" if kind else "dim"))
    t.add_row(Text("  IT total", style="bold"), Text(units.energy(it_j), style="bold"), "",
              _share_note(j))
    pues = sorted({f["pue"] for f in d.factors})
    pue_note = (f"IT × PUE {pues[0]:g}" if len(pues) == 1 else
                f"IT × PUE {pues[0]:g}–{pues[-1]:g}" if pues else "IT × PUE")
    overhead = j.facility_j - it_j
    t.add_row("  Facility", units.energy(j.facility_j), "",
              f"{pue_note}: +{units.energy(max(0.0, overhead))} cooling, losses")
    return Group(heading("Energy"), t)


def _share_note(j) -> Text:
    share = measured_share(j)
    if share is None:
        return Text("no energy recorded yet", style="dim")
    if share >= 0.999:
        return Text("all measured", style="green")
    if share <= 0.001:
        return Text("all modelled (no counters readable)", style="yellow")
    return Text(f"{share:.0%} measured, the rest modelled", style="yellow")


def resources(d: JobDetail, now: float) -> RenderableType:
    j = d.job
    el = elapsed_shown(j, now)
    bits = []
    cpu_s = j.cpu_time_ns / 1e9
    busy = f", {cpu_s / el:.1f} busy on average" if el > 0 and cpu_s else ""
    if j.alloc_cpus:
        cpus = (plural(int(j.alloc_cpus), "CPU") if j.alloc_cpus == int(j.alloc_cpus)
                else f"{j.alloc_cpus:g} CPUs")
        bits.append(f"{cpus} allocated, CPU time {units.duration(cpu_s)}{busy}")
    else:
        bits.append(f"CPU time {units.duration(cpu_s)}{busy}")
    if j.max_mem_bytes or j.alloc_mem_bytes:
        mem = f"memory peak {mib(j.max_mem_bytes)}"
        if j.alloc_mem_bytes:
            mem += f" of {mib(j.alloc_mem_bytes)} requested"
        bits.append(mem)
    if j.alloc_gpus:
        bits.append(f"{j.alloc_gpus} GPU{'s' if j.alloc_gpus > 1 else ''}")
    return Text("Resources: " + "; ".join(bits), style="dim")


def power_caption(d: JobDetail, watts: list[float], spans: list[tuple[float, float]]) -> Text:
    """Mean and peak power, and what the chart is made of: how many points, of which step, over
    how long (steps differ when the run was short, or at its last point)."""
    if not watts:
        return Text("No power series recorded yet (the first point comes after one series step).",
                    style="dim")
    covered = sum(b - a for a, b in spans)
    mean_w = sum(w * (b - a) for w, (a, b) in zip(watts, spans, strict=True)) / covered if covered else 0.0
    span = spans[-1][1] - spans[0][0]
    if len(watts) == 1:
        return Text.assemble(("Power", "bold"), f"  {units.power(mean_w)} on average over "
                             f"{units.duration(span)}: one point, too few for a chart")
    steps = sorted(p.t_end - p.t_start for p in d.series)
    # The first and last points may be cut short by the job's start and end: the step is the rest.
    inner = steps if len(steps) < 3 else sorted(p.t_end - p.t_start for p in d.series[1:-1])
    lo, hi = inner[0], inner[-1]
    step = (f"step {units.duration(hi)}" if hi - lo <= 0.05 * hi
            else f"steps {units.duration(lo)} to {units.duration(hi)}")
    return Text.assemble(
        ("Power", "bold"),
        f"  mean {units.power(mean_w)}, peak {units.power(max(watts))} · "
        f"{plural(len(watts), 'point')}, {step}, over {units.duration(span)}",
    )


def footprint(d: JobDetail) -> RenderableType:
    j = d.job
    it_kwh = j.it_energy_uj / 1e6 / J_PER_KWH
    t = _grid()
    t.add_column(width=16)
    t.add_column(justify="right", width=10)
    t.add_column(ratio=1, overflow="fold")
    one = d.factors[0] if len(d.factors) == 1 else None
    if one:
        ci_note = (f"IT {units.energy(it_kwh * J_PER_KWH)} × PUE {one['pue']:g} × "
                   f"{one['carbon_intensity_g_per_kwh']:.4g} g/kWh")
        site_note = f"cooling: IT × WUE {one['wue_site_l_per_kwh']:g} L/kWh"
        off_note = f"power plants: IT × PUE × EWIF {one['ewif_l_per_kwh']:.3g} L/kWh"
    else:
        ci_note = f"IT × PUE × carbon intensity, over {len(d.factors)} factor sets"
        site_note, off_note = "cooling: IT × WUE", "power plants: IT × PUE × EWIF"
    t.add_row("  Carbon", units.carbon(j.carbon_g), ci_note)
    t.add_row("  Water", units.water(j.water_site_l + j.water_offsite_l), "consumed (evaporated)")
    t.add_row("    on-site", units.water(j.water_site_l), site_note)
    t.add_row("    off-site", units.water(j.water_offsite_l), off_note)
    parts: list[RenderableType] = [heading("Carbon and water (location-based)"), t]
    if d.factors:
        parts.append(heading("Factors used and their sources"))
        for f in d.factors:
            if len(d.factors) > 1 and f.get("first_used"):
                parts.append(Text(f"  in force from {stamp(f['first_used'])}", style="italic"))
            ft = _grid()
            ft.add_column(width=18)
            ft.add_column(width=11)
            ft.add_column(ratio=1, overflow="fold", style="dim")
            src = f.get("sources") or {}
            for key, label, fmt in FACTOR_ROWS:
                if key in f:
                    ft.add_row(f"  {label}", fmt.format(f[key]), src.get(key, "source not recorded"))
            parts.append(ft)
    else:
        parts.append(Text("  No factor set recorded yet.", style="dim"))
    return Group(*parts)


def everyday(d: JobDetail) -> RenderableType:
    j = d.job
    t = _grid()
    t.add_column(width=8)
    t.add_column(ratio=1, overflow="fold")
    for e in equivalents(j.carbon_g, j.water_site_l + j.water_offsite_l, j.it_energy_uj / 1e6):
        t.add_row(f"  {e.quantity.capitalize()}", Text.assemble(f"≈ {e.text}\n", (e.source, "dim")))
    return Group(heading("In everyday terms"), t)


_CHOICE_KEYS = ("decision", "verdict", "action", "chosen", "chosen_cluster", "target_cluster",
                "target", "to_cluster", "tier", "chosen_tier")
_WHY_KEYS = ("explanation", "explain", "reason", "reasons", "why", "details", "verdicts")
_SKIP = {"cluster", "job_id", "id", "pk", "rowid"}


def _maybe_json(v):
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _explain(v, indent: str = "  ") -> list[str]:
    v = _maybe_json(v)
    if isinstance(v, list):
        out = []
        for item in v:
            if isinstance(item, dict):
                out.append(indent + " · ".join(f"{x}" for x in item.values() if x not in (None, "")))
            else:
                out.append(f"{indent}{item}")
        return out
    if isinstance(v, dict):
        return [f"{indent}{k}: {x}" for k, x in v.items()]
    return [f"{indent}{line}" for line in str(v).splitlines()]


def _engine_lines(row: dict, d: dict) -> list[str]:
    """A decision as the policy engine records it: where it went, why, and what each cluster was."""
    where = row.get("cluster") or d.get("cluster") or "no cluster"
    tier = row.get("tier") or ""
    outcome = (row.get("outcome") or d.get("outcome") or "").replace("_", " ")
    lines = [f"  {outcome}: {where}" + (f" ({tier} tier)" if tier else "")]
    if d.get("summary"):
        lines.append(f"  {d['summary']}")
    for c in d.get("candidates") or []:
        est = c.get("estimate") or {}
        if c.get("eligible"):
            verdict = "eligible" + (f", score {c['score']:.3g}" if c.get("score") is not None else "")
        else:
            verdict = f"rejected by {c.get('rejected_by') or '?'}"
        if c.get("held_by"):
            verdict += f", held by {', '.join(c['held_by'])}"
        fig = ""
        if est.get("it_energy_j") is not None:
            fig = (f"  est. {units.energy(est['it_energy_j'])}, {units.carbon(est.get('carbon_g', 0.0))},"
                   f" {units.water(est.get('water_l', 0.0))}")
        lines.append(f"  · {c.get('cluster', '?')}: {verdict}{fig}")
    refusals = [r for r in d.get("rules") or [] if r.get("kind") == "filter" and r.get("verdict") != "pass"]
    for r in refusals[:8]:
        lines.append(f"  · {r.get('rule')} on {r.get('cluster')}: {r.get('reason')}")
    if len(refusals) > 8:
        lines.append(f"  · ... {len(refusals) - 8} more (greend route --json)")
    return lines


def decision_lines(dec: dict) -> list[str]:
    """The routing decision: the policy engine's record when it is one, else whatever columns
    the row has."""
    engine = _maybe_json(dec.get("decision"))
    if isinstance(engine, dict) and ("candidates" in engine or "rules" in engine):
        return _engine_lines(dec, engine)
    choice = [f"{k.replace('_', ' ')}: {dec[k]}" for k in _CHOICE_KEYS if dec.get(k) not in (None, "")]
    why = [k for k in _WHY_KEYS if dec.get(k) not in (None, "")]
    lines = ["  " + " · ".join(choice)] if choice else []
    for k in why:
        lines += _explain(dec[k])
    if not lines:
        lines = [f"  {k}: {v}" for k, v in dec.items() if k not in _SKIP and v not in (None, "")]
    return lines


def decision(d: JobDetail) -> RenderableType | None:
    if not d.decision:
        return None
    return Group(heading("Routing decision"), Text("\n".join(decision_lines(d.decision))))


def advice(d: JobDetail, now: float) -> RenderableType | None:
    lines = right_sizing(d.job, elapsed_shown(d.job, now))
    if not lines:
        return None
    t = _grid()
    t.add_column(width=2)
    t.add_column(ratio=1)
    for line in lines:
        t.add_row(" •", line)
    return Group(heading("Right-sizing"), t)


class JobScreen(SourceScreen):
    """A job's footprint and how it was obtained; refreshed live while the job runs."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,backspace", "back", "Back"),
        Binding("r", "refresh", "Refresh"),
    ]
    HELP: ClassVar[list[tuple[str, str]]] = [
        ("↑ ↓ PgUp PgDn", "scroll"),
        ("Esc", "back to the list"),
        ("r", "refresh now (also retries after a connection problem)"),
    ]

    def __init__(self, cluster: str, job_id: str, tier: str = "") -> None:
        super().__init__()
        self.cluster = cluster
        self.job_id = job_id
        self.tier = tier  # from the list: the API's job record does not carry it
        self.detail: JobDetail | None = None
        self.loaded_at: float | None = None
        self.error: str | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar()
        with VerticalScroll(id="detail"):
            yield Static(f"Loading {self.cluster}/{self.job_id}…", id="title")
            yield Static(id="energy")
            yield Static(id="resources")
            yield Static(id="power-caption")
            yield Static(id="power")
            yield Static(id="footprint")
            yield Static(id="everyday")
            yield Static(id="decision")
            yield Static(id="advice")
        yield Static(id="status")
        yield KeyBar()

    def on_mount(self) -> None:
        self.query_one("#detail").focus()
        self.query_one("#power").display = False
        self.reload()
        self.refresh_every()

    def _tick(self) -> None:
        if self.is_current and self.detail is not None and self.detail.job.state == RUNNING \
                and not self.error:
            self.reload()

    def reload(self) -> None:
        self.run_worker(self._load, thread=True, exclusive=True, group="job")

    def _load(self) -> None:
        self.load_in_worker(lambda src, now: src.job(self.cluster, self.job_id), self._show)

    def _show(self, d: JobDetail | None) -> None:
        now = self.app.now()  # type: ignore[attr-defined]
        status = self.query_one("#status", Static)
        status.remove_class("error")
        self.error = None
        if d is None:
            self.query_one("#title", Static).update(
                f"No job {self.cluster}/{self.job_id} here (it may belong to another user).")
            status.update("")
            return
        if not d.job.tier:
            d.job.tier = self.tier
        self.detail = d
        self.loaded_at = now
        self.query_one("#title", Static).update(title(d, now))
        self.query_one("#energy", Static).update(energy(d))
        self.query_one("#resources", Static).update(resources(d, now))
        watts = power_w(d.series, d.job.first_seen)
        spans = power_spans(d.series, d.job.first_seen)
        self.query_one("#power-caption", Static).update(power_caption(d, watts, spans))
        plot = self.query_one("#power", Static)
        plot.display = len(watts) > 1
        self.query_one("#power-caption").set_class(not plot.display, "alone")
        if len(watts) > 1:
            plot.update(PowerPlot(watts, spans[0][0], spans[-1][1], spans=spans))
        self.query_one("#footprint", Static).update(footprint(d))
        self.query_one("#everyday", Static).update(everyday(d))
        for wid, r in (("#decision", decision(d)), ("#advice", advice(d, now))):
            w = self.query_one(wid, Static)
            w.display = r is not None
            if r is not None:
                w.update(r)
        live = " · refreshed live while it runs" if d.job.state == RUNNING else ""
        status.update(f"Updated {clock(now)}{live}")

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_refresh(self) -> None:
        self.reload()

"""Decisions and estimates as text for people: every rule's verdict with its numbers, the footprint
on each cluster, and what will be submitted."""

from __future__ import annotations

from greend import quantities as q

_MARK = {"pass": "pass", "reject": "REJECT", "hold": "HOLD", "relaxed": "RELAXED", "score": "",
         "ok": "ok", "skip": "-", "warn": "WARN", "nice": "NICE", "defer": "DEFER", "refuse": "REFUSE",
         "advice": "ADVICE"}


def _energy(j: float) -> str:
    kwh = j / 3.6e6
    if kwh >= 1:
        return f"{kwh:.3g} kWh"
    if kwh >= 1e-3:
        return f"{kwh * 1e3:.3g} Wh"
    return f"{j:.3g} J"


def _carbon(g: float) -> str:
    return f"{g / 1000:.3g} kg" if g >= 1000 else f"{g:.3g} g"


def _water(litres: float) -> str:
    return f"{litres:.3g} L" if litres >= 0.1 else f"{litres * 1000:.3g} mL"


def request_line(r) -> str:
    o = r.origin

    def src(key: str) -> str:
        return f" ({o[key]})" if key in o else ""

    parts = [f"{r.cpus} CPU(s){src('cpus-per-task') or src('ntasks')}"]
    if r.nodes > 1:
        parts.append(f"{r.nodes} nodes")
    parts.append(f"memory {q.format_memory(r.mem_mb)}{src('mem')}" if r.mem_mb is not None
                 else "memory: default")
    if r.gpus:
        parts.append(f"{r.gpus} GPU(s){' ' + r.gpu_type if r.gpu_type else ''}{src('gpus')}")
    parts.append(f"walltime {q.format_duration(r.walltime_s)}{src('time')}" if r.walltime_s is not None
                 else "walltime: default")
    if r.array_tasks > 1:
        parts.append(f"array of {r.array_tasks} tasks")
    parts.append(f"account {r.account}" if r.account else "no account")
    if r.data_class:
        parts.append(f"data class {r.data_class}{src('data-class')}")
    if r.data_stores:
        parts.append(f"data on {', '.join(r.data_stores)}")
    if r.deadline is not None:
        parts.append(f"deadline {q.iso(r.deadline)}")
    if r.deferrable:
        parts.append("deferrable")
    if r.flags:
        parts.append("/".join(sorted(r.flags)))
    return ", ".join(parts)


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)] + [r[-1]]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def estimate_rows(decision) -> list[list[str]]:
    rows = [["cluster", "energy", "carbon", "water", "runtime", "g/kWh", "PUE", "basis"]]
    for c in decision.candidates:
        try:
            e = decision.context.estimate(c)
        except Exception as err:  # stated, never raised
            rows.append([c.name, "?", "?", "?", "?", "?", "?", str(err)])
            continue
        f = e.footprint
        basis = "model" if e.correction == 1.0 else f"model x{e.correction:.3g} (history)"
        if e.runtime_s < e.walltime_s:
            basis += f", median run {q.human_duration(e.runtime_s)}"
        rows.append([c.name, _energy(f.facility_energy_j), _carbon(f.carbon_g), _water(f.water_l),
                     q.human_duration(e.runtime_s), f"{e.factors.carbon_intensity_g_per_kwh:.4g}",
                     f"{e.factors.pue:g}", basis])
    return rows


def carbon_lines(decision) -> list[str]:
    """Where each cluster's carbon intensity comes from (signal, cache, series or static, and why a
    fallback), and whether it covers the job's run, up to its deadline for a deferrable job."""
    d = decision
    lines = ["carbon intensity:"]
    for c in d.candidates:
        w = c.cluster.carbon
        lines.append(f"  {c.name}: {w.source or 'static'}")
        if not w.has_series:
            continue
        try:
            e = d.context.estimate(c)
        except Exception:  # stated in the footprint table
            continue
        end = e.start + e.runtime_s
        if d.request.deferrable and d.request.deadline is not None:
            end = max(end, d.request.deadline)
        gap = w.coverage_note(min(d.now, e.start), end)
        if gap:
            lines.append(f"    WARNING: {gap}")
    return lines


def decision_text(decision, title: str = "") -> str:
    d = decision
    r = d.request
    lines = []
    if title:
        lines.append(title)
    lines.append(f"  {d.summary()}")
    if d.plan is not None and not d.plan.refused:
        opts = d.plan.sbatch_options(r)
        lines.append(f"  sbatch options: {' '.join(opts) if opts else '(none)'}")
        t = d.context.site.cluster(d.plan.cluster).slurm.describe()
        lines.append(f"  transport: {t['transport']}: {t['why']}")
        for st in d.stage():
            where = f"from {', '.join(st['from'])}" if st["from"] else "held by no configured cluster"
            lines.append(f"  stage first: data store {st['store']} ({where}) to {st['to']}: "
                         f"{st['to']} does not have it")
        if d.fallbacks:
            lines.append(f"  if {d.plan.cluster} does not answer: {', '.join(d.fallbacks)}")
    lines.append("")
    lines.append(f"request: {request_line(r)}")
    for n in r.notes:
        lines.append(f"  note: {n}")
    lines.append(f"live state: {d.state_note or 'from each cluster (squeue/sinfo)'}; "
                 f"ledger: {d.ledger_note or 'read'}")
    for c in d.candidates:
        st = d.context.state(c)
        if st is None:
            continue
        if st.ok:
            load, alloc, total = st.load()
            age = q.human_duration(max(d.now - st.fetched_at, 0))
            lines.append(f"  {c.name}: {alloc}/{total} CPUs allocated ({load:.0%}), {len(st.running)} "
                         f"running, {len(st.pending)} pending, as of {age} ago")
        else:
            lines.append(f"  {c.name}: DOWN: {st.error}")

    lines += carbon_lines(d)

    lines.append("")
    lines.append("filters:")
    rows = []
    # One line per rule and distinct verdict: clusters that got the same verdict share it.
    groups: dict[tuple[str, str, str], list[str]] = {}
    for v in d.verdicts:
        if v.kind == "filter":
            groups.setdefault((v.rule, v.verdict, v.reason), []).append(v.cluster or "")
    last = None
    for (rule, verdict, reason), clusters in groups.items():
        rows.append([rule if rule != last else "", ",".join(clusters), _MARK.get(verdict, verdict), reason])
        last = rule
    lines += _table(rows)

    score_vs = [v for v in d.verdicts if v.kind == "score"]
    if score_vs:
        lines.append("")
        lines.append("scores (0-100 x weight):")
        rows = []
        last = None
        for v in score_vs:
            n = v.numbers
            label = f"{v.rule} x{n['weight']:g}" if v.rule != last else ""
            rows.append([label, v.cluster or "", f"{n['score']:6.1f} -> {n['weighted']:7.1f}", v.reason])
            last = v.rule
        lines += _table(rows)
        lines.append("  total: " + ", ".join(f"{c.name} {c.total:.1f}" for c in d.ranking))

    lines.append("")
    lines.append("estimated footprint (facility energy, carbon, water consumed):")
    lines += _table(estimate_rows(d))

    adj = [v for v in d.verdicts if v.kind == "adjust"]
    if adj:
        lines.append("")
        lines.append(f"actions on {d.plan.cluster if d.plan else '-'}:")
        rows = [[v.rule, v.cluster or "", _MARK.get(v.verdict, v.verdict), v.reason] for v in adj]
        lines += _table(rows)
    if d.plan is not None:
        for w in d.plan.warnings:
            lines.append(f"warning: {w}")
        for a in d.plan.advice:
            lines.append(f"advice: {a}")
    return "\n".join(lines) + "\n"


def estimate_text(decision, title: str = "") -> str:
    d = decision
    lines = [title] if title else []
    lines.append(f"request: {request_line(d.request)}")
    lines.append("")
    lines += _table(estimate_rows(d), indent="")
    lines.append("")
    e0 = None
    for c in d.candidates:
        e = d.context.estimate(c)
        e0 = e0 or e
        p = e.power
        lines.append(f"{c.name}: {p.total_w:.4g} W = CPU {p.cpu_w:.4g} + memory {p.memory_w:.4g} "
                     f"+ GPU {p.gpu_w:.4g}"
                     f" ({c.cluster.power.cpu_w_per_core:g} W/core x u {c.cluster.power.cpu_usage:g}; "
                     f"{c.cluster.power.memory_w_per_gb:g} W/GB); runtime: {e.runtime_from}")
        if not c.rejected:
            continue
        lines.append(f"  (not eligible: {c.rejected.reason})")
    if e0 is not None:
        lines.append(f"correction: {e0.correction_from}")
    return "\n".join(lines) + "\n"

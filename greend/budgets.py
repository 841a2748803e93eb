"""Where each project (Slurm account) stands against its budgets ([[policy.budgets]]), for the
API's summary, the exporter's greend_budget_used_ratio and the TUI. The policy engine's budget rule
acts on the same usage and periods when it routes a job (docs/policy.md).
"""

from __future__ import annotations

import math
import sqlite3
import time

from .queries import Summary, account_usage

RESOURCES = (("energy", "energy_kwh", "kWh"), ("carbon", "carbon_kg", "kgCO2e"), ("water", "water_l", "L"))


def period_start(period: str, now: float) -> tuple[float, float]:
    """(start, end) of the local calendar period containing now (mktime normalises day 32 etc.)."""
    lt = time.localtime(now)
    y, m, d = lt.tm_year, lt.tm_mon, lt.tm_mday

    def mk(y: int, m: int, d: int) -> float:
        return time.mktime((y, m, d, 0, 0, 0, 0, 0, -1))

    if period == "day":
        return mk(y, m, d), mk(y, m, d + 1)
    if period == "week":
        monday = d - lt.tm_wday
        return mk(y, m, monday), mk(y, m, monday + 7)
    if period == "month":
        return mk(y, m, 1), mk(y, m + 1, 1)
    if period == "quarter":
        qm = (m - 1) // 3 * 3 + 1
        return mk(y, qm, 1), mk(y, qm + 3, 1)
    return mk(y, 1, 1), mk(y + 1, 1, 1)


def budget_status(db: sqlite3.Connection, budgets, now: float | None = None) -> dict[str, dict]:
    """For each account with a budget: its period, what it used since the period began, its limits,
    and the used/limit ratio per resource (energy: facility kWh; carbon: kg; water: L).

    {account: {"period", "since", "used": {...}, "limit": {...}, "ratio": {...}, "units": {...},
    "max_ratio"}}; a zero limit that was used has an infinite ratio.
    """
    budgets = list(budgets)
    if not budgets:
        return {}
    now = time.time() if now is None else now
    out: dict[str, dict] = {}
    for b in budgets:
        start, _ = period_start(b.period, now)
        use = account_usage(db, b.account, start)
        used = {"energy": use.facility_energy_j / 3.6e6, "carbon": use.carbon_g / 1000,
                "water": use.water_l}
        st = {"period": b.period, "since": start, "used": {}, "limit": {}, "ratio": {}, "units": {}}
        for resource, key, unit in RESOURCES:
            limit = getattr(b, key)
            if limit is None:
                continue
            u = used[resource]
            st["used"][resource] = u
            st["limit"][resource] = limit
            st["units"][resource] = unit
            st["ratio"][resource] = u / limit if limit > 0 else (math.inf if u > 0 else 0.0)
        st["max_ratio"] = max(st["ratio"].values(), default=0.0)
        out[b.account] = st
    return out


def label(st: dict) -> str:
    """The binding limit as a person reads it: "100 kgCO2e per month"."""
    if not st.get("ratio"):
        return ""
    resource = max(st["ratio"], key=st["ratio"].get)
    return f"{st['limit'][resource]:g} {st['units'][resource]} per {st['period']}"


def to_json(st: dict) -> dict:
    """A budget status for JSON (no infinity): a zero limit that was used shows as null and exceeded."""
    finite = {k: (v if math.isfinite(v) else None) for k, v in st["ratio"].items()}
    return {**st, "ratio": finite, "label": label(st),
            "max_ratio": st["max_ratio"] if math.isfinite(st["max_ratio"]) else None,
            "exceeded": st["max_ratio"] >= 1}


def add_budgets(db: sqlite3.Connection, s: Summary, budgets, now: float | None = None) -> None:
    """Where each account of an account summary stands in its own budget period (not the summary's
    window). A failure leaves the rows without budgets and says why in the note."""
    budgets = list(budgets or [])
    if s.by != "account" or not budgets:
        return
    try:
        status = budget_status(db, budgets, now)
    except Exception as e:  # the table still shows; the note says why budgets are missing
        s.note = (s.note + "; " if s.note else "") + f"budgets unavailable: {e}"
        return
    for row in s.rows:
        st = status.get(row.key)
        if st:
            row.budget = st
            row.budget_used, row.budget_label = st["max_ratio"], label(st)

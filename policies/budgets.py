"""Where each project (Slurm account) stands against its budgets, for metrics and displays.

The policy engine's budget rule acts on the same figures when it routes a job.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

RESOURCES = (("energy", "energy_kwh", "kWh"), ("carbon", "carbon_kg", "kgCO2e"), ("water", "water_l", "L"))


def budget_status(ledger_path: str | Path, budgets, now: float | None = None) -> dict[str, dict]:
    """For each account with a budget: its period, what it used since the period began, its limits,
    and the used/limit ratio per resource (energy: facility kWh; carbon: kg; water: L).

    {account: {"period", "since", "used": {...}, "limit": {...}, "ratio": {...}, "max_ratio"}}
    """
    from .history import LedgerView
    from .rules import period_start

    budgets = list(budgets)
    if not budgets:
        return {}
    now = time.time() if now is None else now
    out: dict[str, dict] = {}
    view = LedgerView(ledger_path, None, ttl_s=0.0)
    try:
        for b in budgets:
            start, _ = period_start(b.period, now)
            use = view.usage(b.account, start)
            used = {"energy": (use.facility_energy_j / 3.6e6) if use else 0.0,
                    "carbon": (use.carbon_g / 1000) if use else 0.0,
                    "water": use.water_l if use else 0.0}
            st = {"period": b.period, "since": start, "used": {}, "limit": {}, "ratio": {},
                  "units": {}}
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
    finally:
        view.close()
    return out


def label(st: dict) -> str:
    """The binding limit as a person reads it: "100 kgCO2e per month"."""
    if not st.get("ratio"):
        return ""
    resource = max(st["ratio"], key=st["ratio"].get)
    return f"{st['limit'][resource]:g} {st['units'][resource]} per {st['period']}"

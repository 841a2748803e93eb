"""A job's footprint as a person reads it (text) and as a script reads it (JSON)."""

from __future__ import annotations

import time

from . import units
from .footprint import UJ_PER_J, Factors
from .ledger import JobRow

IDLE_RULES = {
    "allocated": "node idle power shared among running jobs by allocated cores",
    "unattributed": "node idle power left unattributed (not charged to jobs)",
}


def footprint_dict(row: JobRow, factors: list[Factors] | list[dict], *, cpu_model: dict | None = None,
                   idle_rule: str | None = None, elapsed_s: float | None = None) -> dict:
    fs = [f.to_dict() if isinstance(f, Factors) else f for f in factors]
    it_j = row.it_energy_uj / UJ_PER_J
    out = {
        "job": {
            "cluster": row.cluster, "job_id": row.job_id, "node": row.node, "kind": row.kind,
            "name": row.name, "user": row.user, "account": row.account,
            "partition": row.partition, "state": row.state, "command": row.command,
            "exit_code": row.exit_code, "first_seen": row.first_seen, "last_seen": row.last_seen,
            "end_time": row.end_time, "alloc_cpus": row.alloc_cpus,
            "alloc_mem_bytes": row.alloc_mem_bytes, "max_mem_bytes": row.max_mem_bytes,
        },
        "elapsed_s": elapsed_s if elapsed_s is not None else (
            (row.end_time or row.last_seen) - row.first_seen),
        "cpu_time_s": row.cpu_time_ns / 1e9,
        "energy_j": {
            "cpu": row.cpu_uj / UJ_PER_J, "dram": row.dram_uj / UJ_PER_J,
            "gpu": row.gpu_uj / UJ_PER_J, "memory": row.memory_uj / UJ_PER_J,
            "it": it_j, "facility": row.facility_j,
        },
        "energy_uj": {"cpu": row.cpu_uj, "dram": row.dram_uj, "gpu": row.gpu_uj,
                      "memory": row.memory_uj, "it": row.it_energy_uj},
        "carbon_g": row.carbon_g,
        "water_l": {"site": row.water_site_l, "offsite": row.water_offsite_l,
                    "total": row.water_site_l + row.water_offsite_l},
        "provenance": row.provenance or {},
        "factors": fs,
    }
    if cpu_model:
        out["cpu_power_model"] = cpu_model
    if idle_rule:
        out["idle_power"] = {"rule": idle_rule, "meaning": IDLE_RULES[idle_rule]}
    return out


def text(d: dict) -> str:
    j = d["job"]
    e = d["energy_j"]
    w = d["water_l"]
    prov = d["provenance"]
    what = f"`{j['command']}`" if j.get("command") else f"job {j['cluster']}/{j['job_id']}"
    head = f"greend: footprint of {what}"
    bits = []
    if j.get("exit_code") is not None:
        bits.append(f"exit {j['exit_code']}")
    bits.append(f"{units.duration(d['elapsed_s'])}")
    bits.append(f"node {j['node']}, cluster {j['cluster']}")
    lines = [f"{head} ({', '.join(bits)})", ""]

    def row(label, value, note=""):
        lines.append(f"  {label:<20}{value:>14}   {note}".rstrip())

    row("Energy (IT)", units.energy(e["it"]), f"= {e['it'] / 3600:.4g} Wh")
    for src, label in (("cpu", "CPU"), ("dram", "DRAM"), ("memory", "Memory"), ("gpu", "GPU")):
        if e[src] or src in prov:
            row(f"  {label}", units.energy(e[src]), prov.get(src, ""))
    fs = d["factors"]
    pue_note = (f"x PUE {fs[-1]['pue']:g}" if len(fs) == 1 else
                f"x PUE over {len(fs)} factor sets") if fs else ""
    row("Energy (facility)", units.energy(e["facility"]), pue_note)
    row("Carbon", units.carbon(d["carbon_g"]), "location-based")
    row("Water", units.water(w["total"]),
        f"on-site {units.water(w['site'])}, off-site {units.water(w['offsite'])}")
    row("CPU time", units.duration(d["cpu_time_s"]))
    if j.get("max_mem_bytes"):
        row("Peak memory", f"{j['max_mem_bytes'] / 2**20:.0f} MiB", "resident")
    if fs:
        lines += ["", "Assumptions"]
        for f in fs:
            if len(fs) > 1 and "first_used" in f:
                since = time.strftime("%Y-%m-%d %H:%M", time.localtime(f["first_used"]))
                lines.append(f"  factors in force from {since}")
            src = f.get("sources", {})
            lines.append(f"  PUE {f['pue']:g}".ljust(38) + src.get("pue", ""))
            lines.append(f"  WUE on-site {f['wue_site_l_per_kwh']:g} L/kWh".ljust(38)
                         + src.get("wue_site_l_per_kwh", ""))
            lines.append(f"  EWIF off-site {f['ewif_l_per_kwh']:.3g} L/kWh".ljust(38)
                         + src.get("ewif_l_per_kwh", ""))
            lines.append(f"  Carbon intensity {f['carbon_intensity_g_per_kwh']:.4g} g/kWh".ljust(38)
                         + src.get("carbon_intensity_g_per_kwh", ""))
    if d.get("cpu_power_model") and "modelled" in prov.get("cpu", ""):
        m = d["cpu_power_model"]
        lines.append(f"  CPU TDP {m['tdp_w']:g} W".ljust(38) + m["source"])
    if d.get("idle_power"):
        lines.append("  Idle power".ljust(38) + d["idle_power"]["meaning"])
    lines.append("  Formulas".ljust(38) + "C = E_IT x PUE x CI;  W = E_IT x WUE + E_IT x PUE x EWIF")
    return "\n".join(lines) + "\n"

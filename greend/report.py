"""A job's footprint as a person reads it (text) and as a script reads it (JSON)."""

from __future__ import annotations

import textwrap
import time

from . import units
from .footprint import UJ_PER_J, Factors
from .ledger import JobRow

SCHEMA_VERSION = 1
"""Version of the job-footprint JSON (greend/data/job-footprint.schema.json, docs/json.md)."""

IDLE_RULES = {
    "allocated": "node idle power shared among running jobs by allocated cores",
    "unattributed": "node idle power left unattributed (not charged to jobs)",
}

# How a job ended: its exit code (0 ok, anything else failed) or, for a Slurm job whose exit code
# greend did not record, Slurm's final state (meta.slurm_state). None: running, or not known.
SLURM_OK = "COMPLETED"
SLURM_FAILED = ("BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT")


def slurm_state(row: JobRow) -> str:
    """Slurm's base state for the job ("FAILED", "CANCELLED"...), "" when greend has none."""
    return str((row.meta or {}).get("slurm_state") or "").split(" ", 1)[0].upper()


def outcome_of(row: JobRow) -> str | None:
    """"ok", "failed" or None (running, or the end is not known): the exit code first, then
    Slurm's final state."""
    if row.state == "running":
        return None
    st = slurm_state(row)
    if (row.exit_code is not None and row.exit_code != 0) or st in SLURM_FAILED:
        return "failed"
    if row.exit_code == 0 or st == SLURM_OK:
        return "ok"
    return None


def schema_path():
    """The job-footprint JSON Schema shipped with greend."""
    from importlib.resources import files

    return files("greend") / "data" / "job-footprint.schema.json"


def outcome(row: JobRow) -> str | None:
    """"ok", "failed" (non-zero exit, or a failed Slurm state), or None while unknown: the one rule
    (outcome_of), which the read model's filters apply in SQL too (greend.queries)."""
    return outcome_of(row)


def _sig(x: float, digits: int = 6) -> float:
    """x to `digits` significant digits: the figures' precision, without float noise."""
    return float(f"{x:.{digits}g}") if x else 0.0


def _t(x: float | None) -> float | None:
    return round(x, 3) if x is not None else None


def footprint_dict(row: JobRow, factors: list[Factors] | list[dict], *, cpu_model: dict | None = None,
                   idle_rule: str | None = None, elapsed_s: float | None = None,
                   node_busy: float | None = None) -> dict:
    """A job's footprint in the one job-footprint schema (docs/json.md): `measure --json`,
    `jobs --json` and the API's job records are all this."""
    fs = [f.to_dict() if isinstance(f, Factors) else f for f in factors]
    meta = row.meta or {}
    it_j = row.it_energy_uj / UJ_PER_J
    if elapsed_s is None:
        elapsed_s = (row.end_time or row.last_seen) - row.first_seen
    out = {
        "schema_version": SCHEMA_VERSION,
        "job": {
            "cluster": row.cluster, "job_id": row.job_id, "node": row.node, "kind": row.kind,
            "name": row.name, "user": row.user, "account": row.account,
            "partition": row.partition, "state": row.state, "command": row.command,
            "exit_code": row.exit_code, "outcome": outcome(row),
            "slurm_state": slurm_state(row) or None, "submit_time": row.submit_time,
            "first_seen": _t(row.first_seen), "last_seen": _t(row.last_seen),
            "end_time": _t(row.end_time), "tier": row.tier, "uid": row.uid,
            "alloc_cpus": row.alloc_cpus, "alloc_mem_bytes": row.alloc_mem_bytes,
            "alloc_gpus": row.alloc_gpus, "max_mem_bytes": row.max_mem_bytes,
        },
        "elapsed_s": round(max(0.0, elapsed_s), 3),
        "cpu_time_s": round(row.cpu_time_ns / 1e9, 6),
        "energy_j": {
            "cpu": row.cpu_uj / UJ_PER_J, "dram": row.dram_uj / UJ_PER_J,
            "gpu": row.gpu_uj / UJ_PER_J, "memory": row.memory_uj / UJ_PER_J,
            "it": it_j, "facility": round(row.facility_j, 6),
        },
        "energy_uj": {"cpu": row.cpu_uj, "dram": row.dram_uj, "gpu": row.gpu_uj,
                      "memory": row.memory_uj, "it": row.it_energy_uj},
        "carbon_g": _sig(row.carbon_g),
        "water_l": {"site": _sig(row.water_site_l), "offsite": _sig(row.water_offsite_l),
                    "total": _sig(row.water_site_l + row.water_offsite_l)},
        "provenance": row.provenance or {},
        "factors": fs,
    }
    if meta.get("series_step_s"):
        out["series_step_s"] = meta["series_step_s"]
    if cpu_model:
        out["cpu_power_model"] = cpu_model
    idle_rule = idle_rule or meta.get("idle_rule")
    if idle_rule in IDLE_RULES:
        busy = node_busy if node_busy is not None else meta.get("node_busy")
        out["idle_power"] = {
            "rule": idle_rule, "meaning": IDLE_RULES[idle_rule],
            "energy_j": int(meta.get("idle_uj", 0)) / UJ_PER_J,
            "node_busy": round(busy, 4) if busy is not None else None,
        }
    return out


WIDTH = 80  # the report fits an 80-column terminal: long notes wrap at spaces, never mid-word
_NOTE_COL = 39


def _wrap(first: str, note: str, indent: int = _NOTE_COL) -> list[str]:
    """`first` (padded to indent) followed by `note`, wrapped at WIDTH on word boundaries."""
    if not note:
        return [first.rstrip()]
    lines = textwrap.wrap(note, WIDTH - indent, break_long_words=False, break_on_hyphens=False)
    if any(len(ln) > WIDTH - indent for ln in lines):
        # A word longer than the note column (a URL in a source): never cut it, give the whole
        # note the width below the label instead.
        hang = 4
        lines = textwrap.wrap(note, WIDTH - hang, break_long_words=False, break_on_hyphens=False)
        return [first.rstrip()] + [" " * hang + ln for ln in lines]
    out = [(first.ljust(indent) + lines[0]).rstrip()]
    out += [" " * indent + ln for ln in lines[1:]]
    return out


def text(d: dict) -> str:
    j = d["job"]
    e = d["energy_j"]
    w = d["water_l"]
    prov = d["provenance"]
    what = f"`{j['command']}`" if j.get("command") else f"job {j['cluster']}/{j['job_id']}"
    bits = []
    if j.get("exit_code") is not None:
        bits.append(f"exit {j['exit_code']}" + (" (failed)" if j["exit_code"] else ""))
    bits.append(f"{units.duration(d['elapsed_s'])}")
    if j.get("state") == "running":
        bits.append("running")
    bits.append(f"node {j['node']}, cluster {j['cluster']}")
    lines = textwrap.wrap(f"greend: footprint of {what} ({', '.join(bits)})", WIDTH,
                          break_long_words=False, break_on_hyphens=False,
                          subsequent_indent="    ")
    lines.append("")

    def row(label, value, note=""):
        lines.extend(_wrap(f"  {label:<20}{value:>14}   ", note))

    row("IT energy", units.energy(e["it"]), f"= {units.energy_wh(e['it'])}")
    for src, label in (("cpu", "CPU"), ("dram", "DRAM"), ("memory", "Memory"), ("gpu", "GPU")):
        if e[src] or src in prov:
            row(f"  {label}", units.energy(e[src]), prov.get(src, ""))
    idle = d.get("idle_power")
    if idle and idle.get("energy_j") is not None:
        busy = idle.get("node_busy")
        row("  of which idle", units.energy(idle["energy_j"]),
            (f"node busy {busy * 100:.0f} %, " if busy is not None else "")
            + f"idle rule `{idle['rule']}`")
    fs = d["factors"]
    pue_note = (f"IT energy x PUE {fs[-1]['pue']:g}" if len(fs) == 1 else
                f"IT energy x PUE over {len(fs)} factor sets") if fs else ""
    row("Facility energy", units.energy(e["facility"]), pue_note)
    row("Carbon", units.carbon(d["carbon_g"]), "location-based")
    row("Water", units.water(w["total"]),
        f"on-site {units.water(w['site'])}, off-site {units.water(w['offsite'])}")
    row("CPU time", units.duration(d["cpu_time_s"]))
    if j.get("max_mem_bytes"):
        row("Peak memory", units.size(j["max_mem_bytes"]), "resident")
    if fs:
        lines += ["", "Assumptions"]
        for f in fs:
            if len(fs) > 1 and "first_used" in f:
                since = time.strftime("%Y-%m-%d %H:%M", time.localtime(f["first_used"]))
                lines.append(f"  factors in force from {since}")
            src = f.get("sources", {})
            lines += _wrap(f"  PUE {f['pue']:g}", src.get("pue", ""))
            lines += _wrap(f"  WUE on-site {f['wue_site_l_per_kwh']:g} L/kWh",
                           src.get("wue_site_l_per_kwh", ""))
            lines += _wrap(f"  EWIF off-site {f['ewif_l_per_kwh']:.3g} L/kWh",
                           src.get("ewif_l_per_kwh", ""))
            lines += _wrap(f"  Carbon intensity {f['carbon_intensity_g_per_kwh']:.4g} g/kWh",
                           src.get("carbon_intensity_g_per_kwh", ""))
    if d.get("cpu_power_model") and "modelled" in prov.get("cpu", ""):
        m = d["cpu_power_model"]
        lines += _wrap(f"  CPU TDP {m['tdp_w']:g} W", m["source"])
    if idle:
        lines += _wrap("  Idle power", idle["meaning"])
    lines += _wrap("  Formulas", "C = E_IT x PUE x CI;")
    lines += _wrap("", "W = E_IT x WUE + E_IT x PUE x EWIF")
    return "\n".join(lines) + "\n"

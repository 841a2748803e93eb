"""Right-sizing advice from what a finished Slurm job asked for and what it used."""

from __future__ import annotations

import math

from greend.ledger import JobRow

GIB = 2**30
MIN_ELAPSED_S = 60.0  # below a minute, start-up dominates and averages say little
LOW_USE = 0.5  # advise when less than half of a request was used


def _gib(b: float) -> str:
    return f"{b / GIB:.1f} GiB" if b < 10 * GIB else f"{b / GIB:.0f} GiB"


def right_sizing(row: JobRow, elapsed_s: float) -> list[str]:
    """Advice lines; empty when the job used what it asked for, or when there is nothing to judge."""
    if row.kind != "slurm" or row.state == "running" or elapsed_s < MIN_ELAPSED_S:
        return []
    out = []
    cpus = row.alloc_cpus or 0
    if cpus >= 2 and row.cpu_time_ns:
        busy = row.cpu_time_ns / 1e9 / elapsed_s
        if busy / cpus < LOW_USE:
            suggest = max(1, math.ceil(busy * 1.2))
            out.append(
                f"CPU: on average {busy:.1f} of the {cpus:g} allocated CPUs were busy "
                f"({busy / cpus:.0%}). Asking for {suggest} would likely do: idle allocated "
                "cores keep other jobs off the node and their idle power can be charged to you."
            )
    alloc = row.alloc_mem_bytes or 0
    if alloc >= 2 * GIB and row.max_mem_bytes and row.max_mem_bytes / alloc < LOW_USE:
        suggest = math.ceil(row.max_mem_bytes * 1.2 / GIB) * GIB
        why = ("greend's memory model charges memory by the amount requested"
               if (row.provenance or {}).get("memory", "").startswith("modelled")
               else "unused memory keeps other jobs off the node")
        out.append(
            f"Memory: peak {_gib(row.max_mem_bytes)} of {_gib(alloc)} requested "
            f"({row.max_mem_bytes / alloc:.0%}). Asking for about {_gib(suggest)} (--mem) "
            f"would do: {why}."
        )
    return out

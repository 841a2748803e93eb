"""`%load_ext greend`, then `%%greend [NAME] [--project P] [--json]` on a notebook cell: the cell
runs inside a greend run and its footprint is printed below it (docs/python.md)."""

from __future__ import annotations

import argparse
import json
import shlex

from greend import units


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a usage error is the magic's message, never a traceback
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="%%greend", add_help=False,
                description="Run the cell inside a greend run and print its footprint.")
    p.add_argument("name", nargs="?", default=None, help="the run's name (default: cell)")
    p.add_argument("--project", default=None, help="the project the run is booked to")
    p.add_argument("--json", action="store_true", help="print the footprint as job-footprint JSON")
    return p


USAGE = "usage: %%greend [NAME] [--project PROJECT] [--json]"


def summary(fp) -> str:
    """A footprint in a few lines, for a person reading a notebook."""
    lines = [
        f"greend: {fp.name}: {fp.elapsed_s:.3g} s, source {fp.source} ({fp.provenance})",
        f"  energy  IT {units.energy(fp.it_energy_j)}, facility {units.energy(fp.facility_energy_j)}",
        f"  carbon  {units.carbon(fp.carbon_g)}",
        f"  water   on-site {units.water(fp.water_site_l)}, off-site {units.water(fp.water_offsite_l)}",
    ]
    if fp.degraded:
        lines.append(f"  degraded: {', '.join(fp.degraded)}")
    return "\n".join(lines)


def greend_magic(line: str, cell: str, shell) -> None:
    """The body of `%%greend`; `shell` is the IPython shell running the cell."""
    from IPython.core.error import UsageError

    try:
        opts = _parser().parse_args(shlex.split(line))
    except ValueError as exc:
        raise UsageError(f"%%greend: {exc}\n{USAGE}") from None
    from greend.track import track

    run = track(opts.name or "cell", project=opts.project)
    with run:
        result = shell.run_cell(cell)
    fp = run.footprint
    shell.user_ns["_greend"] = fp  # the last cell's Footprint, for code that wants the figures
    print(json.dumps(fp.to_dict(), indent=2) if opts.json else summary(fp))
    if not result.success:
        # The cell's traceback is shown already: fail this cell too, as it would have failed alone
        # (`jupyter nbconvert --execute` stops there), with one line rather than a second traceback.
        err = result.error_in_exec or result.error_before_exec
        raise UsageError(f"%%greend: the cell failed ({type(err).__name__}); its footprint is above")


def load_ipython_extension(ip) -> None:
    """Called by `%load_ext greend` (greend/__init__.py forwards the name here)."""

    def greend(line: str, cell: str) -> None:
        greend_magic(line, cell, ip)

    greend.__doc__ = f"{USAGE}\n\nRun the cell inside a greend run and print its footprint: IT and " \
        "facility energy, carbon, on-site and off-site water, source and provenance. The Footprint is " \
        "left in `_greend`."
    ip.register_magic_function(greend, magic_kind="cell", magic_name="greend")

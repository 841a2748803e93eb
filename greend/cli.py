"""The `greend` command line. Heavy modules are imported inside the commands that need them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .cmdline import EXIT_USAGE, fail, load_config, pause_gc, resume_gc
from .errors import GreendError

log = logging.getLogger("greend")

DESCRIPTION = """\
greend measures the energy, carbon and water footprint of compute jobs and routes jobs to the most
frugal cluster tier. Figures follow docs/methodology.md; every one says whether it was measured
(RAPL, NVML) or modelled (TDP, memory model) and which factors (PUE, WUE, EWIF, carbon
intensity) were applied, with their sources.
"""

EPILOG = """\
Files and environment:
  config      --config FILE, else $GREEND_CONFIG, else (not as root)
              $XDG_CONFIG_HOME/greend/greend.toml (~/.config/greend/greend.toml), else
              /etc/greend/greend.toml; without any, the embedded default monitors this machine
              as a one-node cluster "local". `greend config check` says which file is in force.
  state       --state-dir DIR, $GREEND_STATE_DIR, or state_dir in the config; default
              /var/lib/greend as root, else $XDG_STATE_HOME/greend (~/.local/state/greend).

Exit status: 0 success; 2 bad usage, configuration or state directory; `measure` exits with the
command's own status (127 not found, 126 not executable, 128+N killed by signal N).
"""


def _number(kind, lo: float, hi: float, what: str, *, lo_open: bool = False):
    """An argparse type: a finite number in [lo, hi] ((lo, hi] with lo_open), or a clear error."""

    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if x != x or x in (float("inf"), float("-inf")) or x > hi or x < lo or (lo_open and x == lo):
            raise argparse.ArgumentTypeError(
                f"expected {what} {'above' if lo_open else 'from'} {lo:g} up to {hi:g}, got {text!r}")
        return x

    return parse


_fail = fail  # the names the command modules used before greend.cmdline
_load_config = load_config


def _open_ledger(cfg, readonly: bool = False):
    from .ledger import Ledger, default_path

    state = cfg.resolved_state_dir()
    return Ledger(default_path(state), readonly=readonly)


# -- measure ----------------------------------------------------------------------------------
def cmd_measure(args) -> int:
    from . import measure, report
    from .ledger import LedgerError

    argv = args.command
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        return _fail("measure: no command given (usage: greend measure [options] -- CMD ARGS...)")
    cfg = _load_config(args, fast=True)  # the cached view when current: no pydantic
    updates = {}
    if args.interval is not None:
        updates["sampling"] = cfg.sampling.model_copy(update={"measure_interval_s": args.interval})
    if args.idle:
        updates["attribution"] = cfg.attribution.model_copy(update={"idle_power": args.idle})
    if updates:
        cfg = cfg.model_copy(update=updates)
    ledger = None
    if not args.no_ledger:
        try:
            ledger = _open_ledger(cfg)
        except LedgerError as e:
            return _fail(f"measure: {e} (or use --no-ledger to only print the footprint)")
    live = sys.stderr.isatty() and not args.quiet
    try:
        res = measure.run(cfg, argv, ledger, live=live)
    except measure.MeasureError as e:
        print(f"greend: measure: {e}", file=sys.stderr)
        return e.status
    factors = ledger.factor_sets_of(res.row.pk) if ledger and res.row.pk else []
    if not factors:  # nothing was attributed (an instant command): show the factors in force
        factors = [res.monitor.factors.at(time.time())]
    cm = res.monitor.cpu_model
    d = report.footprint_dict(
        res.row, factors, cpu_model={"tdp_w": cm.tdp_w, "model": cm.model, "source": cm.source},
        idle_rule=cfg.attribution.idle_power, elapsed_s=res.elapsed_s, node_busy=res.node_busy,
    )
    d["ledger"] = str(ledger.path) if ledger else None
    if res.orphans_left:
        d["note"] = (f"{res.orphans_left} background process(es) started by the command were "
                     "still running when it exited; they were measured until then")
    out = json.dumps(d, indent=2) + "\n" if args.json else report.text(d)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(out)
        except OSError as e:
            print(f"greend: measure: cannot write {args.output}: {e.strerror}", file=sys.stderr)
            sys.stderr.write(out)
    elif not args.quiet or args.json:
        sys.stderr.write(out)
        if d.get("note") and not args.json:
            sys.stderr.write(f"note: {d['note']}\n")
    if ledger:
        ledger.close()
    return res.exit_code


# -- config -----------------------------------------------------------------------------------
def cmd_config_check(args) -> int:
    from . import config as config_mod
    from . import forward
    from .errors import SiteError
    from .wire import check_files

    if args.file:
        path, why = Path(args.file), "named on the command line"
    else:
        path, why = config_mod.locate(args.config)
    cfg = config_mod.load(path)
    warnings = _carbon_warnings(cfg, args.horizon_h, args.refresh_carbon)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    try:
        check_files(cfg)  # what `greend run` and `greend controller` would refuse at start
        forward.check_files(cfg.controller)
    except SiteError as e:
        return _fail(f"config check: {path or 'embedded default'}: {e}")
    if args.json:
        data = cfg.model_dump(mode="json")
        data["resolved"] = _resolved(cfg)
        data["resolved"]["config_file"] = {"path": str(path) if path else None, "why": why}
        data["warnings"] = warnings
        print(json.dumps(data, indent=2))
    else:
        print(f"# configuration file in force: {path} ({why})" if path
              else f"# configuration file in force: none: {why}")
        print(f"# effective configuration ({path or 'embedded default'})")
        print(config_mod.to_toml(cfg), end="")
        print("\n# resolved at start")
        for k, v in _resolved(cfg).items():
            print(f"# {k}: {json.dumps(v)}")
    return 0


def _carbon_warnings(cfg, horizon_h: float, force: bool) -> list[str]:
    """Carbon signals that cannot be read, series and forecasts that do not cover now .. +horizon."""
    from .carbon_feed import coverage_warnings

    return coverage_warnings(cfg, time.time(), horizon_h * 3600, force=force)


def _resolved(cfg) -> dict:
    from .carbon_feed import live_factors
    from .monitor import cpu_power_model

    f = live_factors(cfg, fetch=False).at(time.time())  # the live signal as cached by the check
    cm = cpu_power_model(cfg)
    return {
        "node": cfg.node_name, "state_dir": str(cfg.resolved_state_dir()),
        "factors": f.to_dict(),
        "cpu_power_model": {"tdp_w": cm.tdp_w, "model": cm.model, "source": cm.source},
    }


# -- jobs -------------------------------------------------------------------------------------
def cmd_jobs(args) -> int:
    from . import report
    from .ledger import LedgerError

    cfg = _load_config(args)
    try:
        ledger = _open_ledger(cfg, readonly=True)
    except LedgerError as e:
        return _fail(f"jobs: {e}")
    if args.job:
        cluster, _, job_id = args.job.rpartition("/")
        rows = ledger.get_job(cluster or cfg.cluster, job_id)
        if not rows:
            return _fail(f"jobs: no job {args.job!r} in {ledger.path}", 1)
        out = [_with_phases(ledger, r, report.footprint_dict(r, ledger.factor_sets_of(r.pk)))
               for r in rows]
        if args.json:
            print(json.dumps(out if len(out) > 1 else out[0], indent=2))
        else:
            print("\n".join(report.text(d) + _phases_text(d) for d in out), end="")
        return 0
    since = time.time() - args.since_hours * 3600 if args.since_hours else None
    user = None if args.all_users else (args.user or _me())
    from . import queries

    # One read model (greend/queries.py): the same filters and outcome as the API and the TUI.
    page = queries.job_page(ledger.db, queries.JobQuery(
        user=user, state=args.state, cluster=args.cluster, since=since, outcome=args.outcome,
        limit=args.limit, per="record"), time.time())
    rows = page.jobs
    if args.json:
        print(json.dumps([_with_phases(ledger, r, report.footprint_dict(r, ledger.factor_sets_of(r.pk)))
                          for r in rows], indent=2))
        return 0
    if not rows:
        print(f"no jobs{' of ' + user if user else ''} in {ledger.path}")
        return 0
    stale_s = max(120.0, 2 * cfg.sampling.checkpoint_interval_s)
    for line in jobs_table(rows, cfg.cluster, show_user=user is None or user != _me(),
                           stale_s=stale_s, now=time.time()):
        print(line)
    return 0


def _with_phases(ledger, row, d: dict) -> dict:
    """A record's JSON with its phases (greend.track's run.phase), when it has any."""
    from . import phases

    ph = phases.of_job(ledger.db, row.pk)
    if ph:
        d["phases"] = ph
    return d


def _phases_text(d: dict) -> str:
    """A record's phases under its report (greend.track's run.phase), one line each."""
    from . import units as u

    lines = [f"\nPhases\n  {'PHASE':28s} {'ELAPSED':>9s} {'IT ENERGY':>10s} {'CO2E':>11s} "
             f"{'WATER':>9s}"] if d.get("phases") else []
    for p in d.get("phases", []):
        el = u.duration(p["elapsed_s"]) if p["elapsed_s"] is not None else "open"
        lines.append(f"  {p['name'][:28]:28s} {el:>9s} {u.energy(p['energy_j']['it']):>10s} "
                     f"{u.carbon(p['carbon_g']):>11s} {u.water(p['water_l']['total']):>9s}")
    return "\n".join(lines) + "\n" if lines else ""


def jobs_table(rows, cluster: str, *, show_user: bool, stale_s: float, now: float) -> list[str]:
    """The `greend jobs` table, 80 columns wide. A running record not written for stale_s says
    when it was last seen (its monitor stopped without closing it)."""
    from . import report
    from . import units as u

    head = (f"{'JOB':<21} {'STATE':<10} {'EXIT':>4} {'ELAPSED':>8} {'IT ENERGY':>9} {'CO2E':>8} "
            f"{'WATER':>8} ")
    width = 80 - len(head)
    out = [head + ("USER" if show_user else "NAME")]
    for r in rows:
        job = r.job_id if r.cluster == cluster else f"{r.cluster}/{r.job_id}"
        if len(job) > 21:
            job = job[:20] + "…"
        state = r.state
        if state == "running" and now - r.last_seen > stale_s:
            state = "seen " + time.strftime("%H:%M", time.localtime(r.last_seen))
        oc = report.outcome(r)
        code = str(r.exit_code) if r.exit_code is not None else {"ok": "ok", "failed": "fail"}.get(
            oc or "", "")
        el = (r.end_time or r.last_seen) - r.first_seen
        last = r.user if show_user else r.name
        if len(last) > width:
            last = last[:width - 1] + "…"
        out.append(f"{job:<21} {state:<10} {code:>4} {u.duration(el):>8} "
                   f"{u.energy(r.it_energy_uj / 1e6):>9} {u.carbon(r.carbon_g, unit=False):>8} "
                   f"{u.water(r.water_site_l + r.water_offsite_l):>8} {last}".rstrip())
    return out


def _me() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


# -- parser -----------------------------------------------------------------------------------
def _positive_hours(v: str) -> float:
    try:
        h = float(v)
    except ValueError:
        h = -1.0
    if not 0 < h <= 24 * 366:
        raise argparse.ArgumentTypeError(f"expected a number of hours > 0, got {v!r}")
    return h


# Which module registers each command, so that a command line builds (and imports) only its own
# command's parser: every other command module costs start-up time (docs/performance.md).
# tests/test_cli_startup.py checks this against the full parser.
COMMAND_MODULES = {
    "measure": "greend.cli", "config": "greend.cli", "jobs": "greend.cli",
    "run": "greend.daemon_cli", "controller": "greend.daemon_cli", "metrics-doc": "greend.daemon_cli",
    "report": "greend.slurm_acct_cli", "slurm": "greend.slurm_acct_cli",
    "slurmd-hook": "greend.slurmd_hook",
    "estimate": "greend.policies.cli", "route": "greend.policies.cli", "submit": "greend.policies.cli",
    "tui": "greend.tui.cli",
    "completion": "greend.clidoc", "man": "greend.clidoc", "share": "greend.clidoc",
}
_DESCRIBE_ALL = ("completion", "man")  # these describe the whole parser: they always get it
_VALUE_OPTIONS = ("--config", "--state-dir")  # the root options that take a value


def command_of(argv: list[str]) -> str | None:
    """The command an argument list names (its first word after the root options), or None when
    it names none or the root options cannot be told apart from it without the full parser."""
    it = iter(argv)
    for a in it:
        if a == "--":
            return None
        if a.startswith("--"):
            # argparse takes unambiguous prefixes: --conf FILE is --config FILE
            if "=" not in a and len(a) > 2 and any(o.startswith(a) for o in _VALUE_OPTIONS):
                next(it, None)
            continue
        if a.startswith("-") and len(a) > 1:
            flags = a[1:]
            for i, ch in enumerate(flags):
                if ch == "c":  # -c FILE, -cFILE, -vc FILE
                    if i == len(flags) - 1:
                        next(it, None)
                    break
                if ch != "v":
                    return None  # -h, --version and the like: the full parser answers
            continue
        return a
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """greend's parser: with every command, or only with `command` (one of COMMAND_MODULES)."""
    only = None if command in _DESCRIBE_ALL else COMMAND_MODULES.get(command or "")
    p = argparse.ArgumentParser(
        prog="greend", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"greend {__version__}")
    p.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--state-dir", metavar="DIR", help="where the ledger lives")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    if only is None or only == "greend.cli":
        _add_commands(sub)
    # Other packages register their own commands; each keeps its heavy imports inside them.
    if only is None:
        from greend.policies import cli as policies_cli
        from greend.tui import cli as tui_cli

        from . import clidoc, daemon_cli, slurm_acct_cli, slurmd_hook

        for module in (daemon_cli, slurm_acct_cli, slurmd_hook, policies_cli, tui_cli, clidoc):
            module.add_commands(sub)
    elif only != "greend.cli":
        import importlib

        importlib.import_module(only).add_commands(sub)
    p.set_defaults(root_parser=p)  # `greend completion` and `greend man` describe this parser
    return p


def _add_commands(sub) -> None:
    m = sub.add_parser(
        "measure", help="run a command and print its energy, carbon and water footprint",
        description="Run CMD, sample this node while it runs, and print the command's footprint "
        "when it ends: energy by source (CPU, DRAM or memory model, GPU), facility energy, "
        "carbon and water, with the factors used and their sources. The report goes to "
        "standard error (or --output FILE), so the command's own output is untouched. The "
        "command is recorded in the ledger unless --no-ledger. The exit status is the "
        "command's.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  greend measure -- python train.py --epochs 3\n"
        "  greend measure --json -o footprint.json -- make -j2",
    )
    m.add_argument("--json", action="store_true", help="report as JSON")
    m.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE")
    m.add_argument("-q", "--quiet", action="store_true", help="no live line, no text report")
    m.add_argument("--no-ledger", action="store_true", help="do not record the run in the ledger")
    m.add_argument("--interval", type=_number(float, 0, 3600, "a number of seconds", lo_open=True),
                   metavar="S",
                   help="sampling period in seconds (default: sampling.measure_interval_s, 1)")
    m.add_argument("--idle", choices=["allocated", "unattributed"],
                   help="how the node's idle power is charged: allocated = the command's share "
                   "for the CPUs it may run on, even while it sleeps; unattributed = none, only "
                   "what it adds by running (default: attribution.idle_power). The report shows "
                   "the idle part and the rule")
    m.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    m.set_defaults(func=cmd_measure)

    c = sub.add_parser("config", help="check and print configuration")
    csub = c.add_subparsers(dest="config_cmd", metavar="ACTION")
    cc = csub.add_parser(
        "check", help="validate a config file and print the effective configuration",
        description="Validate FILE (or the file in force: --config, $GREEND_CONFIG, "
        "~/.config/greend/greend.toml, /etc/greend/greend.toml, or the embedded default), say "
        "which file that is, and "
        "print the effective configuration with defaults filled in, plus what is resolved at "
        "start: node name, state directory, factors with their sources, CPU power model. Exits "
        "2 with the file, key and expected value on an error. Warns (on standard error; in "
        "\"warnings\" with --json) when a cluster's carbon_signal cannot be read (it is fetched, "
        "within its timeout_s, unless the cache is fresh) or when its signal or "
        "carbon_intensity_series does not cover now .. +HORIZON.",
    )
    cc.add_argument("file", nargs="?", help="config file to check")
    cc.add_argument("--horizon-h", type=_positive_hours, default=24.0, metavar="HOURS",
                    help="how far ahead a carbon series or forecast should reach (default: 24)")
    cc.add_argument("--refresh-carbon", action="store_true",
                    help="fetch every carbon_signal now, ignoring a fresh cache and retry_s, and "
                    "update the cache that decisions read")
    cc.add_argument("--json", action="store_true", help="print as JSON")
    cc.set_defaults(func=cmd_config_check)
    c.set_defaults(func=lambda a: (c.print_help(), 0)[1])

    j = sub.add_parser(
        "jobs", help="list jobs and their footprints from the ledger",
        description="List jobs recorded in this node's ledger (yours by default), newest first, "
        "or show one job's footprint with `greend jobs CLUSTER/JOBID`. EXIT is the exit status "
        "(ok/fail from Slurm's final state when there is none); a running record not updated "
        "for a while shows when it was last seen (STATE 'seen HH:MM').",
    )
    j.add_argument("job", nargs="?", help="show one job: CLUSTER/JOBID or JOBID")
    j.add_argument("--user", help="jobs of USER (default: you)")
    j.add_argument("--all-users", action="store_true", help="jobs of every user")
    j.add_argument("--cluster")
    j.add_argument("--state", choices=["running", "ended"])
    j.add_argument("--outcome", choices=["ok", "failed"],
                   help="only jobs that succeeded (exit 0, Slurm COMPLETED) or failed (non-zero "
                   "exit, killed, or a failed Slurm state)")
    j.add_argument("--since-hours", type=_number(float, 0, 1e6, "a number of hours", lo_open=True),
                   metavar="H", help="only jobs seen in the last H hours")
    j.add_argument("--limit", type=_number(int, 1, 100000, "a whole number of jobs"), default=50,
                   help="at most N jobs (default 50)", metavar="N")
    j.add_argument("--json", action="store_true",
                   help="one job-footprint record per job (docs/json.md)")
    j.set_defaults(func=cmd_jobs)


def install_policy_checks() -> None:
    """Let configuration loading check each [[policy.rules]] entry against the policy engine's
    rules (an unknown rule or parameter is an error naming its key when the file is read). The
    rule classes are imported only when a configuration names rules."""
    from . import wiring

    def check(spec) -> None:
        from greend.policies.registry import instantiate

        instantiate(spec, None)

    wiring.rule_checker = check


def main(argv: list[str] | None = None) -> int:
    pause_gc()  # until the command runs (the TUI: until its first page is painted)
    try:
        return _main(argv)
    finally:
        resume_gc()


def _main(argv: list[str] | None) -> int:
    install_policy_checks()
    command = command_of(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command if command in COMMAND_MODULES else None)
    args = parser.parse_args(argv)
    from .logsetup import setup

    setup(args.verbose, daemon=getattr(args, "cmd", None) in ("run", "controller"))
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if args.func.__module__ == "greend.tui.cli":
        # The composition root: the TUI's ledger source shows the clusters' load and queue from the
        # policy engine's state cache (the TUI does not import the policies).
        from greend.tui import data as tui_data

        from .daemon_cli import live_load_provider

        tui_data.live_load_provider = live_load_provider(
            getattr(args, "config", None) or os.environ.get("GREEND_CONFIG"))
    else:
        resume_gc()  # every other command collects as usual once it runs
    try:
        return args.func(args)
    except GreendError as e:  # ConfigError, LedgerError, ...: a message for the person, no traceback
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

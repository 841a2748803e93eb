"""Command-line entry points of the policy engine (`greend estimate`, `route`, `submit`).

Only argparse is needed to register them; the engine is imported when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USAGE = 2

_REQUEST_HELP = """\
The job is described by SCRIPT's #SBATCH and #GREEND lines (read as sbatch reads them: up to the
first command) and by the options below, which win over the script's, as with sbatch.
#GREEND lines carry greend's own options: --data-class=CLASS (e.g. hds), --deadline=TIME,
--deferrable, --data=STORE[,STORE], --interactive, --debug.
"""

_EXIT_HELP = """\
exit status: 0 routed (submit: submitted); 1 no cluster can take the job, or refused by a budget
(submit: or sbatch failed); 2 bad usage, configuration or script; 75 (submit) sbatch timed out and
the controller cannot tell whether the job was queued (the message says how to check).
See docs/policy.md for the rules, their configuration and the explanation format.
"""

# (flags, sbatch long name, metavar, help); all are passed on to sbatch unchanged.
_SBATCH_OPTIONS = [
    (("-J", "--job-name"), "job-name", "NAME", "job name (history of similar jobs is by name)"),
    (("-A", "--account"), "account", "ACCOUNT", "project (Slurm account)"),
    (("-p", "--partition"), "partition", "PART", "preferred partition(s)"),
    (("-q", "--qos"), "qos", "QOS", "quality of service"),
    (("-t", "--time"), "time", "TIME", "walltime ([D-]HH:MM:SS, minutes, 2h)"),
    (("-N", "--nodes"), "nodes", "N", "nodes"),
    (("-n", "--ntasks"), "ntasks", "N", "tasks"),
    (("-c", "--cpus-per-task"), "cpus-per-task", "N", "CPUs per task"),
    (("--mem",), "mem", "SIZE", "memory per node (MB, or 8G)"),
    (("--mem-per-cpu",), "mem-per-cpu", "SIZE", "memory per CPU"),
    (("-G", "--gpus"), "gpus", "[TYPE:]N", "GPUs for the job"),
    (("--gres",), "gres", "LIST", "generic resources per node (gpu[:TYPE]:N)"),
    (("-a", "--array"), "array", "SPEC", "job array (0-9, 1,3,5%%2)"),
]
_GREEND_OPTIONS = [
    (("--data-class",), "data-class", "CLASS", "class of the data the job reads (hds: health data)"),
    (("--deadline",), "deadline", "TIME", "the job must end by then (ISO time, +12h)"),
    (("--data",), "data", "STORE[,STORE]", "data stores the job reads (for data locality)"),
]
_GREEND_FLAGS = [
    ("--deferrable", "deferrable", "the job may start later, in a lower-carbon window before its deadline"),
    ("--interactive", "interactive", "an interactive job"),
    ("--debug", "debug", "a debug job"),
]


def _add_request_options(p: argparse.ArgumentParser, script_required: bool) -> None:
    if script_required:
        p.add_argument("script", metavar="SCRIPT", help="batch script (#!... with #SBATCH lines)")
    else:
        p.add_argument("script", metavar="SCRIPT", nargs="?", help="batch script (optional: the "
                       "options alone can describe the job)")
    g = p.add_argument_group("job options (as sbatch's; passed on to sbatch)")
    for flags, name, metavar, help_ in _SBATCH_OPTIONS:
        g.add_argument(*flags, dest=f"opt_{name}", metavar=metavar, help=help_)
    g2 = p.add_argument_group("greend's job options (as #GREEND lines)")
    for flags, name, metavar, help_ in _GREEND_OPTIONS:
        g2.add_argument(*flags, dest=f"opt_{name}", metavar=metavar, help=help_)
    for flag, name, help_ in _GREEND_FLAGS:
        g2.add_argument(flag, dest=f"opt_{name}", action="store_const", const="", help=help_)
    o = p.add_argument_group("output and state")
    o.add_argument("--cluster", metavar="NAME[,NAME]", help="consider only these clusters (the rules "
                   "still apply to them)")
    o.add_argument("--json", action="store_true", help="print the decision as JSON")
    o.add_argument("--no-live", action="store_true",
                   help="decide without asking the clusters' Slurm (no queue, no reachability)")
    o.add_argument("--refresh", action="store_true", help="ask the clusters now, ignoring cached state")


def _cli_options(args) -> list[tuple[str, str | None]]:
    out = []
    for _, name, _, _ in _SBATCH_OPTIONS + _GREEND_OPTIONS:
        v = getattr(args, f"opt_{name}", None)
        if v is not None:
            out.append((name, v))
    for _, name, _ in _GREEND_FLAGS:
        if getattr(args, f"opt_{name}", None) is not None:
            out.append((name, None))
    return out


def _para(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=100) + "\n\n"


def add_commands(sub) -> None:
    """Register this package's subcommands on greend's argparse subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    e = sub.add_parser(
        "estimate", help="estimate a job's energy, carbon and water on each cluster before it runs",
        description=_para("Estimate the footprint of a job on every configured cluster, before it runs: "
        "Green Algorithms' model (cores x W/core x usage + GB x W/GB + GPUs x TDP) over the walltime, "
        "x PUE, then carbon and water with each cluster's factors; corrected by the measured history "
        "of your similar jobs (same job name) in the ledger when there is some.") + _REQUEST_HELP,
        epilog="example:\n  greend estimate job.sh\n  greend estimate -c 8 --mem 32G -t 4:00:00 --json",
        formatter_class=fmt,
    )
    _add_request_options(e, script_required=False)
    e.set_defaults(func=cmd_estimate)

    r = sub.add_parser(
        "route", help="decide where a job should run, and explain why",
        description=_para("Apply the site's routing rules (docs/policy.md) to a job and print the "
        "decision: the chosen cluster and partition, every rule's verdict on every cluster with its "
        "numbers, the estimated footprint on each cluster, and what `greend submit` would add to sbatch "
        "(--begin, --nice). Nothing is submitted.") + _REQUEST_HELP,
        epilog="examples:\n  greend route job.sh\n  greend route --json job.sh | jq .summary\n"
        "  greend route -c 4 -t 30:00 --data-class hds\n\n" + _EXIT_HELP,
        formatter_class=fmt,
    )
    _add_request_options(r, script_required=False)
    r.add_argument("--at", metavar="TIME", help="decide as if it were TIME (what-if; budgets, windows)")
    c = r.add_argument_group("Slurm cli_filter integration (docs/policy.md)")
    c.add_argument("--sbatch-json", metavar="FILE", help="take the job's options from FILE ('-': standard "
                   "input), as a cli_filter's slurm.json_cli_options() writes them")
    c.add_argument("--cli-filter", metavar="CLUSTER", help="answer for a cli_filter running on CLUSTER: "
                   "key=value lines (verdict, cluster, message, set OPTION=VALUE), exit status 0 unless "
                   "the arguments are wrong")
    r.set_defaults(func=cmd_route)

    s = sub.add_parser(
        "submit", help="route a job, then sbatch it on the chosen cluster",
        description=_para("Route SCRIPT as `greend route` does, then run sbatch on the chosen cluster "
        "(with that cluster's SLURM_CONF, as you: greend never submits on anyone else's behalf). The "
        "decision is recorded in the ledger with the job id. If that cluster's controller does not "
        "answer, the next eligible cluster is tried, and greend says so. A unique token in --comment "
        "guarantees the job is never submitted twice.") + _REQUEST_HELP,
        epilog="example:\n  greend submit job.sh\n  greend submit --deferrable --deadline +12h job.sh\n\n"
        + _EXIT_HELP,
        formatter_class=fmt,
    )
    _add_request_options(s, script_required=True)
    s.add_argument("--dry-run", action="store_true", help="decide and show the sbatch command only")
    s.set_defaults(func=cmd_submit)


# -- running ------------------------------------------------------------------------------------
def _fail(msg: str, status: int = EXIT_USAGE) -> int:
    print(f"greend: {msg}", file=sys.stderr)
    return status


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _setup(args, *, live: bool):
    """(engine, site, config) for this command line."""
    from greend.cmdline import load_config
    from greend.ledger import default_path

    from .engine import Engine
    from .history import LedgerView
    from .site import compile_site
    from .state import StateCache

    # The file in force as every command finds it (--config, $GREEND_CONFIG, ~/.config, /etc) and
    # --state-dir beating the environment: greend.cmdline.load_config.
    # fast: the cached view of the validated configuration when current (greend.config_cache).
    cfg = load_config(args, fast=True)
    path = args.config
    site = compile_site(cfg, path)
    ledger_path = site.settings.ledger or default_path(cfg.resolved_state_dir())
    ledger = LedgerView(ledger_path, site)
    if cfg.policy.history_from == "sacct":
        ledger.sacct = _sacct_history(site, cfg.cluster)
    states = None
    if live and site.settings.live_state and not args.no_live:
        cache_path = site.settings.state_cache or _cache_dir() / "cluster-state.json"
        states = StateCache(site.clusters, site.settings.state_max_age_s, cache_path)
        if not args.refresh:
            states.load()
    return Engine(site, ledger=ledger, states=states), site, cfg, ledger_path


def _sacct_history(site, cluster: str):
    """Slurm's accounting as the policy engine's history (policy.history_from = "sacct"), read with
    this cluster's Slurm access: every cluster of its slurmdbd."""
    from greend.collectors.sacct import Sacct

    from .history_sacct import SacctHistory

    spec = site.by_name.get(cluster) or site.clusters[0]
    return SacctHistory(Sacct(spec.slurm.conf, spec.slurm.bin_dir), site, None)


def _cache_dir():
    from pathlib import Path

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "greend"


def _decide(args, *, live: bool, now: float | None = None):
    from .request import RequestError, build_request

    engine, site, _, ledger_path = _setup(args, live=live)
    import time

    now = time.time() if now is None else now
    at = getattr(args, "at", None)
    if at:
        from greend import quantities as q

        try:
            now = q.parse_time_point(at, now)
        except ValueError as e:
            raise RequestError(f"--at: {e}") from None
    only = None
    if getattr(args, "cluster", None):
        only = frozenset(n.strip() for n in args.cluster.split(",") if n.strip())
        for name in only:
            site.cluster(name)  # an unknown name is a clear error, not an empty decision
    script, options = args.script, _cli_options(args)
    if getattr(args, "sbatch_json", None):
        script, more = _sbatch_json(args.sbatch_json)
        options = more + options
    req = build_request(script, options, user=_user(), now=now)
    decision = engine.decide(req, now=now, only=only)
    if engine.states is not None:
        engine.states.save()
    return engine, decision, ledger_path


def _sbatch_json(path: str) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(script, options) of a cli_filter's JSON: {"time": "00:10:00", "argv": ["job.sh"], ...}."""
    import json

    from .request import RequestError

    where = "standard input" if path == "-" else path
    try:
        from pathlib import Path

        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
    except OSError as e:
        raise RequestError(f"{where}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise RequestError(f"{where}: not JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(f"{where}: expected a JSON object of sbatch options")
    from .route_service import sbatch_options

    return sbatch_options(data)


def _run(args, body) -> int:
    from greend.errors import ConfigError

    from .request import RequestError

    try:
        return body()
    except RequestError as e:
        return _fail(f"{args.cmd}: {e}")
    except ConfigError as e:
        return _fail(str(e))


def cmd_estimate(args) -> int:
    def body() -> int:
        import json

        from .explain import estimate_text

        _, d, _ = _decide(args, live=False)
        if args.json:
            out = {"request": d.request.to_dict(),
                   "estimates": {c.name: d.context.estimate(c).to_dict() for c in d.candidates},
                   "power_models": {c.name: {"cpu_w_per_core": c.cluster.power.cpu_w_per_core,
                                             "cpu_usage": c.cluster.power.cpu_usage,
                                             "memory_w_per_gb": c.cluster.power.memory_w_per_gb,
                                             "gpu_tdp_w": c.cluster.power.gpu_tdp_w,
                                             "default_gpu_w": c.cluster.power.default_gpu_w,
                                             "sources": c.cluster.power.sources} for c in d.candidates},
                   "eligible": {c.name: c.rejected is None for c in d.candidates}}
            h = d.context.history()
            out["history"] = h.to_dict() if h else None
            print(json.dumps(out, indent=2))
        else:
            title = f"greend estimate {args.script or '(options)'}"
            sys.stdout.write(estimate_text(d, title))
        return 0

    return _run(args, body)


def cmd_route(args) -> int:
    if getattr(args, "cli_filter", None):
        return _cli_filter(args)

    def body() -> int:
        import json

        from .explain import decision_text

        _, d, _ = _decide(args, live=True)
        if args.json:
            print(json.dumps(d.to_dict(), indent=2))
        else:
            sys.stdout.write(decision_text(d, f"greend route {args.script or '(options)'}"))
        return 0 if d.outcome == "route" else 1

    return _run(args, body)


def _cli_filter(args) -> int:
    """Answer a Slurm cli_filter: never blocks a submission because greend itself failed."""
    from greend.errors import ConfigError
    from greend.ledger import LedgerError

    from .request import RequestError

    def line(key: str, value: str) -> None:
        print(f"{key}={' '.join(str(value).split())}")

    here = args.cli_filter
    try:
        _, d, _ = _decide(args, live=True)
    except (ConfigError, RequestError, LedgerError, OSError) as e:
        line("verdict", "error")
        line("message", f"greend could not route this job ({e}); it is submitted unchanged")
        return 0
    from .route_service import cli_filter_lines

    for text in cli_filter_lines(d, here):
        print(text)
    return 0


def cmd_submit(args) -> int:
    def body() -> int:
        import json
        from pathlib import Path

        from greend.ledger import Ledger

        from .explain import decision_text
        from .submit import DecisionLog, submit

        engine, d, ledger_path = _decide(args, live=True)
        script = Path(args.script).resolve()
        if args.dry_run:
            if args.json:
                print(json.dumps(d.to_dict(), indent=2))
            else:
                sys.stdout.write(decision_text(d, f"greend submit --dry-run {args.script}"))
                if d.plan and not d.plan.refused:
                    c = engine.site.cluster(d.plan.cluster)
                    conf = f"SLURM_CONF={c.slurm.conf} " if c.slurm.conf else ""
                    if c.slurm.transport == "rest":
                        from .transport import url

                        print(f"would POST {url(c.slurm, 'job/submit')} "
                              f"with ${c.slurm.token_env} (your own token): {script}")
                    elif c.slurm.transport == "ssh":
                        import shlex

                        from .submit import ssh_sbatch_argv
                        from .transport import ssh_argv

                        argv = ssh_argv(c.slurm, ssh_sbatch_argv(d.request, d.plan, "greend-<token>"),
                                        c.slurm.submit_timeout_s)
                        print(f"would run: {shlex.join(argv)} < {script}")
                    else:
                        print(f"would run: {conf}{' '.join(c.slurm.argv(['sbatch']))} --parsable "
                              "--comment=greend-<token> "
                              + " ".join(d.plan.sbatch_options(d.request)) + f" {script}")
            return 0 if d.outcome == "route" else 1
        ledger = Ledger(ledger_path)
        try:
            log = DecisionLog(ledger)
            sub = submit(engine, d, script, log, user=_user())
            recorded = _report_decision(engine, log, sub.token, ledger_path)
        finally:
            ledger.close()
        if args.json:
            print(json.dumps({"submission": sub.to_dict(), "decision": d.to_dict(), "recorded": recorded},
                             indent=2))
        else:
            _print_submission(sub, d)
            print(f"greend: {recorded['message']}")
        return sub.exit_status

    return _run(args, body)


def _daemon_sockets(cfg) -> list:
    """Where this node's greend daemon may listen (greend.httpclient.daemon_sockets: daemon.socket,
    else the system daemon's socket, then the one a daemon run by this user makes)."""
    from greend.httpclient import daemon_sockets

    return daemon_sockets(cfg.daemon.socket, cfg.resolved_state_dir())


def _report_decision(engine, log, token: str, ledger_path) -> dict:
    """Report the decision to this node's greend daemon when one answers on its socket (its
    ledger is what admins, the exporter and the site controller see); it is in the user's own
    ledger in any case. Never raises: the submission stands whatever happens here."""
    from greend.decisions import report

    why = []
    try:
        row = log.get(token)
        for sock in _daemon_sockets(engine.site.config):
            if not sock.exists():
                why.append(f"{sock}: no socket")
                continue
            ok, err = report(sock, row)
            if ok:
                return {"daemon": f"unix:{sock}", "ledger": str(ledger_path),
                        "message": f"decision {token} recorded by greend on this node (unix:{sock})"}
            why.append(f"{sock}: {err}")
    except Exception as e:  # recording must never fail a submission
        why.append(f"{type(e).__name__}: {e}")
    return {"daemon": None, "ledger": str(ledger_path), "why": why,
            "message": f"decision {token} recorded in {ledger_path} (no greend daemon took it: "
                       + "; ".join(why or ["no socket configured"]) + ")"}


def _print_submission(sub, d) -> None:
    from greend import quantities as q

    from .explain import _carbon, _energy, _water

    out = sys.stdout
    first = d.plan.cluster if d.plan else None
    for t in sub.tried:
        if t["cluster"] != sub.cluster or sub.outcome != "submitted":
            out.write(f"greend: {t['cluster']}: {t['result']}\n")
    if sub.outcome == "submitted":
        plan = sub.plan
        where = sub.cluster + (f" (partition {sub.partition})" if sub.partition else "")
        out.write(f"greend: submitted job {sub.job_id} to {where}\n")
        if sub.cluster != first:
            out.write(f"  {first} was the first choice but its controller did not take the job; "
                      f"{sub.cluster} was the next eligible cluster\n")
        out.write(f"  why: {d.summary()}\n")
        if plan.estimate is not None:
            f = plan.estimate.footprint
            out.write(f"  estimated footprint: {_energy(f.facility_energy_j)}, {_carbon(f.carbon_g)} CO2e, "
                      f"{_water(f.water_l)} water ({plan.estimate.correction_from})\n")
        if plan.begin is not None:
            out.write(f"  starts no earlier than {q.iso(plan.begin)}\n")
        for w in plan.warnings:
            out.write(f"  warning: {w}\n")
        for a in plan.advice:
            out.write(f"  advice: {a}\n")
        out.write(f"  decision recorded with token {sub.token} (greend route --json shows the full "
                  "explanation)\n")
    else:
        out.write(f"greend: not submitted ({sub.outcome}): {sub.message}\n")
        if sub.outcome in ("refused", "no_cluster"):
            out.write(f"  {d.summary()}\n")

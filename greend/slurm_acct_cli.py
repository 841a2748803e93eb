"""`greend report JOBID` and the Slurm hooks `greend slurm epilog` and `greend slurm mail`
(see docs/slurm.md, "Footprints in Slurm's accounting")."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("greend")

SOURCE_HELP = """\
greend's figures come from, in order: --api or --ledger when given (the controller's API sees
every node's records); the job's AdminComment in Slurm's accounting, where `greend slurm epilog`
writes the final footprint; otherwise a model estimate from sacct's figures, labelled as such."""


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slurm-conf", metavar="FILE",
                   help="slurm.conf of the cluster (default: $SLURM_CONF, then Slurm's default)")
    p.add_argument("--api", metavar="URL",
                   help="greend API holding the job's records: http://HOST:PORT (the site "
                   "controller, or a node agent) or unix:/PATH")
    p.add_argument("--ledger", metavar="FILE", action="append",
                   help="greend ledger file holding the job's records (repeatable)")


def _sacct(args):
    from .collectors.sacct import Sacct

    conf = args.slurm_conf or os.environ.get("SLURM_CONF")
    return Sacct(Path(conf) if conf else None)


def _fail(msg: str, status: int = 1) -> int:
    print(f"greend: {msg}", file=sys.stderr)
    return status


def _config(args):
    from .cmdline import load_config as _load_config

    return _load_config(args)


def cmd_report(args) -> int:
    from . import slurm_acct as sa
    from .collectors.sacct import SacctError

    try:
        source = sa.source_from(args.api, args.ledger)
    except sa.SourceError as e:
        return _fail(f"report: {e}", 2)
    try:
        sj = _sacct(args).job(args.job_id, args.cluster)
    except SacctError as e:
        return _fail(f"report: {e}")
    if sj is None:
        return _fail(f"report: Slurm's accounting has no job {args.job_id}"
                     + (f" on cluster {args.cluster}" if args.cluster else ""))
    d = sa.build_report(sj, lambda: _config(args), source)
    sys.stdout.write(json.dumps(d, indent=2) + "\n" if args.json else sa.text(d))
    return 0


def cmd_epilog(args) -> int:
    from . import slurm_acct as sa
    from .collectors.sacct import SacctError

    job_id = args.job_id or os.environ.get("SLURM_JOB_ID")
    cluster = args.cluster or os.environ.get("SLURM_CLUSTER_NAME")
    if not job_id:
        return _fail("slurm epilog: no job: SLURM_JOB_ID is not set (run as EpilogSlurmctld, or "
                     "give --job-id)", 2)
    try:
        source = sa.source_from(args.api, args.ledger)
    except sa.SourceError as e:
        return _fail(f"slurm epilog: {e}", 2)
    if source is None:
        return _fail("slurm epilog: say where greend's records are: --api URL or --ledger FILE", 2)
    # slurmctld waits for its epilog: the waiting is done in the background.
    if not args.foreground and not sa.detach():
        return 0
    if args.log_file:
        try:
            h = logging.FileHandler(args.log_file)
        except OSError as e:
            return _fail(f"slurm epilog: cannot open {args.log_file}: {e.strerror}", 2)
        h.setFormatter(logging.Formatter("%(asctime)s greend slurm epilog: %(levelname)s: %(message)s"))
        logging.getLogger().addHandler(h)
        logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    try:
        res = sa.write_final(_sacct(args), source, job_id, cluster, wait_s=args.wait,
                             final_wait_s=args.final_wait, complete_wait_s=args.complete_wait)
    except (SacctError, sa.SourceError) as e:
        log.error("job %s: %s", job_id, e)
        return 1
    if args.foreground:
        out = {"job_id": job_id, "cluster": cluster, "comment": res.comment, "note": res.note,
               "written": res.written.to_dict() if res.written else None}
        print(json.dumps(out, indent=2) if args.json else
              (res.comment or "(nothing written)") + (f"\nnote: {res.note}" if res.note else ""))
    elif res.note:
        log.warning("job %s: %s", job_id, res.note)
    else:
        log.info("job %s: %s", job_id, res.comment)
    return 0


def cmd_mail(args) -> int:
    from . import slurm_acct as sa
    from .collectors.sacct import SacctError

    argv = list(args.mail_args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    body = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    job_id = os.environ.get("SLURM_JOB_ID")
    mail_type = os.environ.get("SLURM_JOB_MAIL_TYPE", "")
    subject = argv[argv.index("-s") + 1] if "-s" in argv[:-1] else ""
    ended = mail_type.lower() not in ("", "began", "begin") or " Ended," in subject or " Failed," in subject
    if job_id and ended:
        try:
            source = sa.source_from(args.api, args.ledger)
            d = sa.wait_report(_sacct(args), job_id, os.environ.get("SLURM_CLUSTER_NAME"),
                               functools.cache(lambda: _config(args)), source, wait_s=args.wait)
            if d is not None:
                body += ("\n" if body else "") + "greend report\n-------------\n" + sa.text(d)
        except (SacctError, sa.SourceError) as e:
            body += f"\n(greend: no report for job {job_id}: {e})\n"
    try:
        p = subprocess.run([args.mailer, *argv], input=body, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return _fail(f"slurm mail: cannot run {args.mailer}: {e}")
    return p.returncode


def add_commands(sub) -> None:
    r = sub.add_parser(
        "report", help="a finished Slurm job's efficiency and footprint (a seff for footprints)",
        description="Show what Slurm's accounting (sacct) knows about a job: state, elapsed time, "
        "CPU and memory efficiency against the allocation, GPU use; greend's footprint (energy by "
        "source, facility energy, carbon, on-site and off-site water, the factors); and what to "
        "request next time.\n\n" + SOURCE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  greend report 1234\n  greend report --json --api http://ctl:9472 1234",
    )
    r.add_argument("job_id", metavar="JOBID")
    r.add_argument("--cluster", help="the job's cluster (default: the one of --slurm-conf)")
    _add_source_args(r)
    r.add_argument("--json", action="store_true", help="print as JSON")
    r.set_defaults(func=cmd_report)

    s = sub.add_parser("slurm", help="hooks for Slurm: EpilogSlurmctld and MailProg")
    ssub = s.add_subparsers(dest="slurm_cmd", metavar="ACTION")
    e = ssub.add_parser(
        "epilog", help="write a finished job's final footprint into Slurm's accounting",
        description="Run as slurmctld's EpilogSlurmctld (as SlurmUser): waits until accounting "
        "shows the job ended and greend's records of all its nodes are closed, then writes the "
        "footprint into the job's AdminComment with `sacctmgr modify job`, where `sacct -o "
        "AdminComment` and `greend report` show it. If the records are late, a provisional figure "
        "is written and completed when they arrive; an older figure never replaces a newer one. "
        "It returns at once and works in the background (--foreground to watch). The job comes "
        "from $SLURM_JOB_ID and $SLURM_CLUSTER_NAME; slurmctld does not pass SLURM_CONF, so give "
        "--slurm-conf or call it from a wrapper script that sets it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example (slurm.conf: EpilogSlurmctld=/etc/slurm/greend-epilog):\n"
        "  #!/bin/sh\n  exec greend slurm epilog --slurm-conf /etc/slurm/slurm.conf "
        "--api http://greend-ctl:9472",
    )
    _add_source_args(e)
    e.add_argument("--job-id", help="the job (default: $SLURM_JOB_ID)")
    e.add_argument("--cluster", help="its cluster (default: $SLURM_CLUSTER_NAME)")
    e.add_argument("--foreground", action="store_true", help="wait here and print what was written")
    e.add_argument("--json", action="store_true", help="with --foreground: print as JSON")
    e.add_argument("--log-file", metavar="FILE", help="append what it did (or why not) to FILE")
    e.add_argument("--wait", type=float, default=120.0, metavar="S",
                   help="how long to wait for accounting to show the job ended (default 120)")
    e.add_argument("--final-wait", type=float, default=30.0, metavar="S",
                   help="how long to wait for the nodes' final records before writing a "
                   "provisional figure (default 30)")
    e.add_argument("--complete-wait", type=float, default=600.0, metavar="S",
                   help="how long to keep waiting to complete a provisional figure (default 600)")
    e.set_defaults(func=cmd_epilog)

    m = ssub.add_parser(
        "mail", help="MailProg wrapper: append the job's greend report to Slurm's end-of-job mail",
        description="Set MailProg to a script that runs this: it passes its arguments and the "
        "message on to the real mailer (--mailer), with `greend report` of the job appended to "
        "end-of-job mails (SLURM_JOB_MAIL_TYPE other than Began), after waiting up to --wait "
        "seconds for greend's final figures.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example (slurm.conf: MailProg=/etc/slurm/greend-mail):\n  #!/bin/sh\n"
        "  exec greend slurm mail --slurm-conf /etc/slurm/slurm.conf --mailer /usr/bin/mail -- \"$@\"",
    )
    _add_source_args(m)
    m.add_argument("--mailer", default="/usr/bin/mail", help="the real mail program (default /usr/bin/mail)")
    m.add_argument("--wait", type=float, default=60.0, metavar="S",
                   help="how long to wait for greend's final figures (default 60)")
    m.add_argument("mail_args", nargs=argparse.REMAINDER, metavar="-- MAIL ARGS...",
                   help="what slurmctld passes: -s SUBJECT RECIPIENT")
    m.set_defaults(func=cmd_mail)
    s.set_defaults(func=lambda a: (s.print_help(), 0)[1])

"""`greend slurmd-hook prolog|epilog`: slurmd's Prolog and Epilog tell the node's greend which job
starts or ends, so that the daemon never asks slurmctld for the whole queue (docs/slurm.md,
"Discovery"). The hook writes one small file into a root-owned spool directory and exits 0, always:
a failing Prolog drains the node, and greend being down or broken must never do that.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

SPOOL_ENV = "GREEND_SLURM_SPOOL"


def add_commands(sub) -> None:
    h = sub.add_parser(
        "slurmd-hook",
        help="slurmd's Prolog/Epilog: tell this node's greend that a job starts or ends",
        description="Run by slurmd as root, as (or from) its Prolog or Epilog, with the job's "
                    "environment (SLURM_JOB_ID, SLURM_JOB_USER, SLURM_JOB_UID, SLURM_JOB_ACCOUNT, "
                    "SLURM_JOB_PARTITION, ...). Writes one record into the spool directory that "
                    "greend reads ([slurm] spool_dir) and exits 0 whatever happens: a failing "
                    "Prolog would drain the node. slurm.conf names a program without arguments: "
                    "point Prolog= and Epilog= at a short script (docs/slurm.md).",
    )
    h.add_argument("action", choices=("prolog", "epilog"),
                   help="prolog: the job starts on this node; epilog: it has ended here")
    h.add_argument("--spool", metavar="DIR", type=Path, default=None,
                   help=f"the spool directory (default: ${SPOOL_ENV}, else /run/greend/slurm-jobs; "
                        "must match [slurm] spool_dir)")
    h.add_argument("--json", action="store_true", help="print what was written, as JSON")
    h.set_defaults(func=run)


def run(args) -> int:
    try:
        from greend.collectors.slurmlocal import DEFAULT_SPOOL, write_record

        spool = args.spool or Path(os.environ.get(SPOOL_ENV) or DEFAULT_SPOOL)
        path = write_record(spool, args.action, os.environ, time.time())
        if args.json:
            import json

            print(json.dumps({"written": str(path) if path else None,
                              "job_id": os.environ.get("SLURM_JOB_ID")}))
        elif path is None:
            print("greend slurmd-hook: no SLURM_JOB_ID in the environment: nothing written",
                  file=sys.stderr)
    except Exception as e:  # never fail the job or drain the node
        print(f"greend slurmd-hook {args.action}: not recorded ({type(e).__name__}: {e})",
              file=sys.stderr)
    return 0

"""How fast `greend report JOBID` answers with many jobs in Slurm's accounting.

Fills the testbed's accounting (testbed/slurm-testbed, cluster `site`, slurmdbd + MariaDB) with
`--jobs` finished jobs (one job array of `true`; skipped when accounting already holds that many),
writes greend figures into a tenth of their AdminComments, then times, each `--repeat` times:

- `greend report JOBID` and `greend report --json JOBID` as a user runs them (a new process:
  Python start-up, imports, sacct, the report), wall-clock;
- the sacct query alone (`Sacct.job`), in-process;
- the history reader over the whole record (`Sacct.jobs` since a day ago: every job).

Needs root (the testbed). Honours GREEND_TESTBED_DIR / GREEND_TESTBED_PORT_BASE. Usage:

    .venv/bin/python bench/bench_report.py [--jobs 1000] [--repeat 5]

Goal (issue 13): `greend report` answers within 1 s with 1,000 jobs in sacct.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
GREEND = str(Path(sys.executable).with_name("greend"))


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def show(label: str, secs: list[float]) -> None:
    print(f"  {label:<44} median {statistics.median(secs) * 1000:8.1f} ms   max {max(secs) * 1000:8.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from greend.collectors.sacct import Sacct
    from slurmbed import ensure_testbed

    from greend import slurm_acct as sa

    tb = ensure_testbed()
    sacct = Sacct(tb.conf("site"))
    since = time.time() - 86400
    have = sacct.jobs(since)
    if len(have) < args.jobs:
        n = args.jobs - len(have)
        print(f"submitting {n} jobs (an array of `true`) to cluster site ...", flush=True)
        t0 = time.monotonic()
        for start in range(0, n, 1000):  # MaxArraySize is 1001
            count = min(1000, n - start)
            tb.submit("site", "#!/bin/bash\ntrue\n",
                      extra_args=[f"--array=0-{count - 1}", "-c", "1", "--mem=16M", "-o", "/dev/null"])
        while True:
            left = tb.run("site", "squeue", "-h", "-o", "%i").stdout.split()
            if not left:
                break
            time.sleep(2)
        time.sleep(3)  # the last end records reach slurmdbd
        have = sacct.jobs(since)
        print(f"  done in {time.monotonic() - t0:.0f} s")
    print(f"jobs in accounting (cluster site, last 24 h): {len(have)}")
    fig = sa.Figures(status="final", t=int(time.time()), nodes=1, it_j=123.4, cpu_j=100.0,
                     memory_j=23.4, facility_j=172.8, carbon_g=0.0026, water_site_l=6e-5,
                     water_offsite_l=8e-5, cpu_s=9.5, pue=1.4, ci_g_per_kwh=56.0, wue_l_per_kwh=1.8,
                     ewif_l_per_kwh=1.62, src={"cpu": "measured"})
    tagged = [j for j in have if j.admin_comment.startswith("greend v1")]
    for j in have[: max(0, len(have) // 10 - len(tagged))]:
        sacct.set_admin_comment(j.job_id_raw, sa.encode(fig), "site")
    probe = have[len(have) // 2].job_id_raw
    measured = have[0].job_id_raw
    env = {**os.environ, "SLURM_CONF": str(tb.conf("site"))}

    def cli(*a):
        p = subprocess.run([GREEND, "report", *a], env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr

    print(f"greend report on cluster site, {args.repeat} runs each (job {probe}: model estimate; "
          f"job {measured}: figures from AdminComment):")
    show("greend report JOBID (new process)", timed(lambda: cli(probe), args.repeat))
    show("greend report --json JOBID (new process)", timed(lambda: cli("--json", probe), args.repeat))
    show("greend report JOBID, figures in AdminComment", timed(lambda: cli(measured), args.repeat))
    show("greend --version (Python start-up + imports)", timed(
        lambda: subprocess.run([GREEND, "--version"], capture_output=True, check=True), args.repeat))
    show("Sacct.job (one sacct call, in-process)", timed(lambda: sacct.job(probe, "site"), args.repeat))
    show(f"Sacct.jobs, last 24 h ({len(have)} jobs)", timed(lambda: sacct.jobs(since), args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())

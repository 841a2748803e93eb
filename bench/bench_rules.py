"""The cost of the daily per-account recording rules on a real Prometheus with many jobs.

Backfills a day of synthetic per-job counters (`greend_job_energy_joules_total`, --jobs jobs of
--accounts accounts, one sample every --scrape-s seconds, jobs of --job-hours hours starting through
the day) and the per-account 5-minute series the new rules record, with `promtool tsdb
create-blocks-from openmetrics`; starts Prometheus on it and times, at the end of the day, what one
evaluation of each rule costs (samples read, from the query API's stats, and wall time):

    old: sum by (cluster, account) (increase(greend_job_energy_joules_total[1d]))
    new: sum by (cluster, account) (increase(greend_job_energy_joules_total[5m]))   (step 1)
         sum_over_time(account:greend_job_energy_joules:increase5m[1d:5m])         (step 2)

Per rule: the recording file has 7 such rules (4 per account, 3 per user). Usage:

    .venv/bin/python bench/bench_rules.py [--jobs 1000] [--accounts 50] [--scrape-s 60]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

OLD = "sum by (cluster, account) (increase(greend_job_energy_joules_total[1d]))"
NEW_5M = "sum by (cluster, account) (increase(greend_job_energy_joules_total[5m]))"
NEW_1D = "sum_over_time(account:greend_job_energy_joules:increase5m[1d:5m])"


def write_openmetrics(path: Path, *, jobs: int, accounts: int, scrape_s: int, job_hours: float,
                      end: int) -> int:
    start = end - 86400
    n = 0
    with path.open("w") as f:
        f.write("# TYPE greend_job_energy_joules counter\n")
        for j in range(jobs):
            acct = f"a{j % accounts}"
            # jobs start evenly through the day and run job_hours (or until the end)
            t0 = start + (j * 86400 // jobs) // scrape_s * scrape_s - int(job_hours * 3600 / 2)
            t1 = t0 + int(job_hours * 3600)
            labels = (f'job="greend-nodes",instance="n{j % 64}:9471",cluster="c",node="n{j % 64}",'
                      f'job_id="{j}",user="u{j % 200}",account="{acct}",source="cpu"')
            for t in range(max(t0, start), min(t1, end) + 1, scrape_s):
                f.write(f"greend_job_energy_joules_total{{{labels}}} {(t - t0) * 100.0} {t}\n")
                n += 1
        # what step 1 records every minute: one series per account, 5 minutes of its jobs' energy
        f.write("# TYPE account:greend_job_energy_joules:increase5m gauge\n")
        for a in range(accounts):
            for t in range(start, end + 1, 60):
                f.write(f'account:greend_job_energy_joules:increase5m{{cluster="c",account="a{a}"}} '
                        f"{jobs / accounts * 0.4 * 100.0 * 300} {t}\n")
                n += 1
        f.write("# EOF\n")
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, expr: str, at: int) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(
        {"query": expr, "time": at, "stats": "all"})
    with urllib.request.urlopen(url, timeout=120) as r:
        return json.load(r)["data"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--accounts", type=int, default=50)
    ap.add_argument("--scrape-s", type=int, default=60)
    ap.add_argument("--job-hours", type=float, default=6.0)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prometheus and promtool):
        print("needs prometheus and promtool (Debian package prometheus)", file=sys.stderr)
        return 1
    end = int(time.time()) // 3600 * 3600 - 3600
    with tempfile.TemporaryDirectory(prefix="greend-bench-rules-") as tmp:
        tmp = Path(tmp)
        t = time.monotonic()
        n = write_openmetrics(tmp / "in.om", jobs=args.jobs, accounts=args.accounts,
                              scrape_s=args.scrape_s, job_hours=args.job_hours, end=end)
        subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", "-q",
                        str(tmp / "in.om"), str(tmp / "data")], check=True, capture_output=True)
        (tmp / "in.om").unlink()
        print(f"backfilled {n:,} samples in {time.monotonic() - t:.0f} s")
        (tmp / "prometheus.yml").write_text("global: {}\n")
        port = free_port()
        p = subprocess.Popen([prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                              f"--storage.tsdb.path={tmp / 'data'}", "--storage.tsdb.retention.time=30d",
                              f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(300):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1):
                        break
                except OSError:
                    time.sleep(0.2)
            rows = []
            for name, expr in (("old: increase[1d] over per-job series", OLD),
                               ("new step 1: increase[5m] over per-job series", NEW_5M),
                               ("new step 2: [1d:5m] over per-account series", NEW_1D)):
                query(port, expr, end)  # warm the page cache
                walls, samples = [], 0
                for _ in range(args.runs):
                    t = time.perf_counter()
                    d = query(port, expr, end)
                    walls.append((time.perf_counter() - t) * 1000)
                    samples = d.get("stats", {}).get("samples", {}).get("totalQueryableSamples", 0)
                rows.append((name, samples, statistics.median(walls), len(d["result"])))
        finally:
            p.terminate()
            p.wait(30)
    print(f"{args.jobs} jobs of {args.accounts} accounts, a sample every {args.scrape_s} s, "
          f"jobs of {args.job_hours:g} h through the day; one evaluation of one rule:")
    print(f"{'rule':<48} {'samples read':>13} {'median ms':>10} {'series out':>10}")
    for name, samples, ms, out in rows:
        print(f"{name:<48} {samples:>13,} {ms:>10.1f} {out:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

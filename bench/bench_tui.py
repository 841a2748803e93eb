"""How fast `greend tui` paints and refreshes over a big ledger (10,000 jobs by default).

    .venv/bin/python bench/bench_tui.py [--jobs 10000] [--runs 20] [--first-paint-only]

Prints: ledger build time; data-layer query times (the ledger source; the socket source through
greend's API, which sorts and pages, against what the TUI did before the API could); `greend tui`
itself in a pseudo-terminal, from exec to its first page of jobs (with its modules' bytecode
cached, in a temporary directory, as an installed greend has it, unless --no-bytecode); then,
driven headless by Textual's Pilot, first paint and the time of a refresh (unchanged data; changed
figures of running jobs), a page change and a re-sort.
With --first-paint-only, also a reference: a bare Textual app that shows one line of text, exec to
paint, on the same interpreter (the floor of any Textual start there: greend's own share is the
difference), and which interpreter ran.
Goals: exec to first page < 250 ms on a quiet machine, a refresh of running rows < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from greend import config as config_mod
from greend.footprint import J_PER_KWH
from greend.ledger import JobRow, Ledger

NOW = time.time()  # the ledger is built around the real time, so `greend tui` itself sees it as recent
USERS = [f"user{i:02d}" for i in range(40)]
ME = "user07"


def build(path: Path, n_jobs: int, seed: int = 1) -> float:
    rnd = random.Random(seed)
    cfg = config_mod.Config()
    f = config_mod.cluster_factors(cfg, "local").at(NOW)
    t0 = time.perf_counter()
    ledger = Ledger(path)
    with ledger.transaction() as db:
        ledger.put_factor_set(db, f.key(), f, NOW - 400 * 86400)
        for i in range(n_jobs):
            start = NOW - rnd.uniform(0, 365 * 86400)
            dur = rnd.uniform(60, 3 * 86400)
            running = i % 200 == 0
            end = None if running else start + dur
            last = NOW - 10 if running else start + dur
            cpu_w, dram_w = rnd.uniform(20, 400), rnd.uniform(2, 40)
            secs = last - start
            cpu_uj, dram_uj = round(cpu_w * secs * 1e6), round(dram_w * secs * 1e6)
            it_j = (cpu_uj + dram_uj) / 1e6
            row = JobRow(
                cluster=("local", "site", "national")[i % 3], job_id=str(1_000_000 + i),
                node=f"n{i % 64:02d}", kind="slurm", state="running" if running else "ended",
                first_seen=start, last_seen=last, end_time=end, submit_time=int(start - 30),
                name=f"job-{i % 97}", user=ME if i % 5 == 0 else rnd.choice(USERS),
                account=f"acct{i % 12}", partition="batch", tier=("local", "site", "national")[i % 3],
                alloc_cpus=8, alloc_mem_bytes=32 * 2**30, max_mem_bytes=rnd.randint(1, 32) * 2**30,
                cpu_time_ns=round(secs * 6e9), cpu_uj=cpu_uj, dram_uj=dram_uj,
                facility_j=it_j * f.pue, carbon_g=it_j / J_PER_KWH * f.pue * f.carbon_intensity_g_per_kwh,
                water_site_l=it_j / J_PER_KWH * f.wue_site_l_per_kwh,
                water_offsite_l=it_j / J_PER_KWH * f.pue * f.ewif_l_per_kwh,
                provenance={"cpu": "measured: RAPL package", "dram": "measured: RAPL dram"},
            )
            pk = ledger.upsert_job(db, row)
            step = max(60.0, secs / 12)
            series, t = [], start
            while t < last:
                t1 = min(last, t + step)
                share = (t1 - t) / secs
                series.append((pk, t, t1, f.key(), round(cpu_uj * share), round(dram_uj * share), 0, 0,
                               0, 0.0, 0.0, 0.0))
                t = t1
            ledger.put_series(db, series)
        ledger.put_node_totals(db, "n00", [("package-0", "cpu", "measured: RAPL", 10**15, 10**14, 0)])
    ledger.close()
    return time.perf_counter() - t0


def bump_running(path: Path) -> None:
    """What a daemon checkpoint does to running jobs: more energy, a later last_seen."""
    ledger = Ledger(path)
    with ledger.transaction() as db:
        db.execute("UPDATE jobs SET cpu_uj = cpu_uj + 5000000000, carbon_g = carbon_g + 0.1, "
                   "last_seen = last_seen + 1 WHERE state = 'running'")
    ledger.close()


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return (f"median {statistics.median(xs) * 1e3:6.1f} ms, p95 {p95 * 1e3:6.1f} ms, "
            f"max {xs[-1] * 1e3:6.1f} ms")


def bench_data(path: Path, runs: int) -> None:
    from greend.tui.data import JobQuery, LedgerSource

    src = LedgerSource(path)
    cases = {
        "my jobs, 30 days, recent first": JobQuery(user=ME, since=NOW - 30 * 86400),
        "all users, all time, recent first": JobQuery(),
        "all users, all time, by energy": JobQuery(sort="energy"),
        "all users, search 'job-4'": JobQuery(search="job-4"),
        "all users, page 50": JobQuery(offset=5000),
    }
    for label, q in cases.items():
        times = []
        for _ in range(runs):
            src._last = None  # the query itself, not the page kept from the last call
            t0 = time.perf_counter()
            page = src.jobs(q, NOW)
            times.append(time.perf_counter() - t0)
        print(f"  jobs(): {label:<36} {page.total:>6} jobs  {ms(times)}")
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        src.jobs(JobQuery(), NOW)
        times.append(time.perf_counter() - t0)
    print(f"  jobs(): same query, ledger unchanged{'':<13} {ms(times)}")
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        src.job("site", str(1_000_000 + 3 * i + 1))
        times.append(time.perf_counter() - t0)
    print(f"  job(): one job with its series{'':<20} {ms(times)}")
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        src.summary(NOW - 30 * 86400, None, "account")
        times.append(time.perf_counter() - t0)
    print(f"  summary(): accounts, 30 days{'':<22} {ms(times)}")
    src.close()


def bench_api(path: Path, runs: int) -> None:
    """The TUI's socket source against greend's own API server (greend.api) over the ledger: a page
    sorted, searched and paged by the API (now), and the same page the way the TUI had to get it
    before the API could sort and search (every matching record in pages of 1,000, merged, sorted
    and paged in the TUI: _jobs_in_memory, kept as the fallback for an older daemon)."""
    from greend.tui.data import JobQuery, SocketSource

    from greend import api, http

    class Host:
        cfg = config_mod.Config()
        ledger_path = path
        socket_path = path.with_name("api.sock")
        node = None
        token = None
        max_body = 1 << 20
        routes: dict = {}  # noqa: RUF012

        def health(self) -> dict:
            return {"ok": True}

        def metric_collectors(self) -> list:
            return []

    host = Host()
    server = http.serve(api.Api(host), ("127.0.0.1", 0), host.socket_path)
    src = SocketSource(host.socket_path)
    cases = {
        "my jobs, 30 days, recent first": JobQuery(user=ME, since=NOW - 30 * 86400),
        "all users, all time, recent first": JobQuery(),
        "all users, all time, by energy": JobQuery(sort="energy"),
        "all users, search 'job-4'": JobQuery(search="job-4"),
        "all users, page 50": JobQuery(offset=5000),
    }
    try:
        for label, q in cases.items():
            params = {"user": q.user, "account": q.account, "cluster": q.cluster, "state": q.state,
                      "kind": q.kind, "since": q.since, "until": q.until}
            now, before = [], []
            for _ in range(runs):
                t0 = time.perf_counter()
                page = src.jobs(q, NOW)
                now.append(time.perf_counter() - t0)
            for _ in range(max(1, min(runs, 5))):
                t0 = time.perf_counter()
                old = src._jobs_in_memory(q, params, NOW)
                before.append(time.perf_counter() - t0)
            # The same page both ways (ties included).
            assert [j.job_id for j in old.jobs] == [j.job_id for j in page.jobs] and old.total == page.total
            print(f"  jobs(): {label:<36} {page.total:>6} jobs  API sorts: {ms(now)}")
            print(f"  {'':<45}{'':>13}before: {ms(before)}")
    finally:
        server.close()


async def bench_app(path: Path, runs: int, all_users: bool, size: tuple[int, int]) -> None:
    """Through Textual's Pilot, headless. Each figure is wall time from the key press until the app
    is idle again with the new rows painted; Pilot's own idle detection adds a fixed delay, measured
    with a key that does nothing and subtracted ("net"). CPU is process time of all threads."""
    from greend.tui.app import GreendApp
    from greend.tui.data import LedgerSource
    from textual.widgets import DataTable

    async def settle(app, pilot) -> None:
        await app.workers.wait_for_complete()
        await pilot.pause()

    async def timed(app, pilot, key, before=None) -> tuple[float, float]:
        """A key pressed, or a callable called (what a timer does), until the app is idle again."""
        if before:
            before()
        t, c = time.perf_counter(), time.process_time()
        if callable(key):
            key()
        else:
            await pilot.press(key)
        await settle(app, pilot)
        return time.perf_counter() - t, time.process_time() - c

    t0 = time.perf_counter()
    app = GreendApp(LedgerSource(path), user=None if all_users else ME, me=ME, clock=time.time,
                    refresh_s=0)
    async with app.run_test(size=size) as pilot:
        await settle(app, pilot)
        first = time.perf_counter() - t0
        screen = app.screen
        rows = app.screen.query_one(DataTable).row_count
        who = "all users" if all_users else "one user"
        print(f"  {who}, {size[0]}x{size[1]}: first paint {first * 1e3:.0f} ms after the App starts "
              f"({rows} rows shown of {screen.page.total:,} in the last 30 days)")
        results: dict[str, list[tuple[float, float]]] = {
            "no-op key (Pilot's idle wait)": [], "refresh, nothing changed": [],
            "refresh, running jobs changed": [], "live refresh, running changed": [],
            "1 s tick of running rows": [], "next/previous page": [], "sort by energy/recent": [],
        }
        for i in range(runs):
            results["no-op key (Pilot's idle wait)"].append(await timed(app, pilot, "x"))
            results["refresh, nothing changed"].append(await timed(app, pilot, "r"))
            results["refresh, running jobs changed"].append(
                await timed(app, pilot, "r", before=lambda: bump_running(path)))
            # What the refresh timer does (without the totals that `r` also reads again)
            results["live refresh, running changed"].append(
                await timed(app, pilot, screen.reload, before=lambda: bump_running(path)))
            results["1 s tick of running rows"].append(await timed(app, pilot, screen._tick_running))
            results["next/previous page"].append(await timed(app, pilot, "n" if i % 2 == 0 else "p"))
            results["sort by energy/recent"].append(await timed(app, pilot, "s" if i % 2 == 0 else "S"))
        base = statistics.median(w for w, _ in results["no-op key (Pilot's idle wait)"])
        for label, xs in results.items():
            walls = [w for w, _ in xs]
            net = statistics.median(walls) - base
            cpu = statistics.median(c for _, c in xs)
            # (net only for keys: a timer's callback has no key press to wait for)
            keyed = not label.startswith(("no-op", "live", "1 s"))
            extra = f", net {net * 1e3:5.0f} ms" if keyed else ""
            print(f"    {label:<32} wall {ms(walls)}{extra}, CPU {cpu * 1e3:4.0f} ms")


def _cpu_s(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (clock ticks)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# The floor of any Textual start on this interpreter: an app that shows one line of text.
REFERENCE_APP = """
from textual.app import App
from textual.widgets import Static
class One(App):
    def compose(self):
        yield Static("Enter: details")
One().run()
"""


def first_paint_pty(path: Path, user: str, size: tuple[int, int] = (80, 24),
                    cpu: list[float] | None = None, pycache: Path | None = None,
                    reference: bool = False) -> float | None:
    """The real thing: `greend tui` in a pseudo-terminal, from exec to the status line that follows
    the first page of jobs (interpreter start and imports included). The CPU time the process used
    until then is appended to `cpu` (less sensitive than wall time to other work on the machine).
    reference: the same for REFERENCE_APP instead of greend."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios

    t0 = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:  # the child: greend tui
        os.environ["TERM"] = "xterm-256color"
        if pycache is not None:  # compiled modules kept, as an installed greend has them
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
            os.environ["PYTHONPYCACHEPREFIX"] = str(pycache)
        if reference:
            os.execv(sys.executable, [sys.executable, "-c", REFERENCE_APP])
        os.execv(sys.executable, [sys.executable, "-m", "greend", "tui", "--ledger", str(path),
                                  "--user", user, "--refresh", "0"])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
    buf, first = b"", None
    while time.perf_counter() - t0 < 20:
        if select.select([fd], [], [], 0.02)[0]:
            try:
                buf += os.read(fd, 65536)
            except OSError:
                break
            if b"Enter: details" in buf or b"No jobs of" in buf:
                first = time.perf_counter() - t0
                if cpu is not None:
                    cpu.append(_cpu_s(pid))
                break
    os.write(fd, b"\x11" if reference else b"q")  # ctrl+q quits a bare Textual app
    end = time.perf_counter() + 5
    while time.perf_counter() < end:
        if select.select([fd], [], [], 0.05)[0]:
            try:
                if not os.read(fd, 65536):
                    break
            except OSError:
                break
    os.waitpid(pid, 0)
    os.close(fd)
    return first


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--api-only", action="store_true", help="stop after the data layer's figures")
    p.add_argument("--first-paint-only", action="store_true",
                   help="only `greend tui` in a pseudo-terminal, exec to first page")
    p.add_argument("--no-bytecode", action="store_true",
                   help="`greend tui` compiles its modules at every start (PYTHONDONTWRITEBYTECODE as "
                   "set here) instead of using a bytecode cache as an installed greend does")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ledger.sqlite"
        t = build(path, args.jobs)
        print(f"ledger: {args.jobs:,} jobs built in {t:.1f} s ({path.stat().st_size / 2**20:.1f} MiB)")
        if args.first_paint_only:
            cpu: list[float] = []
            pyc = None if args.no_bytecode else Path(d) / "pycache"
            first_paint_pty(path, ME, pycache=pyc)  # (fills the bytecode cache)
            ok = [x for x in (first_paint_pty(path, ME, cpu=cpu, pycache=pyc) for _ in range(args.runs)) if x]
            print(f"greend tui, exec to first page: wall {ms(ok)}; CPU {ms(cpu)} ({len(ok)} runs)")
            ref_cpu: list[float] = []
            first_paint_pty(path, ME, pycache=pyc, reference=True)
            ref = [x for x in (first_paint_pty(path, ME, cpu=ref_cpu, pycache=pyc, reference=True)
                               for _ in range(args.runs)) if x]
            print(f"reference, a Textual app showing one line, exec to paint: wall {ms(ref)}; "
                  f"CPU {ms(ref_cpu)}")
            print(f"interpreter: {sys.executable} (Python {sys.version.split()[0]})")
            return 0
        t0 = time.perf_counter()
        import greend.tui.app  # noqa: F401 - what `greend tui` imports before it paints

        print(f"import greend.tui.app (textual): {(time.perf_counter() - t0) * 1e3:.0f} ms")
        print("data layer (LedgerSource):")
        bench_data(path, args.runs)
        print("data layer (SocketSource, greend's API on a unix socket):")
        bench_api(path, args.runs)
        if args.api_only:
            return 0
        print("greend tui in a pseudo-terminal (80x24), exec to first page painted:")
        cpu: list[float] = []
        pyc = None if args.no_bytecode else Path(d) / "pycache"
        first_paint_pty(path, ME, pycache=pyc)  # (fills the bytecode cache)
        paints = [first_paint_pty(path, ME, cpu=cpu, pycache=pyc) for _ in range(max(5, args.runs))]
        ok = [x for x in paints if x is not None]
        print(f"  wall {ms(ok)} over {len(ok)} runs" if ok else "  the first page never appeared")
        if cpu:
            print(f"  CPU time of the process until then: {ms(cpu)}")
        print("app (headless, Pilot):")
        asyncio.run(bench_app(path, args.runs, False, (80, 24)))
        asyncio.run(bench_app(path, args.runs, True, (80, 24)))
        asyncio.run(bench_app(path, args.runs, True, (160, 48)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

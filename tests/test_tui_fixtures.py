"""A small, deterministic ledger and configuration for the TUI's tests, and an HTTP API that serves
them as greend's /api/v1 is specified (so the socket and URL sources are tested against a server).

"now" is frozen at NOW; every time in the ledger is relative to it, so elapsed times and periods in
the snapshots never move.
"""

from __future__ import annotations

import json
import os
import socketserver
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from greend import config as config_mod
from greend import report
from greend.footprint import J_PER_KWH, Factors
from greend.ledger import JobRow, Ledger

NOW = 1_773_144_000.0  # 2026-03-10 12:00:00 UTC
H = 3600.0
GIB = 2**30
STEP = 300  # series step of the fixture jobs, seconds

CONFIG = {
    "cluster": "site",
    "clusters": {
        "oldlab": {"tier": "local", "open": False, "pue": 1.8, "carbon_intensity_g_per_kwh": 56.0,
                   "ewif_l_per_kwh": 1.62, "sources": {"pue": "estimate for a machine room"}},
        "site": {"tier": "site", "hds": True, "pue": 1.25, "wue_site_l_per_kwh": 0.4,
                 "carbon_intensity_g_per_kwh": 52.0, "ewif_l_per_kwh": 1.62,
                 "sources": {"pue": "site energy audit 2025",
                             "wue_site_l_per_kwh": "cooling tower meters 2025",
                             "carbon_intensity_g_per_kwh": "RTE eCO2mix 2025 average",
                             "ewif_l_per_kwh": "Li et al. 2023 on the 2023 French mix"}},
        "national": {"tier": "national", "pue": 1.35, "wue_site_l_per_kwh": 0.0,
                     "carbon_intensity_g_per_kwh": 56.039, "ewif_l_per_kwh": 1.62},
    },
}

RAPL = "measured: RAPL package (powercap)"
RAPL_DRAM = "measured: RAPL dram (powercap)"
NVML = "measured: NVML total energy counter"
TDP = "modelled: TDP 24 W x (0.1 + 0.9 x load^3) (CodeCarbon)"
SLURM_STATES = ("RUNNING", "TIMEOUT", "COMPLETED", "")  # of bob's and carol's jobs
MEM = "modelled: 0.3725 W/GB of memory (Green Algorithms), allocated or resident"


def config():
    return config_mod.parse(CONFIG)


def factors(cfg, cluster: str) -> Factors:
    return config_mod.cluster_factors(cfg, cluster).at(NOW)


def _job(ledger: Ledger, db, row: JobRow, f: Factors, watts: dict[str, float], peak_w: float = 0.0):
    """Store a job whose energy comes from constant power per source, with a series of STEP buckets.

    peak_w adds a bump in the middle of the job (so the power plot has a shape).
    """
    end = row.end_time if row.end_time is not None else row.last_seen
    key = f.key()
    ledger.put_factor_set(db, key, f, row.first_seen)
    row.cpu_uj = row.dram_uj = row.gpu_uj = row.memory_uj = 0
    row.carbon_g = row.water_site_l = row.water_offsite_l = row.facility_j = 0.0
    row.cpu_time_ns = 0
    series = []
    t = row.first_seen
    n = 0
    mid = (row.first_seen + end) / 2
    while t < end:
        tb = (t // STEP) * STEP
        t1 = min(end, tb + STEP)
        dt = t1 - t
        bump = peak_w if abs((t + t1) / 2 - mid) < (end - row.first_seen) / 6 else 0.0
        e = {s: round((w + (bump if s in ("gpu", "cpu") and w else 0)) * dt * 1e6)
             for s, w in watts.items()}
        it_j = sum(e.values()) / 1e6
        c = it_j / J_PER_KWH * f.pue * f.carbon_intensity_g_per_kwh
        ws = it_j / J_PER_KWH * f.wue_site_l_per_kwh
        wo = it_j / J_PER_KWH * f.pue * f.ewif_l_per_kwh
        cpu_ns = round(dt * 1e9 * (row.alloc_cpus or 1) * row.meta.get("busy", 0.9))
        series.append((tb, t1, e.get("cpu", 0), e.get("dram", 0), e.get("gpu", 0), e.get("memory", 0),
                       cpu_ns, c, ws, wo))
        row.cpu_uj += e.get("cpu", 0)
        row.dram_uj += e.get("dram", 0)
        row.gpu_uj += e.get("gpu", 0)
        row.memory_uj += e.get("memory", 0)
        row.cpu_time_ns += cpu_ns
        row.facility_j += it_j * f.pue
        row.carbon_g += c
        row.water_site_l += ws
        row.water_offsite_l += wo
        t = t1
        n += 1
    pk = ledger.upsert_job(db, row)
    ledger.put_series(db, [(pk, tb, t1, key, *rest) for tb, t1, *rest in series])
    return row


def build_ledger(path: Path) -> Path:
    """The fixture ledger: alice's jobs on three clusters, a few of bob's and carol's, node totals and
    a routing decision. Returns the path."""
    cfg = config()
    fs = {c: factors(cfg, c) for c in cfg.clusters}
    ledger = Ledger(path)
    with ledger.transaction() as db:
        # alice: a running two-node GPU job on the site cluster, measured
        for node, share in (("site-n1", 1.0), ("site-n2", 0.8)):
            _job(ledger, db, JobRow(
                cluster="site", job_id="812345", node=node, kind="slurm", state="running",
                first_seen=NOW - 2.5 * H, last_seen=NOW - 20, submit_time=int(NOW - 2.6 * H),
                name="train-unet", user="alice", account="imaging", partition="gpu", tier="site",
                alloc_cpus=16, alloc_mem_bytes=64 * GIB, alloc_gpus=2, max_mem_bytes=40 * GIB,
                provenance={"cpu": RAPL, "dram": RAPL_DRAM, "gpu": NVML}, meta={"busy": 0.8}),
                fs["site"], {"cpu": 120 * share, "dram": 15 * share, "gpu": 480 * share}, peak_w=150)
        # alice: an over-sized preprocessing job that ended (advice), with a routing decision
        _job(ledger, db, JobRow(
            cluster="site", job_id="812300", node="site-n3", kind="slurm", state="ended",
            first_seen=NOW - 30 * H, last_seen=NOW - 26 * H, end_time=NOW - 26 * H,
            submit_time=int(NOW - 30.2 * H), name="preprocess-cohort", user="alice", account="imaging",
            partition="batch", tier="site", alloc_cpus=32, alloc_mem_bytes=128 * GIB,
            max_mem_bytes=int(6.5 * GIB), provenance={"cpu": RAPL, "memory": MEM},
            meta={"busy": 0.12}, exit_code=0),
            fs["site"], {"cpu": 95.0, "memory": 47.7})
        # alice: a national molecular dynamics run, the biggest footprint
        _job(ledger, db, JobRow(
            cluster="national", job_id="4410021", node="nat-r12", kind="slurm", state="ended",
            first_seen=NOW - 6 * 24 * H, last_seen=NOW - 5 * 24 * H, end_time=NOW - 5 * 24 * H,
            submit_time=int(NOW - 6.2 * 24 * H), name="md-ligand-screen", user="alice",
            account="imaging", partition="cpu", tier="national", alloc_cpus=128,
            alloc_mem_bytes=256 * GIB, max_mem_bytes=180 * GIB,
            provenance={"cpu": RAPL, "dram": RAPL_DRAM}, meta={"busy": 0.95}, exit_code=0),
            fs["national"], {"cpu": 420.0, "dram": 60.0})
        # alice: a `greend measure` run on her workstation-class node, modelled
        _job(ledger, db, JobRow(
            cluster="site", job_id="20260310-093000-4242", node="site-login1", kind="command",
            state="ended", first_seen=NOW - 2.5 * H, last_seen=NOW - 2.5 * H + 95,
            end_time=NOW - 2.5 * H + 95, submit_time=int(NOW - 2.5 * H), name="python3",
            user="alice", tier="site", alloc_cpus=2, max_mem_bytes=int(1.2 * GIB),
            provenance={"cpu": TDP, "memory": MEM}, command="python3 analyse.py --cohort 2019",
            meta={"busy": 0.5}, exit_code=0),
            fs["site"], {"cpu": 14.0, "memory": 0.5})
        # alice: older jobs, to fill a page and test periods (one in each of the last 20 days)
        for i in range(20):
            start = NOW - (2 + i * 1.7) * 24 * H
            _job(ledger, db, JobRow(
                cluster="site" if i % 3 else "oldlab", job_id=str(811000 + i * 7), node=f"site-n{i % 4 + 1}",
                kind="slurm", state="ended", first_seen=start, last_seen=start + (1 + i % 5) * H,
                end_time=start + (1 + i % 5) * H, submit_time=int(start - 60),
                name=("align-reads", "qc-report", "variant-call", "fit-model")[i % 4] + f"-{i:02d}",
                user="alice", account="imaging" if i % 2 else "genomics", partition="batch",
                tier="site" if i % 3 else "local", alloc_cpus=4 + 4 * (i % 3),
                alloc_mem_bytes=(8 + 8 * (i % 2)) * GIB, max_mem_bytes=(3 + i % 6) * GIB,
                provenance={"cpu": RAPL, "dram": RAPL_DRAM}, meta={"busy": 0.7},
                exit_code=1 if i % 7 == 3 else 0),
                fs["site" if i % 3 else "oldlab"], {"cpu": 30.0 + 5 * (i % 4), "dram": 4.0})
        # bob and carol, for the "all users" view and the admins' summary
        for i, (user, account) in enumerate((("bob", "genomics"), ("carol", "epidemiology"),
                                             ("bob", "genomics"), ("carol", "cohort-study"))):
            start = NOW - (1 + 2 * i) * H - 3 * 24 * H * (i % 2)
            _job(ledger, db, JobRow(
                cluster="site", job_id=str(812400 + i), node="site-n4", kind="slurm",
                state="running" if i == 0 else "ended", first_seen=start,
                last_seen=NOW - 15 if i == 0 else start + 2 * H,
                end_time=None if i == 0 else start + 2 * H, submit_time=int(start - 30),
                name=f"job-{user}-{i}", user=user, account=account, partition="batch", tier="site",
                alloc_cpus=8, alloc_mem_bytes=32 * GIB, max_mem_bytes=20 * GIB,
                provenance={"cpu": RAPL, "dram": RAPL_DRAM},
                # no exit code recorded: Slurm's final state says how they ended, when known
                meta={"busy": 0.85, **({"slurm_state": SLURM_STATES[i]} if SLURM_STATES[i] else {})}),
                fs["site"], {"cpu": 60.0 + 20 * i, "dram": 8.0})
        # the nodes' books: what was measured and what no job was charged
        for node, e_kwh, un in (("site-n1", 30.0, 0.06), ("site-n2", 26.0, 0.08),
                                ("site-n3", 12.0, 0.21), ("site-n4", 9.0, 0.35)):
            e_uj = round(e_kwh * J_PER_KWH * 1e6)
            ledger.put_node_totals(db, node, [("package-0", "cpu", RAPL, e_uj, round(e_uj * un), 0)])
            ledger.put_node_series(db, node, [(NOW - 10 * 24 * H, NOW, e_uj, round(e_uj * un))])
        # the policy engine's record of why the preprocessing job went to the site cluster
        decision = {
            "outcome": "submitted", "cluster": "site",
            "summary": "site: health data stays on HDS-certified hosting; the site comes first",
            "candidates": [
                {"cluster": "lab", "tier": "local", "eligible": False, "rejected_by": "hds",
                 "held_by": [], "score": None},
                {"cluster": "site", "tier": "site", "eligible": True, "rejected_by": None,
                 "held_by": [], "score": 0.82,
                 "estimate": {"it_energy_j": 9.0e6, "carbon_g": 210.0, "water_l": 4.1}},
            ],
            "rules": [{"rule": "hds", "kind": "filter", "cluster": "lab", "verdict": "reject",
                       "reason": "health data (hds) only on HDS-certified clusters", "numbers": {}}],
        }
        db.execute(
            "INSERT INTO decisions (token, t, user, uid, job_name, account, outcome, cluster, tier, "
            "job_id, decision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("tok-812300", NOW - 30.2 * H, "alice", 1000, "preprocess", "cohort", "submitted", "site",
             "site", "812300", json.dumps(decision)))
    ledger.close()
    return path


def local_time_is_utc(monkeypatch):
    """For a fixture: local time is UTC, so times printed by the app are the same on every machine."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# -- greend's /api/v1 over the fixture ledger, as specified by the project lead ---------------------
class ApiHandler(BaseHTTPRequestHandler):
    ledger_path: Path
    cfg = None

    def log_message(self, *args) -> None:  # quiet in tests
        pass

    def _send(self, status: int, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        u = urllib.parse.urlsplit(self.path)
        q = {k: v[0] for k, v in urllib.parse.parse_qs(u.query).items()}
        ledger = Ledger(self.ledger_path, readonly=True)
        try:
            parts = u.path.strip("/").split("/")
            if parts[:3] == ["api", "v1", "jobs"] and len(parts) == 3:
                limit, offset = int(q.get("limit", 100)), int(q.get("offset", 0))
                rows = ledger.jobs(user=q.get("user"), account=q.get("account"), cluster=q.get("cluster"),
                                   state=q.get("state"),
                                   since=float(q["since"]) if "since" in q else None,
                                   until=float(q["until"]) if "until" in q else None,
                                   limit=limit + 1, offset=offset)
                nxt = offset + limit if len(rows) > limit else None
                self._send(200, {"jobs": [r.to_dict() for r in rows[:limit]], "next_offset": nxt})
            elif parts[:3] == ["api", "v1", "jobs"] and len(parts) == 5:
                rows = ledger.get_job(urllib.parse.unquote(parts[3]), urllib.parse.unquote(parts[4]))
                if not rows:
                    self._send(404, {"error": "no such job"})
                    return
                recs = []
                for r in rows:
                    d = report.footprint_dict(r, ledger.factor_sets_of(r.pk))
                    d["series"] = [{k: s[k] for k in ("t_start", "t_end", "cpu_uj", "dram_uj", "gpu_uj",
                                                      "memory_uj", "carbon_g", "water_site_l",
                                                      "water_offsite_l")} for s in ledger.series(r.pk)]
                    recs.append(d)
                self._send(200, {"records": recs})
            elif u.path == "/api/v1/clusters":
                cfg = self.cfg
                self._send(200, {"clusters": {
                    n: {"tier": c.tier, "hds": c.hds, "open": c.open,
                        "factors": config_mod.cluster_factors(cfg, n).at(NOW).to_dict()}
                    for n, c in cfg.clusters.items()}})
            elif u.path == "/api/v1/summary":
                by = q.get("by", "account")
                since = float(q["since"]) if "since" in q else 0.0
                rows = ledger.db.execute(
                    f"SELECT {by}, sum(cpu_uj + dram_uj + gpu_uj + memory_uj) / 1e6, sum(carbon_g), "
                    "sum(water_site_l + water_offsite_l), count(*) FROM jobs WHERE last_seen >= ? "
                    f"GROUP BY {by}", (since,)).fetchall()
                e, un = ledger.db.execute(
                    "SELECT sum(energy_uj), sum(unattributed_uj) FROM node_totals").fetchone()
                self._send(200, {"rows": [{"key": k, "it_energy_j": a, "carbon_g": b, "water_l": c,
                                           "jobs": n} for k, a, b, c, n in rows],
                                 "unattributed_j": un / 1e6, "node_energy_j": e / 1e6})
            else:
                self._send(404, {"error": f"no route {u.path}"})
        finally:
            ledger.close()


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("local", 0)


class ApiServer:
    """The fake API on a unix socket (or TCP port); stop() and start() again to lose the connection."""

    def __init__(self, ledger_path: Path, socket_path: Path | None = None):
        self.handler = type("Handler", (ApiHandler,), {"ledger_path": ledger_path, "cfg": config()})
        self.socket_path = socket_path
        self.server = None
        self.port = 0

    def start(self) -> ApiServer:
        if self.socket_path is not None:
            if self.socket_path.exists():
                os.unlink(self.socket_path)
            self.server = _UnixHTTPServer(str(self.socket_path), self.handler)
        else:
            self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
            self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
            if self.socket_path is not None and self.socket_path.exists():
                os.unlink(self.socket_path)


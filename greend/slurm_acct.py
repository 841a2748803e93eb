"""greend's figures in Slurm's accounting: the final footprint written into a finished job's
AdminComment (`greend slurm epilog`), read back by `greend report JOBID` (a `seff` for
footprints) and appended to Slurm's end-of-job mail (`greend slurm mail`).

The comment survives sacctmgr, which lowercases the value and turns `"` into a backtick: it is
lowercase `key=value` words without quotes, `|` or commas, e.g.

    greend v1 final t=1796114764 nodes=1 e_j=1234.5 cpu_j=1100 ... co2_g=0.11 ... src=cpu:measured
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from . import units
from .collectors.sacct import Sacct, SacctError, SacctJob

log = logging.getLogger(__name__)

J_PER_KWH = 3.6e6
GIB = 1 << 30
MIB = 1 << 20

# -- the comment ---------------------------------------------------------------------------------
STATUSES = ("provisional", "final")
_KEYS = (
    # comment key, Figures attribute
    ("e_j", "it_j"), ("cpu_j", "cpu_j"), ("dram_j", "dram_j"), ("mem_j", "memory_j"),
    ("gpu_j", "gpu_j"), ("fac_j", "facility_j"), ("co2_g", "carbon_g"),
    ("h2o_site_l", "water_site_l"), ("h2o_off_l", "water_offsite_l"), ("cpu_s", "cpu_s"),
    ("pue", "pue"), ("ci_g_kwh", "ci_g_per_kwh"), ("wue_l_kwh", "wue_l_per_kwh"),
    ("ewif_l_kwh", "ewif_l_per_kwh"), ("mem_peak_b", "max_mem_bytes"),
)
_COMMENT_RE = re.compile(r"greend v1 (provisional|final) (.*)$")


@dataclass(slots=True)
class Figures:
    """A job's footprint summed over its nodes' records, as stored in its AdminComment."""

    status: str
    """"final" (every node's record closed) or "provisional" (some still open or missing)."""
    t: int
    """Newest last-seen time of the records it sums: a later figure of the same status wins."""
    nodes: int
    it_j: float = 0.0
    cpu_j: float = 0.0
    dram_j: float = 0.0
    memory_j: float = 0.0
    gpu_j: float = 0.0
    facility_j: float = 0.0
    carbon_g: float = 0.0
    water_site_l: float = 0.0
    water_offsite_l: float = 0.0
    cpu_s: float = 0.0
    pue: float | None = None
    ci_g_per_kwh: float | None = None
    wue_l_per_kwh: float | None = None
    ewif_l_per_kwh: float | None = None
    max_mem_bytes: float | None = None
    """Peak resident memory greend saw, summed over the nodes."""
    src: dict[str, str] = field(default_factory=dict)
    """Per energy source, how it was obtained in short: "measured" or "modelled"."""

    @property
    def final(self) -> bool:
        return self.status == "final"

    def newer_than(self, other: Figures | None) -> bool:
        """Whether this should replace `other`: final beats provisional, then the later one."""
        if other is None:
            return True
        return (STATUSES.index(self.status), self.t) > (STATUSES.index(other.status), other.t)

    def to_dict(self) -> dict:
        return asdict(self)


def _num(v: float) -> str:
    return f"{v:.6g}"


def encode(f: Figures) -> str:
    words = ["greend", "v1", f.status, f"t={f.t}", f"nodes={f.nodes}"]
    for key, attr in _KEYS:
        v = getattr(f, attr)
        if v is not None:
            words.append(f"{key}={_num(v)}")
    if f.src:
        words.append("src=" + "/".join(f"{k}:{v}" for k, v in sorted(f.src.items())))
    return " ".join(words).lower()


def decode(comment: str) -> Figures | None:
    """greend's figures in an AdminComment (as sacct shows it), or None if it holds none."""
    for part in (comment or "").split(" | "):
        m = _COMMENT_RE.match(part.strip())
        if not m:
            continue
        kv = dict(w.partition("=")[::2] for w in m[2].split() if "=" in w)
        try:
            f = Figures(status=m[1], t=int(kv.get("t", "0")), nodes=int(kv.get("nodes", "0")))
            for key, attr in _KEYS:
                if key in kv:
                    setattr(f, attr, float(kv[key]))
        except ValueError:
            log.warning("unreadable greend figures in AdminComment: %r", part)
            return None
        if kv.get("src"):
            f.src = dict(s.partition(":")[::2] for s in kv["src"].split("/") if ":" in s)
        return f
    return None


def merge(existing: str, entry: str) -> str | None:
    """The AdminComment with greend's entry replaced; None if other text is there that sacctmgr
    would corrupt (it lowercases everything, e.g. Jobstats' base64 summary)."""
    keep = [p.strip() for p in (existing or "").split(" | ")
            if p.strip() and not p.strip().startswith("greend")]
    if any(p != p.lower() or '"' in p for p in keep):
        return None
    return " | ".join([*keep, entry])


# -- greend's figures: from a ledger or a greend API ----------------------------------------------
class SourceError(Exception):
    """greend's records could not be read; the message says where and why."""


def _short_prov(text: str) -> str:
    t = (text or "").lower()
    return "measured" if t.startswith("measured") else "modelled" if t.startswith("modelled") else (
        re.sub(r"[^a-z0-9_.-]", "", t.split(":")[0].split()[0]) if t.split() else "unknown")


def sum_records(records: list[dict], expected_nodes: int) -> Figures | None:
    """Sum per-node footprint records (report.footprint_dict's shape) into one Figures."""
    if not records:
        return None
    done = all(r["job"]["state"] == "ended" for r in records)
    nodes = {r["job"]["node"] for r in records}
    f = Figures(status="final" if done and len(nodes) >= expected_nodes else "provisional",
                t=int(max(r["job"]["last_seen"] for r in records)), nodes=len(nodes))
    for r in records:
        e = r["energy_j"]
        f.it_j += e["it"]
        f.cpu_j += e["cpu"]
        f.dram_j += e["dram"]
        f.memory_j += e["memory"]
        f.gpu_j += e["gpu"]
        f.facility_j += e["facility"]
        f.carbon_g += r["carbon_g"]
        f.water_site_l += r["water_l"]["site"]
        f.water_offsite_l += r["water_l"]["offsite"]
        f.cpu_s += r["cpu_time_s"]
        if r["job"].get("max_mem_bytes"):
            f.max_mem_bytes = (f.max_mem_bytes or 0) + r["job"]["max_mem_bytes"]
        for src, text in (r.get("provenance") or {}).items():
            f.src[src] = _short_prov(text)
        if r.get("factors"):
            last = r["factors"][-1]
            f.pue = last["pue"]
            f.ci_g_per_kwh = last["carbon_intensity_g_per_kwh"]
            f.wue_l_per_kwh = last["wue_site_l_per_kwh"]
            f.ewif_l_per_kwh = last["ewif_l_per_kwh"]
    return f


class LedgerSource:
    """Records from greend ledgers (a node's, or the controller's): read-only."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]

    def describe(self) -> str:
        return "ledger " + ", ".join(map(str, self.paths))

    def records(self, cluster: str, job_id: str) -> list[dict]:
        from .ledger import Ledger, LedgerError
        from .report import footprint_dict

        out = []
        for path in self.paths:
            if not path.exists():
                raise SourceError(f"no ledger at {path}")
            try:
                led = Ledger(path, readonly=True)
            except LedgerError as e:
                raise SourceError(str(e)) from None
            try:
                out += [footprint_dict(r, led.factor_sets_of(r.pk)) for r in led.get_job(cluster, job_id)]
            finally:
                led.close()
        return out


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


class ApiSource:
    """Records from a greend API: a node agent or the site controller, by URL (http://HOST:PORT)
    or unix socket (unix:/run/greend/greend.sock)."""

    def __init__(self, url: str, timeout_s: float = 10.0):
        self.url = url
        self.timeout_s = timeout_s
        if url.startswith("unix:"):
            self.socket_path, self.base = url[len("unix:"):], ""
        else:
            u = urlsplit(url)
            if u.scheme != "http" or not u.hostname:
                raise SourceError(f"--api {url!r}: expected http://HOST:PORT or unix:/PATH")
            self.socket_path, self.base = None, u.path.rstrip("/")
            self.host, self.port = u.hostname, u.port or 80

    def describe(self) -> str:
        return f"greend API {self.url}"

    def records(self, cluster: str, job_id: str) -> list[dict]:
        path = f"{self.base}/api/v1/jobs/{quote(cluster, safe='')}/{quote(str(job_id), safe='')}"
        conn = (_UnixConnection(self.socket_path, self.timeout_s) if self.socket_path
                else http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s))
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
        except OSError as e:
            raise SourceError(f"{self.url}: {e}") from None
        finally:
            conn.close()
        if r.status == 404:
            return []
        if r.status != 200:
            raise SourceError(f"{self.url}{path}: HTTP {r.status}: {body[:200].decode(errors='replace')}")
        try:
            return json.loads(body)["records"]
        except (ValueError, KeyError) as e:
            raise SourceError(f"{self.url}{path}: unreadable answer ({e})") from None


def figures_of(source, sj: SacctJob) -> Figures | None:
    """greend's figures for a job in accounting; records of an earlier job with that id (greend
    saw it before Slurm says it was submitted) are left out."""
    recs = source.records(sj.cluster, sj.job_id_raw)
    if sj.submit_time:
        recs = [r for r in recs if r["job"]["first_seen"] >= sj.submit_time - 5]
    return sum_records(recs, max(sj.alloc_nodes, 1))


# -- the epilog ----------------------------------------------------------------------------------
@dataclass
class EpilogResult:
    written: Figures | None
    comment: str
    note: str


def write_final(sacct: Sacct, source, job_id: str, cluster: str | None, *, wait_s: float = 120.0,
                final_wait_s: float = 30.0, complete_wait_s: float = 600.0, poll_s: float = 1.0,
                clock=time.monotonic, sleep=time.sleep) -> EpilogResult:
    """Write a finished job's footprint into its accounting record, final if possible.

    Waits (up to wait_s) until accounting shows the job ended, so that slurmctld's own end
    record cannot overwrite the comment afterwards; then for the nodes' final records (up to
    final_wait_s). If they are not all in, a provisional figure is written and completed when
    they arrive (up to complete_wait_s). An older figure never replaces a newer one.
    """
    start = clock()
    sj = None
    while clock() - start < wait_s:
        sj = sacct.job(job_id, cluster)
        if sj is not None and sj.ended and sj.end_time:
            break
        sleep(poll_s)
    else:
        return EpilogResult(None, sj.admin_comment if sj else "",
                            f"job {job_id} not recorded as ended in accounting after {wait_s:g} s")
    written: Figures | None = None
    note = ""
    t0 = clock()
    error = ""
    while True:
        try:
            fig = figures_of(source, sj)
        except SourceError as e:  # the controller restarting, say: try again until the deadline
            fig, error = None, str(e)
        waited = clock() - t0
        due = fig is not None and (fig.final or (waited >= final_wait_s and written is None))
        if due and fig.newer_than(written):
            if not _write(sacct, sj, fig):
                note = "AdminComment holds other text that sacctmgr would lowercase: not written"
                break
            written = fig
        if written is not None and written.final:
            break
        if waited >= (complete_wait_s if written is not None else final_wait_s):
            note = (f"greend's records still incomplete after {waited:.0f} s: provisional figure left"
                    if written is not None else f"greend has no record of job {job_id}")
            if error:
                note += f" (last error: {error})"
            break
        sleep(poll_s)
    cur = sacct.job(job_id, cluster)
    return EpilogResult(written, cur.admin_comment if cur else "", note)


def _write(sacct: Sacct, sj: SacctJob, fig: Figures, attempts: int = 5) -> bool:
    """Write fig unless accounting already has a newer figure; verify it stuck (slurmctld's end
    record, arriving late, carries the controller's comment and would replace ours)."""
    entry = encode(fig)
    for _ in range(attempts):
        cur = sacct.job(sj.job_id_raw, sj.cluster) or sj
        have = decode(cur.admin_comment)
        if have is not None and not fig.newer_than(have):
            return True
        text = merge(cur.admin_comment, entry)
        if text is None:
            return False
        sacct.set_admin_comment(sj.job_id_raw, text, sj.cluster)
        time.sleep(0.5)
        check = sacct.job(sj.job_id_raw, sj.cluster)
        if check is not None and decode(check.admin_comment) == decode(entry):
            log.info("job %s/%s: %s", sj.cluster, sj.job_id, entry)
            return True
    raise SacctError(f"job {sj.job_id}: AdminComment did not keep greend's figure after {attempts} writes")


# -- the report ----------------------------------------------------------------------------------
def model_figures(sj: SacctJob, cfg) -> tuple[Figures, dict]:
    """Green Algorithms' estimate from what accounting recorded (docs/methodology.md §6), with the
    site's factors for the job's cluster; labelled as a model."""
    from . import config as config_mod

    p = cfg.power
    elapsed = sj.elapsed_s
    usage = min(sj.cpu_efficiency or 1.0, 1.0)
    cpu_j = elapsed * sj.alloc_cpus * p.unknown_cpu_w_per_core * usage
    mem_j = elapsed * (sj.alloc_mem_bytes or 0) / GIB * p.memory_w_per_gb
    gpu_j = elapsed * sj.alloc_gpus * p.gpu_tdp_w
    it = cpu_j + mem_j + gpu_j
    name = sj.cluster if sj.cluster in cfg.clusters else None
    fs = config_mod.cluster_factors(cfg, name).at(sj.end_time or time.time())
    kwh = it / J_PER_KWH
    f = Figures(status="final", t=sj.end_time or 0, nodes=sj.alloc_nodes, it_j=it, cpu_j=cpu_j,
                memory_j=mem_j, gpu_j=gpu_j, facility_j=it * fs.pue,
                carbon_g=kwh * fs.pue * fs.carbon_intensity_g_per_kwh,
                water_site_l=kwh * fs.wue_site_l_per_kwh, water_offsite_l=kwh * fs.pue * fs.ewif_l_per_kwh,
                cpu_s=sj.cpu_time_s, pue=fs.pue, ci_g_per_kwh=fs.carbon_intensity_g_per_kwh,
                wue_l_per_kwh=fs.wue_site_l_per_kwh, ewif_l_per_kwh=fs.ewif_l_per_kwh,
                src={k: "modelled" for k in ("cpu", "memory", "gpu") if k != "gpu" or sj.alloc_gpus})
    how = {
        "formula": "E = t x (n_cpu x P_cpu x u_cpu + mem_GB x P_mem + n_gpu x P_gpu)",
        "cpu_w_per_core": p.unknown_cpu_w_per_core, "cpu_usage": round(usage, 4),
        "memory_w_per_gb": p.memory_w_per_gb, "gpu_w": p.gpu_tdp_w,
        "factors_of": name or cfg.cluster, "factor_sources": dict(fs.sources),
    }
    return f, how


def advice(sj: SacctJob, fig: Figures | None, gpu_w: float) -> list[dict]:
    """What to ask for next time (right-sizing), each with the option to use and why."""
    out = []
    eff = sj.cpu_efficiency
    if eff is not None and sj.alloc_cpus > 1 and eff < 0.5 and sj.elapsed_s >= 60:
        need = max(1, math.ceil(sj.cpu_time_s / sj.elapsed_s * 1.2))
        if need < sj.alloc_cpus:
            out.append({"what": "cpus", "option": f"--cpus-per-task={need}",
                        "why": f"used {eff:.0%} of {sj.alloc_cpus:g} CPUs"})
    meff = sj.mem_efficiency
    if meff is not None and sj.max_rss_bytes and meff < 0.5 and sj.alloc_mem_bytes \
            and sj.alloc_mem_bytes > 512 * MIB:
        need_mb = max(256, math.ceil(sj.max_rss_bytes * 1.25 / MIB / 64) * 64)
        out.append({"what": "memory", "option": f"--mem={need_mb}M",
                    "why": f"peak {sj.max_rss_bytes / MIB:.0f} MiB of {sj.alloc_mem_bytes / MIB:.0f} MiB"})
    limit = sj.time_limit_s
    if limit and limit > 3600 and sj.state == "COMPLETED" and 0 < sj.elapsed_s < 0.25 * limit:
        need_min = max(10, math.ceil(sj.elapsed_s * 1.5 / 60 / 5) * 5)
        out.append({"what": "time", "option": f"--time={need_min}",
                    "why": f"ran {units.duration(sj.elapsed_s)} of a {units.duration(limit)} limit "
                           "(shorter limits start sooner through backfill)"})
    gu = gpu_use(sj, fig, gpu_w)
    if gu is not None and gu < 0.1:
        out.append({"what": "gpus", "option": "--gpus=0" if gu < 0.02 else "fewer GPUs",
                    "why": f"the GPUs drew {gu:.0%} of their rated power: mostly idle"})
    return out


def gpu_use(sj: SacctJob, fig: Figures | None, gpu_w: float) -> float | None:
    """GPU energy / (GPUs x rated power x elapsed), where greend measured the GPUs."""
    if not sj.alloc_gpus or fig is None or fig.src.get("gpu") != "measured" or not sj.elapsed_s:
        return None
    return fig.gpu_j / (sj.alloc_gpus * gpu_w * sj.elapsed_s)


def build_report(sj: SacctJob, cfg, source=None) -> dict:
    """The report of one job: Slurm's view (sacct), greend's figures, advice. greend's figures
    come from `source` (a ledger or API) if it knows the job, else from the job's AdminComment
    in accounting, else from the model (labelled). `cfg` may be a function that loads the
    configuration: it is then called only when needed (the model, GPUs), which spares
    `greend report` the configuration's validation for most jobs."""
    if callable(cfg):
        load, cfg = cfg, None

        def config():
            nonlocal cfg
            if cfg is None:
                cfg = load()
            return cfg
    else:
        def config():
            return cfg
    fig = None
    origin = ""
    source_error = None
    if source is not None:
        try:
            fig = figures_of(source, sj)
            origin = source.describe()
        except SourceError as e:
            source_error = str(e)
    stored = decode(sj.admin_comment)
    if stored is not None and (fig is None or stored.newer_than(fig)):
        fig, origin = stored, "Slurm accounting (AdminComment)"
    model = None
    if fig is not None:
        kind = "measured"
        label = (f"greend's {'final' if fig.final else 'provisional'} figures, from {origin}")
    else:
        fig, model = model_figures(sj, config())
        kind = "model"
        label = ("greend did not see this job: model estimate from Slurm's accounting "
                 "(Green Algorithms, docs/methodology.md §6)")
    gpu_w = config().power.gpu_tdp_w if sj.alloc_gpus else 0.0
    peak, peak_from = sj.max_rss_bytes, "sacct MaxRSS"
    if not peak and kind == "measured" and fig.max_mem_bytes:
        peak, peak_from = int(fig.max_mem_bytes), "greend"
    d = {
        "job": {
            "cluster": sj.cluster, "job_id": sj.job_id, "name": sj.name, "user": sj.user,
            "account": sj.account, "partition": sj.partition, "state": sj.state,
            "exit_code": sj.exit_code, "submit_time": sj.submit_time, "start_time": sj.start_time,
            "end_time": sj.end_time, "elapsed_s": sj.elapsed_s, "time_limit_s": sj.time_limit_s,
            "nodes": sj.nodes, "alloc_nodes": sj.alloc_nodes, "alloc_cpus": sj.alloc_cpus,
            "alloc_mem_bytes": sj.alloc_mem_bytes, "alloc_gpus": sj.alloc_gpus,
        },
        "efficiency": {
            "cpu": sj.cpu_efficiency, "cpu_time_s": sj.cpu_time_s,
            "memory": peak / sj.alloc_mem_bytes if peak and sj.alloc_mem_bytes else None,
            "peak_mem_bytes": peak or None, "peak_mem_from": peak_from if peak else None,
            "gpu": gpu_use(sj, fig, gpu_w),
        },
        "footprint": {"kind": kind, "label": label, **fig.to_dict(),
                      "water_l": fig.water_site_l + fig.water_offsite_l},
        "advice": advice(sj, fig if kind == "measured" else None, gpu_w),
    }
    if model:
        d["footprint"]["model"] = model
    if source_error:
        d["source_error"] = source_error
    return d


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def text(d: dict) -> str:
    j, e, f = d["job"], d["efficiency"], d["footprint"]
    lines = [
        f"Job ID: {j['job_id']}  Cluster: {j['cluster']}  Name: {j['name']}",
        f"User/Account: {j['user']}/{j['account']}  Partition: {j['partition']}",
        f"State: {j['state']} (exit code {j['exit_code']})",
        f"Nodes: {j['alloc_nodes']} ({j['nodes']})  CPUs: {j['alloc_cpus']:g}  Memory: "
        + (f"{j['alloc_mem_bytes'] / MIB:.0f} MiB" if j["alloc_mem_bytes"] else "n/a")
        + f"  GPUs: {j['alloc_gpus']}",
        f"Elapsed: {units.duration(j['elapsed_s'])}"
        + (f" of a {units.duration(j['time_limit_s'])} limit" if j["time_limit_s"] else ""),
        f"CPU efficiency: {_pct(e['cpu'])} (CPU time {units.duration(e['cpu_time_s'])} of "
        f"{units.duration(j['alloc_cpus'] * j['elapsed_s'])} core-walltime)",
        f"Memory efficiency: {_pct(e['memory'])}"
        + (f" (peak {e['peak_mem_bytes'] / MIB:.0f} MiB, {e['peak_mem_from']})" if e["peak_mem_bytes"]
           else " (peak not recorded)"),
        f"GPU use: {_pct(e['gpu'])}" if j["alloc_gpus"] else "GPU use: no GPUs allocated",
        "",
        f"Footprint: {f['label']}",
    ]

    def row(label, value, note=""):
        lines.append(f"  {label:<20}{value:>14}   {note}".rstrip())

    row("Energy (IT)", units.energy(f["it_j"]), f"= {f['it_j'] / 3600:.4g} Wh")
    for key, label, src in (("cpu_j", "CPU", "cpu"), ("dram_j", "DRAM", "dram"),
                            ("memory_j", "Memory", "memory"), ("gpu_j", "GPU", "gpu")):
        if f[key] or src in f["src"]:
            row(f"  {label}", units.energy(f[key]), f["src"].get(src, ""))
    row("Energy (facility)", units.energy(f["facility_j"]), f"x PUE {f['pue']:g}" if f["pue"] else "")
    row("Carbon", units.carbon(f["carbon_g"]), "location-based")
    row("Water", units.water(f["water_l"]),
        f"on-site {units.water(f['water_site_l'])}, off-site {units.water(f['water_offsite_l'])}")
    if f["pue"] is not None:
        lines.append(f"  Factors: PUE {f['pue']:g}, carbon intensity {f['ci_g_per_kwh']:.4g} g/kWh, "
                     f"WUE {f['wue_l_per_kwh']:g} L/kWh, EWIF {f['ewif_l_per_kwh']:.3g} L/kWh")
    if f.get("model"):
        m = f["model"]
        lines.append(f"  Model: {m['formula']}; P_cpu {m['cpu_w_per_core']:g} W/core, u_cpu "
                     f"{m['cpu_usage']:g}, P_mem {m['memory_w_per_gb']:g} W/GB, P_gpu {m['gpu_w']:g} W")
    if d.get("source_error"):
        lines.append(f"  (greend's records could not be read: {d['source_error']})")
    lines.append("")
    if d["advice"]:
        lines.append("Next time:")
        lines += [f"  {a['option']:<22} {a['why']}" for a in d["advice"]]
    else:
        lines.append("Next time: the request fitted the job; nothing to change.")
    return "\n".join(lines) + "\n"


def wait_report(sacct: Sacct, job_id: str, cluster: str | None, cfg, source, *, wait_s: float,
                poll_s: float = 1.0) -> dict | None:
    """The report once greend's final figures are in (accounting or source), or after wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        sj = sacct.job(job_id, cluster)
        d = build_report(sj, cfg, source) if sj is not None else None
        if d is not None and d["footprint"]["kind"] == "measured" and d["footprint"]["status"] == "final":
            return d
        if time.monotonic() >= deadline:
            return d
        time.sleep(poll_s)


def detach() -> bool:
    """Fork into the background (new session, stdio to /dev/null); True in the child."""
    if os.fork() > 0:
        return False
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    fd = os.open(os.devnull, os.O_RDWR)
    for n in (0, 1, 2):
        os.dup2(fd, n)
    return True


def source_from(api: str | None, ledgers: list[str] | None):
    if api:
        return ApiSource(api)
    if ledgers:
        return LedgerSource([Path(p) for p in ledgers])
    return None

"""Records across sites (docs/site-mode.md, "An institute controller"): a site controller forwards
what it stores to an institute controller exactly as an agent sends to it: the same batches, token,
outbox and retries (greend.agent's Outbox and Sender; greend.wire's batch format).

The outbox lives in the site ledger and is written in the transaction that stores an agent's batch,
so a record is stored and queued together or not at all. Each request upstream carries one node's
records (the institute checks, as for any agent, that a batch's records are its node's), with the
cluster and node names prefixed by the site's name ("SITE:NAME"): cluster names are not unique
across sites (the default is "local") and node tables are keyed by node name.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

from . import __version__
from . import config as config_mod
from .agent import MAX_REQUEST_BYTES, MAX_SERIES_PER_BATCH, Outbox, Sender, _job_record
from .http import client_tls
from .ledger import Ledger
from .wire import FACTOR_COLS, SERIES_COLS, read_token

log = logging.getLogger(__name__)

SEP = ":"
NODE_KIND = "node:"  # outbox kind of a node's totals: "node:<name>" (ref 0); jobs use "job"
WINDOW = 4  # a batch looks for its node's entries among the oldest WINDOW x batch_records


def upstream_settings(c: config_mod.Controller) -> config_mod.Controller:
    """The [controller] table as the Sender reads it, pointed at the institute."""
    return c.model_copy(update={"url": c.upstream_url, "token_file": c.upstream_token_file,
                                "ca_file": c.upstream_ca_file})


def upstream_token(c: config_mod.Controller) -> bytes:
    return read_token(c.upstream_token_file, "controller.upstream_token_file")


def site_name(site: str, name: str) -> str:
    return f"{site}{SEP}{name}"


class Forwarder(Sender):
    """Drains the site ledger's outbox to the institute controller, one node's records a batch."""

    def __init__(self, c: config_mod.Controller, token: bytes, ledger_path: Path):
        super().__init__(upstream_settings(c), token, ledger_path, cluster=c.site, node="",
                         outbox=Outbox(monitor=None))
        self.site = c.site

    def update(self, settings: config_mod.Controller, token: bytes) -> None:
        self.site = settings.site
        super().update(upstream_settings(settings), token)

    def queue(self, db: sqlite3.Connection, jobs: list[tuple[int, float]],
              nodes: dict[str, float]) -> None:
        """In the store's transaction: jobs (pk, oldest series bucket stored) and nodes (name ->
        oldest node series bucket stored) to forward."""
        if jobs:
            self.outbox.queue(db, jobs)
        if nodes:
            now = time.time()
            db.executemany(
                "INSERT INTO outbox (kind, ref, seq, series_from, queued) VALUES (?, 0, 1, ?, ?) "
                "ON CONFLICT (kind, ref) DO UPDATE SET seq = outbox.seq + 1, "
                "series_from = MIN(outbox.series_from, excluded.series_from)",
                [(NODE_KIND + n, t, now) for n, t in nodes.items()])

    # One batch: the node of the oldest queued entry, with its entries among the oldest WINDOW
    # (a bounded read per batch, however long an outage made the outbox).
    def _build(self, led: Ledger) -> tuple[bytes, list[tuple], int, bool]:
        db = led.db
        db.execute("BEGIN")  # one consistent snapshot of outbox and books
        try:
            total = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            node, rows = self._oldest_node(db)
            if node is None:
                return b"", [], 0, False
            records, nodes, items, factor_ids = [], [], [], set()
            budget, size = MAX_SERIES_PER_BATCH, 0
            for r in rows:
                kind, ref, seq, start = r["kind"], r["ref"], r["seq"], r["series_from"]
                if kind == "job":
                    series = db.execute(
                        "SELECT * FROM job_series WHERE job_pk = ? AND t_start >= ? "
                        "ORDER BY t_start LIMIT ?", (ref, start, budget + 1)).fetchall()
                    out = _job_record(db.execute("SELECT * FROM jobs WHERE pk = ?", (ref,)).fetchone())
                    out["cluster"] = site_name(self.site, out["cluster"])
                    out["node"] = site_name(self.site, node)
                    out["series"] = [{c: x[c] for c in SERIES_COLS} for x in series[:budget]]
                else:
                    series = db.execute(
                        "SELECT t_start, t_end, energy_uj, unattributed_uj FROM node_series "
                        "WHERE node = ? AND t_start >= ? ORDER BY t_start LIMIT ?",
                        (node, start, budget + 1)).fetchall()
                    totals = db.execute(
                        "SELECT domain, source, provenance, energy_uj, unattributed_uj, idle_uj "
                        "FROM node_totals WHERE node = ?", (node,)).fetchall()
                    out = {"node": site_name(self.site, node), "totals": [dict(t) for t in totals],
                           "series": [dict(x) for x in series[:budget]]}
                sent = series[:budget]
                done = len(series) <= budget
                resend_from = series[budget]["t_start"] if not done else (
                    sent[-1]["t_start"] if sent else start)
                n = len(json.dumps(out, separators=(",", ":")))
                if items and size + n > MAX_REQUEST_BYTES:
                    break
                size += n
                budget -= len(sent)
                if kind == "job":
                    factor_ids.update(x["factor_set"] for x in out["series"])
                    records.append(out)
                else:
                    nodes.append(out)
                items.append((kind, ref, seq, done, resend_from))
                if budget <= 0:
                    break
            factor_sets = []
            if factor_ids:
                marks = ",".join("?" * len(factor_ids))
                for f in db.execute(f"SELECT * FROM factor_sets WHERE id IN ({marks})",
                                    sorted(factor_ids)):
                    d = {c: f[c] for c in FACTOR_COLS}
                    d["sources"] = json.loads(d["sources"])
                    factor_sets.append(d)
        finally:
            db.execute("COMMIT")
        truncated = len(items) < total or not all(it[3] for it in items)
        batch = {"agent": {"cluster": self.site, "node": site_name(self.site, node),
                           "version": __version__},
                 "factor_sets": factor_sets, "records": records, "nodes": nodes}
        return json.dumps(batch, separators=(",", ":")).encode(), items, len(records), truncated

    def _oldest_node(self, db: sqlite3.Connection) -> tuple[str | None, list[sqlite3.Row]]:
        """The node of the oldest outbox entry and its entries among the oldest WINDOW x
        batch_records (at most batch_records jobs). An entry whose job is gone from the books
        (none should be) is dropped: there is nothing to send."""
        window = db.execute(
            "SELECT o.kind, o.ref, o.seq, o.series_from, j.node FROM (SELECT * FROM outbox "
            "ORDER BY queued, kind, ref LIMIT ?) o LEFT JOIN jobs j ON o.kind = 'job' AND j.pk = o.ref "
            "ORDER BY o.queued, o.kind, o.ref", (WINDOW * self.batch_limit,)).fetchall()
        node, rows, jobs = None, [], 0
        for r in window:
            name = r["kind"][len(NODE_KIND):] if r["kind"].startswith(NODE_KIND) else r["node"]
            if name is None:
                db.execute("DELETE FROM outbox WHERE kind = ? AND ref = ?", (r["kind"], r["ref"]))
                continue
            if node is None:
                node = name
            if name != node or (r["kind"] == "job" and jobs >= self.batch_limit):
                continue
            jobs += r["kind"] == "job"
            rows.append(r)
        return node, rows


def check_files(c: config_mod.Controller) -> None:
    """For `greend config check`: the upstream token and CA files, as the controller loads them
    at start. SiteError naming the key otherwise."""
    if c.upstream_url:
        upstream_token(c)
        if c.upstream_url.startswith("https://"):
            client_tls(c.upstream_ca_file, "controller.upstream_ca_file")


def from_config(c: config_mod.Controller, ledger_path: Path) -> Forwarder | None:
    """The forwarder of a controller with upstream_url set, else None. SiteError on a bad token."""
    if not c.upstream_url:
        return None
    return Forwarder(c, upstream_token(c), ledger_path)

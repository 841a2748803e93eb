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
from pathlib import Path

from . import __version__
from . import config as config_mod
from .agent import Outbox, Sender, pack
from .http import client_tls
from .ledger import Ledger
from .wire import read_token

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
        if jobs or nodes:
            self.outbox.queue(db, jobs, {NODE_KIND + n: t for n, t in nodes.items()})

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
            packed = pack(db, rows, node, self.batch_limit,
                          lambda name: site_name(self.site, name))
        finally:
            db.execute("COMMIT")
        items = packed.items
        truncated = len(items) < total or not all(it[3] for it in items)
        batch = {"agent": {"cluster": self.site, "node": site_name(self.site, node),
                           "version": __version__},
                 "factor_sets": packed.factor_sets, "records": packed.records,
                 "nodes": packed.nodes}
        return (json.dumps(batch, separators=(",", ":")).encode(), items, len(packed.records),
                truncated)

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

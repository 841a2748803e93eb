"""`greend run` and `greend controller`: command-line entry points of the node daemon and of the
site controller."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from .cmdline import fail as _fail
from .cmdline import load_config as _load_config


def add_commands(sub) -> None:
    r = sub.add_parser(
        "run", help="run the node daemon: sample, attribute, keep the ledger, serve /metrics and API",
        description="Run greend on this node: sample energy counters and job activity every "
        "sampling.interval_s, attribute energy to jobs, checkpoint the books to the ledger, and "
        "serve /metrics (Prometheus), /healthz and /api/v1 over HTTP (--listen, loopback by "
        "default) and a unix socket. SIGTERM/SIGINT: final checkpoint and exit; SIGHUP: reload "
        "the config (an invalid one is refused and the running one kept). After a crash or kill "
        "-9, a restart resumes from the last checkpoint's counter readings, so energy used while "
        "greend was down is still attributed.",
    )
    r.add_argument("--listen", metavar="HOST:PORT",
                   help="HTTP address (default: daemon.listen, 127.0.0.1:9471)")
    r.add_argument("--socket", metavar="PATH",
                   help="API unix socket (default: /run/greend/api.sock as root, else "
                   "<state_dir>/api.sock); '' for none")
    r.add_argument("--once", action="store_true",
                   help="take one sample interval, print it and exit (for debugging a node)")
    r.add_argument("--json", action="store_true", help="with --once: print JSON")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser(
        "controller", help="run the site controller: receive every node's job records, serve "
        "the site's ledger",
        description="Run the site controller (docs/site-mode.md): nodes running `greend run` "
        "with [controller] url set send their job records (partials and final) to it over HTTP, "
        "authenticated by the site token; it keeps them in its own ledger (--state-dir, "
        "controller.state_dir, or <state_dir>/controller) and serves the same read API as a node "
        "(/api/v1/jobs, /api/v1/summary, ...), /healthz and /metrics. SIGTERM/SIGINT: exit; "
        "SIGHUP: re-read the config and the token file (token rotation).",
    )
    c.add_argument("--listen", metavar="HOST:PORT",
                   help="HTTP address (default: controller.listen, 127.0.0.1:9472)")
    c.add_argument("--token-file", metavar="FILE",
                   help="the site token, readable by its owner only (default: "
                   "controller.token_file)")
    c.add_argument("--socket", metavar="PATH",
                   help="read API unix socket (default: /run/greend/controller.sock as root, else "
                   "<controller state dir>/api.sock); '' for none")
    c.set_defaults(func=cmd_controller)
    cs = c.add_subparsers(dest="controller_cmd", metavar="{migrate}")
    m = cs.add_parser(
        "migrate", help="copy a SQLite site ledger into a database server",
        description="Copy the controller's SQLite site ledger (jobs, series, node totals, "
        "decisions) into a MariaDB/MySQL or PostgreSQL site database (docs/site-mode.md, "
        "\"Migrating\"), with the controller's own upserts: a re-run changes nothing, and records "
        "that agents already sent there newer stay. The target's schema is created or upgraded; "
        "one newer than this greend is refused. Stop the SQLite controller first.")
    m.add_argument("--from", dest="src", metavar="PATH",
                   help="the SQLite ledger (default: the controller's, <controller state dir>/"
                   "ledger.sqlite)")
    m.add_argument("--to", metavar="URL", help="the database, e.g. postgresql+psycopg://greend@db:5432/"
                   "greend (default: controller.database)")
    m.add_argument("--password-file", metavar="FILE",
                   help="the database password (default: controller.database_password_file)")
    m.add_argument("--batch", type=int, default=1000, metavar="N", help="jobs per transaction")
    m.add_argument("--json", action="store_true", help="print the summary as JSON")
    m.set_defaults(func=cmd_controller_migrate)

    d = sub.add_parser("metrics-doc", help="print docs/metrics.md (generated from the exporter)")
    d.set_defaults(func=lambda a: (sys.stdout.write(__import__(
        "greend.exporter", fromlist=["x"]).metrics_markdown()), 0)[1])


def cmd_run(args) -> int:

    from .daemon import Daemon
    from .errors import DaemonError

    cfg = _load_config(args)
    if args.once:
        return _once(cfg, args.json)
    sock = None
    if args.socket is not None:
        sock = Path(args.socket) if args.socket else Path("")
    overrides = {"state_dir": Path(args.state_dir)} if getattr(args, "state_dir", None) else {}
    cfg = cfg.model_copy(update=overrides)
    try:
        d = Daemon(cfg, args.config or os.environ.get("GREEND_CONFIG"), listen=args.listen,
                   socket_path=sock if args.socket != "" else None, overrides=overrides)
        if args.socket == "":
            d.socket_path = None
        d.live_load = live_load_provider(d.config_path)
        d.router = route_service(d.cfg, d.config_path, d.ledger_path)
        d.run_forever()
    except DaemonError as e:
        return _fail(f"run: {e}")
    return 0


def live_load_provider(config_path: str | None):
    """Load and queue of the clusters for /api/v1/clusters and the TUI, from the policy engine's
    state cache: given to the core's read model (greend.queries.clusters), which does not import
    the policies."""

    def live_load(cfg) -> dict[str, dict]:
        from greend.policies.state import live_load

        return live_load(cfg, config_path)

    return live_load


def route_service(cfg, config_path: str | None, ledger_path, reader=None):
    """POST /api/v1/route's router (greend.route_api), from the policy engine: the core does not
    import the policies. daemon.route_warm: set up now, with the clusters' state kept warm.
    `reader`: a controller's on a database server (its server_reads), which the history reads."""
    from greend.policies.route_service import RouteService

    service = RouteService(cfg, config_path, ledger_path, reader=reader)
    if cfg.daemon.route_warm:
        service.start()
    return service


def cmd_controller(args) -> int:

    from .controller import Controller
    from .errors import DaemonError

    cfg = _load_config(args)
    if not args.token_file and cfg.controller.token_file is None:
        return _fail("controller: no token file: give --token-file FILE or set "
                     "controller.token_file (the site's shared secret, chmod 600)")
    sock = None
    if args.socket is not None:
        sock = Path(args.socket) if args.socket else None
    try:
        c = Controller(cfg, args.config or os.environ.get("GREEND_CONFIG"), listen=args.listen,
                       token_file=args.token_file, socket_path=sock,
                       state_dir=Path(args.state_dir) if getattr(args, "state_dir", None) else None)
        if args.socket == "":
            c.socket_path = None
        c.live_load = live_load_provider(c.config_path)
        c.router = route_service(c.cfg, c.config_path, c.ledger_path, reader=c.server_reads)
        c.run_forever()
    except DaemonError as e:
        return _fail(f"controller: {e}")
    return 0


def cmd_controller_migrate(args) -> int:
    import time

    from . import sitedb
    from .controller import controller_state_dir
    from .errors import LedgerError, SiteError
    from .ledger import default_path

    cfg = _load_config(args)
    if args.batch < 1:
        return _fail("controller migrate: --batch: expected a number of jobs >= 1")
    to = args.to or cfg.controller.database
    if to == sitedb.SQLITE:
        return _fail("controller migrate: no target: give --to URL or set controller.database "
                     "to the server's URL")
    try:
        sitedb.check_url(to)
    except ValueError as e:
        return _fail(f"controller migrate: --to: {e}")
    src = Path(args.src) if args.src else default_path(
        Path(args.state_dir) if getattr(args, "state_dir", None) else controller_state_dir(cfg))
    pw_file = args.password_file or cfg.controller.database_password_file
    t0 = time.monotonic()

    def progress(what, done, total):
        if not args.json:
            print(f"{what}: {done}/{total}", file=sys.stderr, flush=True)
    try:
        if not src.exists():
            return _fail(f"controller migrate: --from {src}: no such file")
        site = sitedb.ServerSite(to, sitedb.read_password(Path(pw_file) if pw_file else None))
        try:
            out = sitedb.migrate_sqlite(src, site, batch=args.batch, progress=progress)
        finally:
            site.close()
    except (LedgerError, SiteError) as e:
        return _fail(f"controller migrate: {e}", 1)
    out["seconds"] = round(time.monotonic() - t0, 3)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"migrated {src} -> {out['to']} in {out['seconds']} s: {out['jobs']} jobs "
              f"({out['jobs_stored']} stored, {out['jobs_stale']} newer there), "
              f"{out['job_series']} series buckets, {out['node_series']} node buckets, "
              f"{out['decisions']} decisions")
    return 0


def _once(cfg, as_json: bool) -> int:
    import time

    from . import units
    from .monitor import Monitor

    m = Monitor(cfg, None)
    m.tick()
    time.sleep(cfg.sampling.interval_s if cfg.sampling.interval_s < 10 else 1.0)
    splits = m.tick() or []
    dt = m.interval_power_w
    out = {
        "node": m.node, "cluster": m.cluster,
        "domains": [{"domain": s.domain, "source": s.source, "provenance": s.provenance,
                     "energy_j": s.energy_uj / 1e6, "power_w": dt.get(s.domain, 0.0),
                     "unattributed_j": s.unattributed_uj / 1e6, "idle_j": s.idle_uj / 1e6,
                     "jobs": {k: v / 1e6 for k, v in sorted(s.jobs.items(), key=lambda kv: -kv[1])
                              if v}}
                    for s in splits],
        "collectors": {k: {"present": v.present, "ok": v.ok, "error": v.error, "detail": v.detail}
                       for k, v in m.status.items()},
        "cpu_power_model": asdict(m.cpu_model),
    }
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        print(f"node {m.node} (cluster {m.cluster}), one interval:")
        for d in out["domains"]:
            print(f"  {d['domain']:<10} {units.power(d['power_w']):>9}  {d['provenance']}")
            for k, v in list(d["jobs"].items())[:10]:
                print(f"      {k:<30} {units.energy(v):>10}")
            print(f"      {'(unattributed)':<30} {units.energy(d['unattributed_j']):>10}")
        for k, v in out["collectors"].items():
            state = "ok" if v["ok"] and v["present"] else ("absent" if not v["present"] else "FAILING")
            print(f"  collector {k}: {state} {v['detail'] or v['error']}")
    m.close()
    return 0

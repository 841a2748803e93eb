"""`greend tui`: command-line entry point of the Textual app (imported lazily: the CLI stays fast)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REFRESH_S = 2.0  # running jobs' rows change every few seconds (the daemon's checkpoints)
URL_REFRESH_S = 5.0
PAGE_SIZE = 100  # jobs per page (n / p move by a page)


def add_commands(sub) -> None:
    """Register this package's subcommands on greend's argparse subparsers."""
    p = sub.add_parser(
        "tui", help="browse jobs' energy, carbon and water footprints in the terminal",
        description="Open greend's terminal UI: your jobs and their footprints, one job in\n"
        "detail (breakdown, power over time, factors and their sources, advice), the clusters,\n"
        "and accounts and users by footprint. Works over SSH in an 80x24 terminal; `?` lists\n"
        "the keys. Reads the local daemon's socket if there is one, else this node's ledger.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  greend tui\n  greend tui --ledger /var/lib/greend/ledger.sqlite "
        "--all-users\n  greend tui --url https://greend-controller.example.org:9472",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ledger", metavar="FILE", help="read this ledger file (read-only)")
    src.add_argument("--socket", metavar="PATH",
                     help="the local daemon's API socket (default: daemon.socket, else /run/greend/api.sock, "
                     "else <state_dir>/api.sock, the first that exists)")
    src.add_argument("--url", metavar="URL",
                     help="a site controller's API, e.g. http://host:9472 (a node's: port 9471)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="USER", help="show USER's jobs (default: yours)")
    who.add_argument("--all-users", action="store_true", help="show every user's jobs")
    p.add_argument("--refresh", type=float, default=None, metavar="S",
                   help="refresh every S seconds while the screen is open (0: only on r; default 2, "
                   f"{URL_REFRESH_S:g} with --url: a controller serves every user)")
    p.set_defaults(func=cmd_tui)


def _me() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def default_socket(cfg) -> Path | None:
    """The daemon's socket if one exists: configured, system-wide, or in the state directory
    (greend.httpclient.daemon_sockets: the rule every client follows)."""
    from greend.httpclient import daemon_sockets

    daemon = getattr(cfg, "daemon", None)
    for p in daemon_sockets(getattr(daemon, "socket", None), cfg.resolved_state_dir()):
        if p.is_socket():
            return p
    return None


def make_source(args, cfg=None):
    """The data source the options ask for; cfg (or, when None, the configuration loaded when first
    needed) says where the default socket and ledger are and describes the clusters."""
    from greend.ledger import default_path

    from .data import LedgerSource, SocketSource, UrlSource

    if args.url:
        return UrlSource(args.url)
    if args.socket:
        return SocketSource(args.socket)
    if args.ledger:
        if cfg is not None:
            return LedgerSource(args.ledger, cfg)
        from greend.cmdline import load_config as _load_config

        return LedgerSource(args.ledger, config_loader=lambda: _load_config(args, fast=True))
    if cfg is None:
        from greend.cmdline import load_config as _load_config

        # The cached view of the validated configuration when current (greend.config_cache): it
        # only says where the socket and the ledger are, and describes the clusters.
        cfg = _load_config(args, fast=True)
    sock = default_socket(cfg)
    if sock is not None:
        return SocketSource(sock)
    return LedgerSource(default_path(cfg.resolved_state_dir()), cfg)


def cmd_tui(args) -> int:
    from .data import SourceError

    if args.refresh is None:
        args.refresh = URL_REFRESH_S if args.url else REFRESH_S
    if args.refresh < 0:
        print("greend: tui: --refresh must be 0 or more seconds", file=sys.stderr)
        return 2
    try:
        # The configuration (slow to load) is read now only when it says where the data is.
        source = make_source(args)
    except SourceError as e:
        print(f"greend: tui: {e}", file=sys.stderr)
        return 2
    import time

    from .data import first_query

    me = _me()
    user = None if args.all_users else (args.user or me)
    # The first page is read while Textual is imported (a ledger source does; docs/performance.md).
    source.prefetch(first_query(user, time.time(), PAGE_SIZE), time.time())
    from greend.cmdline import resume_gc

    from . import css_cache
    from .app import GreendApp

    css_cache.install()

    def started() -> None:  # the first page is painted (greend.cli.main paused the collector)
        resume_gc(freeze=True)
        css_cache.save()

    try:
        GreendApp(source, user=user, me=me, refresh_s=args.refresh, page_size=PAGE_SIZE,
                  on_started=started).run()
    finally:
        css_cache.save()  # what the screens opened later parsed
    return 0

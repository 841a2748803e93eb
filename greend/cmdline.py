"""What every `greend` command module shares: the usage exit status, failing with a message, and
loading the configuration the command line names. greend.cli and the *_cli.py command modules
import it, so that no command module has to import greend.cli (which imports them)."""

from __future__ import annotations

import gc
import sys

EXIT_USAGE = 2  # bad command line, bad config, unusable state directory

_gc_paused = False


def pause_gc() -> None:
    """Start-up without the cyclic garbage collector: importing greend, Textual and the rest
    allocates hundreds of thousands of long-lived objects (modules, classes, functions) and next to
    no cyclic garbage, yet each allocation threshold crossed starts a collection that walks them
    all: ~7 % of `greend tui`'s start (docs/performance.md). greend.cli.main pauses it and resumes it
    when it returns at the latest; a command whose start-up ends sooner (the TUI's first page)
    resumes it then."""
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def resume_gc(freeze: bool = False) -> None:
    """Resume what pause_gc paused (nothing otherwise). freeze: first move every object alive now
    (the start-up's) to the permanent generation, so that later collections skip them: an
    interactive program then collects in well under a millisecond."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        if freeze:
            gc.freeze()
        gc.enable()


def fail(msg: str, status: int = EXIT_USAGE) -> int:
    print(f"greend: {msg}", file=sys.stderr)
    return status


def load_config(args, *, fast: bool = False):
    """The configuration the command line names (greend.config_env.locate). fast: the commands
    that start for every job (measure, route) take the cached read-only view of the validated
    configuration when it is current (greend.config_cache: no pydantic), else the validated
    Config; they must read attributes only (and model_copy, node_name, resolved_state_dir)."""
    from .config_env import locate

    path, _ = locate(args.config)
    # Commands that re-read the file (a daemon's SIGHUP) find it in args.config.
    args.config = str(path) if path else None
    if fast:
        from . import config_cache

        cfg = config_cache.load(path)
    else:
        from . import config as config_mod

        cfg = config_mod.load(path)
    if getattr(args, "state_dir", None):
        # The flag beats $GREEND_STATE_DIR, which beats the config's state_dir (see --help).
        from pathlib import Path

        cfg = cfg.model_copy()
        cfg._state_dir_flag = Path(args.state_dir)
    return cfg

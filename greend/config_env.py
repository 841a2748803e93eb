"""What reading the configuration takes from the machine and the environment: where the file is
looked up (--config, $GREEND_CONFIG, the user's, the system's, else the embedded default), the
state directory and the node's name. Free of pydantic: the fast paths of greend.config_cache use
it, and greend.config (which re-exports the lookup) computes Config's members with it."""

from __future__ import annotations

import os
from pathlib import Path

# Where a configuration is looked up when none is named. GREEND_SYSCONFDIR moves /etc (tests use a
# temporary root; a packager may use /usr/local/etc).
SYSCONFDIR_ENV = "GREEND_SYSCONFDIR"
CONFIG_NAME = "greend.toml"


def system_config_path() -> Path:
    return Path(os.environ.get(SYSCONFDIR_ENV) or "/etc") / "greend" / CONFIG_NAME


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME")
    if not base:
        try:
            base = str(Path.home() / ".config")
        except RuntimeError:  # no home (a system service's transient user): no user configuration
            base = "/nonexistent"
    return Path(base) / "greend" / CONFIG_NAME


def locate(explicit: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """The configuration file in force and why: --config, $GREEND_CONFIG, the user's
    ($XDG_CONFIG_HOME/greend/greend.toml, not for root), the system's (/etc/greend/greend.toml),
    else (None, ...) for the embedded default. A named file must exist; a conventional one is used
    only when it does."""
    if explicit:
        return Path(explicit), "--config"
    env = os.environ.get("GREEND_CONFIG")
    if env:
        return Path(env), "$GREEND_CONFIG"
    candidates = [] if os.geteuid() == 0 else [(user_config_path(), "user configuration")]
    candidates.append((system_config_path(), "system configuration"))
    unsearchable = []
    for path, why in candidates:
        try:
            path.stat()
        except FileNotFoundError:
            continue
        except PermissionError:
            unsearchable.append(str(path.parent))  # a directory we may not look into
            continue
        except OSError:
            pass
        # A file that exists but cannot be read is load()'s clear error, not the default.
        return path, why
    looked = ", ".join(str(p) for p, _ in candidates)
    hidden = f"; cannot look into {', '.join(unsearchable)}" if unsearchable else ""
    return None, f"embedded default (no --config, no $GREEND_CONFIG, none of {looked}{hidden})"


# The members of Config that depend on the machine or the environment: Config's own property and
# method call these, so that its cached view (greend.config_cache) computes them alike.
def node_name_of(node: str) -> str:
    """This node's name: `node`, else the short hostname."""
    if node:
        return node
    import socket

    return socket.gethostname().split(".")[0]


def state_dir_of(flag: Path | None, configured: Path | None) -> Path:
    """--state-dir beats $GREEND_STATE_DIR, which beats state_dir; default /var/lib/greend as root,
    else $XDG_STATE_HOME/greend."""
    if flag is not None:
        return flag
    env = os.environ.get("GREEND_STATE_DIR")
    if env:
        return Path(env)
    if configured is not None:
        return configured
    if os.geteuid() == 0:
        return Path("/var/lib/greend")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "greend"

"""Logging for greend's commands and daemons: levels as meant (INFO routine, WARNING degraded, ERROR
failed) and, under systemd, journald priorities as sd-daemon(3) `<N>` prefixes so that
`journalctl -p warning` shows only what needs attention."""

from __future__ import annotations

import logging
import os
import sys

# syslog priorities (sd-daemon.h SD_ERR ... SD_DEBUG)
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def _priority(levelno: int) -> int:
    for level, prio in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return prio
    return 7


class JournalFormatter(logging.Formatter):
    """Every line (a traceback's too) starts with its record's priority: journald reads each line
    of a stream as an entry."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal(stream=None) -> bool:
    """True when stderr is connected to the journal ($JOURNAL_STREAM names its device:inode)."""
    js = os.environ.get("JOURNAL_STREAM", "")
    if not js:
        return False
    try:
        dev, ino = (int(x) for x in js.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(verbose: int = 0, *, daemon: bool = False) -> None:
    """A command logs warnings and errors (-v: info, -vv: debug); a daemon also logs routine
    events (start, reload, signals) at INFO."""
    base = logging.INFO if daemon else logging.WARNING
    level = max(logging.DEBUG, base - 10 * verbose)
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("greend: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter (APScheduler logs every job run at INFO) stays at WARNING unless -vv.
    if verbose < 2:
        logging.getLogger("apscheduler").setLevel(logging.WARNING)

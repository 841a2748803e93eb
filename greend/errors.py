"""greend's errors: one base class, GreendError, whose message is meant for the person at the
terminal (or in the log). Light to import, so that the CLI can catch them without loading the
modules that raise them."""


class GreendError(Exception):
    """A problem greend explains in its message: what, where, and what to do about it."""


class ConfigError(GreendError):
    """A configuration problem, already phrased for the person who wrote the file."""


class LedgerError(GreendError):
    """The ledger cannot be opened or written; the message says where and why."""


class DaemonError(GreendError):
    """The daemon or the controller cannot start (or serve); the message is for the admin."""


class SiteError(GreendError):
    """Site mode cannot work as configured (token, controller URL, TLS); the message is for the
    admin."""


class ApiError(GreendError):
    """An HTTP request refused: the status and a message naming what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

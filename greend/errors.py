"""Errors whose messages are meant for the person at the terminal; light to import, so that the CLI
can catch them without loading the modules that raise them."""


class ConfigError(Exception):
    """A configuration problem, already phrased for the person who wrote the file."""


class LedgerError(Exception):
    """The ledger cannot be opened or written; the message says where and why."""

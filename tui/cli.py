"""`greend tui`: command-line entry point of the Textual app."""


def add_commands(sub) -> None:
    """Register this package's subcommands on greend's argparse subparsers."""

"""`greend run` and `greend controller`: command-line entry points of the daemon."""


def add_commands(sub) -> None:
    """Register the daemon's subcommands on greend's argparse subparsers."""

"""Command-line entry points of the policy engine (`greend estimate`, `route`, `submit`)."""


def add_commands(sub) -> None:
    """Register this package's subcommands on greend's argparse subparsers."""

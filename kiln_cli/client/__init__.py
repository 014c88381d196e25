"""The client commands of ``kiln``: call a running Kiln over HTTP (:mod:`kiln_cli.client.commands`)."""

from kiln_cli.client.commands import add_commands

__all__ = ["add_commands"]

"""`forgec train` and `forgec generate`: registered by compiler/cli.py.

Nothing here imports torch at module level: `forgec check`/`build` must stay
torch-free and fast. The command functions import the runtime lazily.
"""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> dict:
    """Add the runtime's subcommands; return {name: function(args) -> exit code}."""
    return {}

"""Spec importers: other frameworks' model configs → .forge specs.

`add_commands(sub)` registers `forgec import-hf` and `forgec import-kf`
(torch-free, like the rest of the compiler).
"""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> dict:
    """Add the importers' subcommands; return {name: function(args) -> exit code}."""
    return {}

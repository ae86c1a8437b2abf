"""The errors a forgec command ends with, and its exit codes.

This module sits at the bottom of the import graph: the runtime, the importers
and the command line all raise these, so it imports nothing of forgec (see
tests/test_imports.py). Located spec errors are `compiler.diagnostics.ForgeError`.
"""

from __future__ import annotations

EXIT_OK = 0  # success; warnings allowed
EXIT_SPEC = 1  # a spec has errors, or a run found bad input (RunError)
EXIT_USAGE = 2  # bad flags, a path that is not a file (UsageError)
EXIT_INTERNAL = 70  # a bug of forgec: one line, FORGEC_DEBUG=1 shows the traceback
EXIT_INTERRUPTED = 130  # Ctrl-C


class UsageError(Exception):
    """Bad command-line use: printed as one line, exit 2."""


class RunError(Exception):
    """Bad input found at run time (corrupt checkpoint, token id out of range):
    printed as one line, exit 1."""

"""The torchrun worker of `forgec train --plan`: `python -m forgec.runtime.worker SPEC --plan NAME ...`.

It takes `forgec train`'s options (runtime/cli.py) and runs
runtime.distributed.train_distributed on this rank. `forgec train --plan`
starts it through torchrun on this machine; on a cluster, run it with
`torchrun` on every node. It is a module of its own so that the options'
parser (runtime/cli.py, whose `train` command launches distributed runs) and
the distributed trainer do not import each other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from forgec.compiler.errors import RunError, UsageError

from .cli import add_commands
from .distributed import PID_PREFIX, STATUS_ENV, settings_of, teardown, train_distributed
from .loop import Stopped


def worker_parser() -> argparse.ArgumentParser:
    """`forgec train`'s own options (runtime/cli.py), with --plan required."""
    parser = argparse.ArgumentParser(prog="python -m forgec.runtime.worker")
    sub = parser.add_subparsers(dest="command")
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """One torchrun worker: train, print errors once (rank 0), always tear down."""
    argv = sys.argv[1:] if argv is None else argv
    args = worker_parser().parse_args(["train", *argv])
    rank = int(os.environ.get("RANK", "0"))
    code = 0
    status = os.environ.get(STATUS_ENV)
    if status:  # launch() forwards SIGTERM / SIGUSR1 to this pid
        pid_file = os.path.join(os.path.dirname(status), f"{PID_PREFIX}{rank}")
        with open(pid_file + ".tmp", "w", encoding="ascii") as f:
            f.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
    try:
        if args.plan is None:
            raise UsageError("the worker needs --plan NAME")
        if args.nproc is not None and args.nproc != int(os.environ.get("WORLD_SIZE", "1")):
            raise UsageError(f"--nproc {args.nproc} differs from torchrun's world size "
                             f"{os.environ.get('WORLD_SIZE', '1')}")
        train_distributed(args.spec, args.out, plan=args.plan, resume=args.resume,
                          progress=not args.no_progress, **settings_of(args))
    except Stopped as e:  # every rank stopped after the same step (runtime.loop.StopSignals)
        if rank == 0:
            print(f"forgec: {e}", file=sys.stderr)
    except (UsageError, RunError) as e:
        # every rank meets these alike (they depend on files, settings and
        # all-reduced numbers only); rank 0 reports
        code = 2 if isinstance(e, UsageError) else 1
        if status:  # started by launch(): it prints the message and exits with `code`
            code = 0
            if rank == 0:
                with open(status, "w", encoding="utf-8") as f:
                    json.dump({"usage": isinstance(e, UsageError), "message": str(e)}, f)
        elif rank == 0:
            print(f"forgec: error: {e}", file=sys.stderr)
    finally:
        teardown()
    return code


if __name__ == "__main__":
    sys.exit(main())

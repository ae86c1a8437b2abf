"""Multi-process helpers for tests/test_distributed.py: run K ranks on
127.0.0.1 (gloo) with torch.multiprocessing, bounded in time.

Worker functions live here, at module level, so that spawned interpreters can
import them (the parent's sys.path, tests/ included, is passed on).
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, error_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "FORGEC_DIST_TIMEOUT": "60"})
    torch.set_num_threads(1)
    try:
        code = fn(*args)
    except BaseException:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    if code:
        raise SystemExit(code)


def spawn(fn, args: tuple, world: int, tmp_dir: str, timeout: float = 120) -> None:
    """Run fn(*args) on `world` ranks; fail with the first rank's traceback."""
    err = os.path.join(str(tmp_dir), f"errors_{time.monotonic_ns()}")
    os.makedirs(err)
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args, err), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks ran past {timeout} s")
    except Exception as e:
        msgs = [open(os.path.join(err, n)).read() for n in sorted(os.listdir(err))]
        raise AssertionError(f"{e}\n" + "\n".join(msgs)) from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        gc.collect()


def train_worker(argv: list[str]) -> int:
    """A rank of `forgec train --plan` (the torchrun worker's own entry)."""
    from forgec.runtime.worker import main

    return main(argv)


def train_runs(runs: list[tuple[list[str], dict]]) -> int:
    """Several `forgec train --plan` runs (argv, extra environment), one after
    the other in one process group (saves a spawn per run), then the worker's
    own teardown."""
    from forgec.runtime.distributed import teardown

    try:
        for argv, env in runs:
            saved = dict(os.environ)
            os.environ.update(env)
            try:
                code = _main_keep_group(argv)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            if code:
                return code
    finally:
        teardown()
    return 0


def _main_keep_group(argv: list[str]) -> int:
    """forgec.runtime.worker.main without the teardown (the next run reuses the group)."""
    from forgec.compiler.errors import RunError, UsageError
    from forgec.runtime import distributed, worker

    args = worker.worker_parser().parse_args(["train", *argv])
    try:
        distributed.train_distributed(args.spec, args.out, plan=args.plan, resume=args.resume,
                                      progress=False, **distributed.settings_of(args))
    except (UsageError, RunError) as e:
        print(f"forgec: error: {e}", file=sys.stderr)
        return 1
    return 0

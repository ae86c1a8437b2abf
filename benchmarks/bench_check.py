"""How long `forgec check specs/llama3_70b.forge` takes as a fresh process.

Run by hand (not a test):  .venv/bin/python benchmarks/bench_check.py [-n 10]

Prints the median of N runs of the check, and of `python -c pass` measured in
the same run with the same interpreter, so the figure can be read against the
interpreter's own start-up on whatever machine it runs on. Child processes run
without PYTHONDONTWRITEBYTECODE, as an installed forgec does: with it set, every
run would recompile the modules whose cached bytecode is stale.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = "specs/llama3_70b.forge"
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def forgec() -> list[str]:
    """The installed `forgec` script beside this interpreter, else `python -m forgec.compiler.cli`."""
    script = Path(sys.executable).parent / "forgec"
    return [str(script)] if script.exists() else [sys.executable, "-m", "forgec.compiler.cli"]


def median_seconds(cmd: list[str], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--runs", type=int, default=10)
    args = p.parse_args()
    check = [*forgec(), "check", SPEC]
    baseline = [sys.executable, "-c", "pass"]
    # warm-up: the parser tables are cached on first use; file-system caches fill
    subprocess.run(check, cwd=ROOT, env=ENV, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(baseline, env=ENV, check=True)
    pass_s, pass_all = median_seconds(baseline, args.runs)
    check_s, check_all = median_seconds(check, args.runs)
    print(f"python:              {sys.executable} ({sys.version.split()[0]})")
    print(f"runs:                {args.runs} each, median")
    print(f"python -c pass:      {pass_s * 1000:7.1f} ms   "
          f"(min {min(pass_all) * 1000:.1f}, max {max(pass_all) * 1000:.1f})")
    print(f"forgec check {SPEC.split('/')[-1]}: {check_s * 1000:7.1f} ms   "
          f"(min {min(check_all) * 1000:.1f}, max {max(check_all) * 1000:.1f})")
    print(f"ratio:               {check_s / pass_s:7.1f}x python start-up  "
          f"(+{(check_s - pass_s) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()

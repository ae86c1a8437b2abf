"""Wall time of `forgec build` per spec.

Run by hand (not a test):  .venv/bin/python benchmarks/bench_build.py [-n 5] [SPEC ...]

For each spec (default: specs/*.forge), the median of N runs of
`forgec build SPEC -o TMP --update` as a fresh process — what a user waits for,
interpreter start-up included (`python -c pass` is printed beside it) — and of
the same work in-process and warm (compile_spec + build into a fresh folder),
which is the compiler's own share.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def forgec() -> list[str]:
    script = Path(sys.executable).parent / "forgec"
    return [str(script)] if script.exists() else [sys.executable, "-m", "forgec.compiler.cli"]


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--runs", type=int, default=5)
    p.add_argument("specs", nargs="*")
    args = p.parse_args()
    specs = args.specs or sorted(str(s.relative_to(C.ROOT)) for s in (C.ROOT / "specs").glob("*.forge"))

    from forgec.compiler.build import build
    from forgec.compiler.driver import compile_spec

    tmp = Path(tempfile.mkdtemp(prefix="forgec-build-"))
    python = timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), args.runs)
    print(f"machine: {C.machine()}")
    print(f"python -c pass: {python * 1000:.0f} ms (median of {args.runs})\n")
    print(f"{'spec':32s} {'forgec build (process)':>24s} {'in-process, warm':>18s}")
    for spec in specs:
        out = tmp / "cli"

        def cli(spec=spec, out=out):
            subprocess.run([*forgec(), "build", spec, "-o", str(out), "--update"], cwd=C.ROOT,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        counter = iter(range(10**6))

        def warm(spec=spec, counter=counter):
            build(compile_spec(str(C.ROOT / spec)), str(tmp / f"warm{next(counter)}"))

        warm()  # caches: templates, grammar
        print(f"{spec:32s} {timed(cli, args.runs) * 1000:21.0f} ms {timed(warm, args.runs) * 1000:15.0f} ms")


if __name__ == "__main__":
    main()

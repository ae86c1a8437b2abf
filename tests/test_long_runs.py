"""Long and preemptible runs: --resume that starts afresh, SIGTERM/SIGUSR1
checkpoints, --keep-last retention, refusing a run that cannot fit, and the
TensorBoard / W&B metric sinks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from conftest import cli as run_forgec

from runtime.checkpoint import list_checkpoints
from runtime.train import read_metrics, train

DEBUG = str(ROOT / "specs" / "llama_debug.forge")
TINY = dict(batch_size=4, seq_len=32)  # ~20 ms a step on 2 cores


def rows(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"])
            for r in read_metrics(str(run / "metrics.jsonl"))]


# ---- --resume with nothing to resume ------------------------------------------------------


def test_resume_without_a_run_starts_fresh(tmp_path, capsys):
    kw = dict(progress=False, steps=4, seed=3, **TINY)
    train(DEBUG, str(tmp_path / "fresh"), **kw)
    train(DEBUG, str(tmp_path / "new"), resume=True, **kw)  # no such folder yet
    assert "nothing to resume" in capsys.readouterr().err
    assert rows(tmp_path / "new") == rows(tmp_path / "fresh")
    assert [s for s, _ in list_checkpoints(str(tmp_path / "new"))] == [4]
    # killed before its first checkpoint: run.json, the package and some
    # metrics rows exist, no checkpoint; the same command line starts it again
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "fresh", killed)
    shutil.rmtree(killed / "checkpoints")
    train(DEBUG, str(killed), resume=True, **kw)
    assert rows(killed) == rows(tmp_path / "fresh")


def test_cli_resume_without_a_run_starts_fresh(tmp_path):
    out = tmp_path / "never"
    proc = run_forgec("train", DEBUG, "--out", str(out), "--resume", "--steps", "2",
                      "--batch-size", "2", "--seq-len", "16", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"nothing to resume in {out}" in proc.stderr
    assert [r[0] for r in rows(out)] == [1, 2]


# ---- SIGTERM / SIGUSR1: checkpoint and exit cleanly ----------------------------------------


def forgec_process(*args: str) -> subprocess.Popen:
    """`forgec` in a fresh interpreter, as a job scheduler starts it."""
    return subprocess.Popen([sys.executable, "-m", "compiler.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_for_rows(proc: subprocess.Popen, metrics: Path, n: int, limit: float = 300) -> None:
    """Until metrics.jsonl holds `n` rows (bounded: a hung trainer fails the test)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the trainer exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    pytest.fail(f"no {n} metrics rows within {limit} s")


def test_signal_checkpoints_and_resume_gives_the_uninterrupted_curve(tmp_path):
    steps = 40  # the signal lands after step 3, long before the end
    flags = ["--steps", str(steps), "--seed", "5", "--ckpt-every", "1000", "--batch-size", "2",
             "--seq-len", "16", "--no-progress"]
    full = tmp_path / "full"
    train(DEBUG, str(full), progress=False, steps=steps, seed=5, ckpt_every=1000,
          batch_size=2, seq_len=16)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        out = tmp_path / sig.name
        cmd = ("train", DEBUG, "--out", str(out), "--resume", *flags)
        proc = forgec_process(*cmd)
        wait_for_rows(proc, out / "metrics.jsonl", 3)
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("the trainer did not stop within 120 s of the signal")
        assert proc.returncode == 0, err
        stopped = [s for s, _ in list_checkpoints(str(out))]
        assert len(stopped) == 1 and 3 <= stopped[0] < steps
        step = stopped[0]
        assert f"forgec: stopped by {sig.name} after step {step} of {steps}; checkpoint " \
            f"{out / 'checkpoints' / f'step_{step:06d}'}; the same command with --resume " \
            "continues" in err.splitlines()
        assert "Traceback" not in err
        assert rows(out) == rows(full)[:step]
        # the same command line again: steps step+1..steps, bit for bit
        proc = run_forgec(*cmd)
        assert proc.returncode == 0, proc.stderr
        assert f"steps {step + 1}..{steps}" in proc.stderr
        assert rows(out) == rows(full)

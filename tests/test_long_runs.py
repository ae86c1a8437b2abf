"""Long and preemptible runs: --resume that starts afresh, SIGTERM/SIGUSR1
checkpoints, --keep-last retention, refusing a run that cannot fit, and the
TensorBoard / W&B metric sinks."""

from __future__ import annotations

import shutil
from pathlib import Path

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

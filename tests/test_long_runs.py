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
import types
from pathlib import Path

import pytest
from conftest import ROOT
from conftest import cli as run_forgec

from forgec.compiler.cli import RunError, UsageError
from forgec.runtime.checkpoint import list_checkpoints, prune_checkpoints
from forgec.runtime.memory import MEMORY_ENV, training_bytes
from forgec.runtime.sinks import scalars
from forgec.runtime.train import read_metrics, train

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
    return subprocess.Popen([sys.executable, "-m", "forgec.compiler.cli", *args], cwd=ROOT,
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


# ---- --keep-last ---------------------------------------------------------------------------


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (root / f"step_{step:06d}").mkdir(parents=True)
        (root / f"step_{step:06d}" / "trainer.json").write_text("{}")
    (root / "step_000010").mkdir()  # no trainer.json: not a complete checkpoint
    (root / ".step_000012.abc.tmp").mkdir()  # one being written
    assert prune_checkpoints(str(tmp_path), 2) == [2, 4]
    assert sorted(p.name for p in root.iterdir()) == \
        [".step_000012.abc.tmp", "step_000006", "step_000008", "step_000010"]
    assert prune_checkpoints(str(tmp_path), 0) == [6]  # the newest always stays
    assert sorted(p.name for p in root.iterdir()) == \
        [".step_000012.abc.tmp", "step_000008", "step_000010"]


def test_keep_last_in_a_run_and_its_resumption(tmp_path):
    out = tmp_path / "k"
    train(DEBUG, str(out), progress=False, steps=5, seed=0, ckpt_every=1, keep_last=2, **TINY)
    assert [s for s, _ in list_checkpoints(str(out))] == [4, 5]
    train(DEBUG, str(out), resume=True, progress=False, steps=7, keep_last=1)
    assert [s for s, _ in list_checkpoints(str(out))] == [7]
    proc = run_forgec("train", DEBUG, "--out", str(tmp_path / "bad"), "--keep-last", "-1")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == \
        ["forgec: error: --keep-last must not be negative (0: keep every checkpoint)"]


# ---- refusing a run that cannot fit ----------------------------------------------------------


def test_a_model_that_cannot_fit_is_refused_before_allocating(tmp_path):
    out = tmp_path / "big"
    proc = subprocess.run(
        [sys.executable, "-m", "forgec.compiler.cli", "train", str(ROOT / "specs" / "llama3_8b.forge"),
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), MEMORY_ENV: str(23 << 30)})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("forgec: error: llama3_8b cannot train "
                                                   "here: it needs 119.66 GiB for its "
                                                   "8,030,261,248 fp32 weights"), proc.stderr
    assert "the memory limit FORGEC_MEMORY_LIMIT_BYTES has 23.00 GiB available" in lines[0]
    assert "parallel plan" in lines[0] and "--bf16" in lines[0]
    assert not (out / "run.json").exists() and not (out / "checkpoints").exists()


def test_the_figure_counts_every_parameter_of_a_vlm():
    from forgec.compiler.cli import _compile
    from forgec.compiler.cost import cost

    name, params, need, plans = training_bytes(str(ROOT / "specs" / "vlm.forge"))
    comp = _compile(str(ROOT / "specs" / "vlm.forge"), quiet=True)
    text = cost(comp.graphs[comp.vlms[name].text])
    assert params > text.params_total and need == 16 * params
    assert plans == ["fsdp2_pp2_vlm", "fsdp2_vlm", "pp2_vlm"]


def test_the_limit_applies_to_a_small_model_too(tmp_path, monkeypatch):
    _, params, need, _ = training_bytes(DEBUG)
    assert need == 16 * params  # fp32 weights, grads and two AdamW moments
    monkeypatch.setenv(MEMORY_ENV, str(need - 1))
    with pytest.raises(RunError, match=f"llama_debug cannot train here: it needs .* for its "
                       f"{params:,} fp32 weights"):
        train(DEBUG, str(tmp_path / "small"), progress=False, steps=1, **TINY)
    monkeypatch.setenv(MEMORY_ENV, str(need))
    train(DEBUG, str(tmp_path / "small"), progress=False, steps=1, **TINY)
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(UsageError, match="FORGEC_MEMORY_LIMIT_BYTES must be a number"):
        train(DEBUG, str(tmp_path / "other"), progress=False, steps=1, **TINY)


# ---- TensorBoard and W&B ---------------------------------------------------------------------


class FakeSummaryWriter:
    """torch.utils.tensorboard.SummaryWriter's part the sinks use, recorded."""

    made: list[FakeSummaryWriter] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeSummaryWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


def test_metrics_go_to_tensorboard(tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeSummaryWriter.made.clear()
    out = tmp_path / "tb"
    train(DEBUG, str(out), progress=False, steps=3, seed=0, ckpt_every=2, **TINY)
    shutil.rmtree(out / "checkpoints" / "step_000003")
    train(DEBUG, str(out), resume=True, progress=False, steps=4)
    first, resumed = FakeSummaryWriter.made
    assert (first.log_dir, first.purge_step, resumed.log_dir, resumed.purge_step) == \
        (str(out), None, str(out), 3)  # events past the checkpoint are dropped
    assert first.closed and resumed.closed
    metrics = read_metrics(str(out / "metrics.jsonl"))
    written = {(tag, step): value for w in (first, resumed) for tag, value, step in w.scalars}
    for row in metrics:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens"):
            assert written[(key, row["step"])] == float(row[key])
    assert {tag for tag, _ in written} == {"loss", "lr", "grad_norm", "tokens_per_s", "tokens"}


def test_scalars_of_a_row():
    row = {"step": 3, "loss": 2.5, "tokens": 64, "eval": {"loss": 1.5, "samples": ["a"]},
           "moe": {"layers.0.moe": {"load": [0.5, 0.5], "max_load": 1.0, "dropped": 2}}}
    assert scalars(row) == {"loss": 2.5, "tokens": 64.0, "eval/loss": 1.5,
                            "moe/layers.0.moe/max_load": 1.0, "moe/layers.0.moe/dropped": 2.0}


def test_real_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(DEBUG, str(out), progress=False, steps=3, seed=0, **TINY)
    events = EventAccumulator(str(out))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == \
        [(r["step"], pytest.approx(r["loss"])) for r in read_metrics(str(out / "metrics.jsonl"))]


def test_wandb_without_the_package_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed (as here)
    with pytest.raises(UsageError, match="--wandb needs the `wandb` package"):
        train(DEBUG, str(tmp_path / "w"), progress=False, wandb="proj", steps=1, **TINY)
    assert not (tmp_path / "w").exists()


# ---- the same under a parallel plan (torchrun, gloo on 127.0.0.1) ----------------------------


def test_a_plan_whose_ranks_cannot_fit_is_refused_before_its_workers_start(tmp_path,
                                                                           monkeypatch, capsys):
    from forgec.compiler.cli import main as forgec
    from forgec.runtime.memory import check_fits_plan

    need = 16 * 853_120  # two FSDP ranks of llama_debug hold its 853,120 parameters once
    monkeypatch.setenv(MEMORY_ENV, str(need - 1))
    out = tmp_path / "run"
    assert forgec(["train", DEBUG, "--out", str(out), "--plan", "fsdp2"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "forgec: error: llama_debug cannot train here with plan 'fsdp2': its 2 ranks need "
        "13.02 MiB together for their fp32 weights, gradients and AdamW moments alone (the "
        "largest rank 6.51 MiB), and they share the memory limit FORGEC_MEMORY_LIMIT_BYTES, "
        f"which has 13.02 MiB available (`forgec plan {DEBUG} --plan fsdp2 --world 2` shows "
        "each rank's memory; activations come on top). Run its ranks where each has memory of "
        "its own (GPUs, or the nodes of a cluster, with torchrun and `python -m forgec.runtime.worker`)"
        ", or a smaller model; --bf16 and a smaller --batch-size or --seq-len shrink only the "
        "activations"]
    assert not (out / "run.json").exists() and not (out / "metrics.jsonl").exists()
    monkeypatch.setenv(MEMORY_ENV, str(need))
    check_fits_plan(DEBUG, "fsdp2", 2, __import__("torch").device("cpu"))  # fits exactly


def test_sigterm_under_a_plan_checkpoints_and_resume_gives_the_uninterrupted_curve(tmp_path):
    """SIGTERM to `forgec train --plan` reaches every worker: they stop after
    the same step with a checkpoint, the launcher exits 0, and the same command
    line continues to the uninterrupted single-process curve (FSDP: within
    1e-5). The spec has a tokenizer of its own: the workers train with it."""
    from tokenizer_helpers import make_hf_tokenizer

    spec = tmp_path / "llama_debug.forge"
    text = Path(DEBUG).read_text()
    spec.write_text(text.replace("vocab_size  = 256", "vocab_size  = 320"))  # the tokenizer's
    tok = make_hf_tokenizer(tmp_path / "llama_debug.tokenizer", vocab_size=300)
    steps = 12
    flags = ["--steps", str(steps), "--seed", "5", "--ckpt-every", "1000", "--batch-size", "4",
             "--seq-len", "16", "--no-progress"]
    full = tmp_path / "full"
    train(str(spec), str(full), progress=False, steps=steps, seed=5, ckpt_every=1000,
          batch_size=4, seq_len=16)
    out = tmp_path / "fsdp2"
    cmd = ("train", str(spec), "--out", str(out), "--plan", "fsdp2", "--resume", *flags)
    proc = forgec_process(*cmd)
    wait_for_rows(proc, out / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the distributed run did not stop within 120 s of the signal")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "terminate called" not in err, err
    stopped = [s for s, _ in list_checkpoints(str(out))]
    assert len(stopped) == 1 and 3 <= stopped[0] < steps, err
    step = stopped[0]
    assert f"forgec: stopped by SIGTERM after step {step} of {steps}; checkpoint " \
        f"{out / 'checkpoints' / f'step_{step:06d}'}; the same command with --resume " \
        "continues" in err.splitlines()
    proc = subprocess.run([sys.executable, "-m", "forgec.compiler.cli", *cmd], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert f"steps {step + 1}..{steps}" in proc.stderr
    got = [r["loss"] for r in read_metrics(str(out / "metrics.jsonl"))]
    want = [r["loss"] for r in read_metrics(str(full / "metrics.jsonl"))]
    assert len(got) == steps and max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-5
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == \
        (tok / "tokenizer.json").read_bytes()

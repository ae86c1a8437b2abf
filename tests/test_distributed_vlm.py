"""Distributed training of vision-language models: `forgec train VLM_SPEC
--plan NAME` trains the image-caption task of runtime/vlm_task.py under FSDP2
and must repeat the single-process trainer's per-step losses (fp32, ≤ 1e-5)
and eval numbers; DCP checkpoints resume across world sizes both ways.

The joint-decoder VLM runs through the real command line (torchrun); the
cross-attention VLM, with a plan of this file's own spec copy (FSDP units
include its cross-attention blocks; its decoder layers are checkpointed),
runs on two spawned ranks (in-process workers: cheaper than torchrun).
The text models' tests (test_distributed.py) cover resuming at more ranks;
the VLM shares that code.

Pipelines: every schedule of the joint-decoder VLM on 2 ranks (stages cut by
the cost model, and explicit ones that cut inside the vision encoder), the
cross-attention VLM's pp2 plan, a MoT VLM whose MoE layers sit on both stages
(each stage adds its routers' losses), and FSDP × PP on 4 ranks equal the
single-process losses and eval numbers; pipelined checkpoints resume in one
process and a single-process checkpoint resumes pipelined.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from dist_helpers import spawn, train_runs
from test_distributed import (
    DEBUG,
    assert_clean_exit,
    assert_same,
    losses,
    quiet_train,
    torchrun_cli,
)

from forgec.compiler.cli import main
from forgec.runtime.train import read_metrics

VLM = str(ROOT / "specs" / "vlm.forge")
SETTINGS = {"batch_size": 4, "seed": 0}
STEPS = 4  # checkpoints at 2 and 4: resumes start from step 2
XATTN_PLAN = """
plan fsdp2_xattn for vlm_xattn {
  mesh(dp = 2)
  fsdp()
  activation_checkpoint(default = full)
}
"""
XATTN_SETTINGS = {"batch_size": 2, "seed": 1, "steps": 2}
# pipeline plans of the joint-decoder VLM beyond the shipped ones (pp2_vlm: 1f1b, and
# fsdp2_pp2_vlm); zbv's explicit stages cut between the vision encoder's layers
VLM_PLANS = """
plan pp2_gpipe_vlm for vlm {
  mesh(pp = 2)
  pipeline(schedule = gpipe, microbatches = 2)
}

plan pp2_interleaved_vlm for vlm {
  mesh(pp = 2)
  pipeline(schedule = interleaved_1f1b, virtual_stages = 2, microbatches = 4)
}

plan pp2_zbv_vlm for vlm {
  mesh(pp = 2)
  pipeline(schedule = zbv, virtual_stages = 2, microbatches = 4,
           split = [["vision_encoder.layers.0"], ["vision_encoder.layers.1", "transformer.layers.0"],
                    ["transformer.layers.1", "transformer.layers.2"], ["transformer.layers.3"]])
}
"""
PIPELINES = ["pp2_vlm", "pp2_gpipe_vlm", "pp2_interleaved_vlm", "pp2_zbv_vlm"]
# a Mixture-of-Transformers VLM with MoE layers (1 and 3), one on each stage: each
# stage adds its routers' losses, as the single process with 2 micro-batches does
MOT_MOE_PLAN = """
plan mot_moe_pp2 for mot_moe {
  mesh(pp = 2)
  pipeline(schedule = "1f1b", microbatches = 2,
           split = [["vision_encoder.layers.0", "transformer.layers.0", "transformer.layers.1"],
                    ["transformer.layers.2", "transformer.layers.3"]])
}
"""
MOT_MOE_SETTINGS = {"batch_size": 4, "seed": 0, "steps": 3}


def argv(spec: str, out: Path, plan: str, **settings) -> list[str]:
    args = [spec, "--out", str(out), "--plan", plan, "--no-progress"]
    for key, value in settings.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def without_step(src: Path, dst: Path, step: int = STEPS) -> Path:
    """A copy of run `src` as if it had stopped before checkpoint `step`."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / f"step_{step:06d}")
    return dst


def evals(run: Path) -> list[dict]:
    return [r["eval"] for r in read_metrics(str(run / "metrics.jsonl")) if "eval" in r]


@pytest.fixture(scope="module")
def vwork(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("dist_vlm")
    specs = root / "specs"
    specs.mkdir()
    for name in ("llama_debug", "vlm", "vlm_xattn"):  # vlm_xattn and its imports
        shutil.copy(ROOT / "specs" / f"{name}.forge", specs)
    with open(specs / "vlm_xattn.forge", "a", encoding="utf-8") as f:
        f.write(XATTN_PLAN)
    with open(specs / "vlm.forge", "a", encoding="utf-8") as f:
        f.write(VLM_PLANS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as test_distributed.py: least CPU time on a busy machine
    # single-process references
    quiet_train(VLM, str(root / "ref"), steps=STEPS, ckpt_every=2, **SETTINGS)
    quiet_train(str(specs / "vlm_xattn.forge"), str(root / "ref_xattn"), **XATTN_SETTINGS)
    yield root
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cli_vlm(vwork):
    out = vwork / "cli_fsdp2_vlm"
    proc = torchrun_cli(*argv(VLM, out, "fsdp2_vlm", steps=STEPS, ckpt_every=2, **SETTINGS),
                        "--nproc", "2")
    return out, proc


@pytest.fixture(scope="module")
def xattn(vwork) -> Path:
    """The cross-attention VLM from scratch on 2 spawned ranks."""
    runs = [(argv(str(vwork / "specs" / "vlm_xattn.forge"), vwork / "xattn", "fsdp2_xattn",
                  **XATTN_SETTINGS), {})]
    spawn(train_runs, (runs,), 2, vwork, timeout=180)
    return vwork / "xattn"


@pytest.fixture(scope="module")
def pipelines(vwork) -> Path:
    """One world-2 spawn: every schedule of the joint-decoder VLM, the
    cross-attention VLM's pp2 plan, the single-process run's step-2 checkpoint
    resumed under pp2_vlm, and a MoT VLM with MoE layers on both stages."""
    from test_vlm_train import MOT_MOE

    spec = str(vwork / "specs" / "vlm.forge")
    resumed = without_step(vwork / "ref", vwork / "resume_pp2_from_1")
    mot_moe = vwork / "specs" / "mot_moe.forge"
    mot_moe.write_text(MOT_MOE + MOT_MOE_PLAN)
    quiet_train(str(mot_moe), str(vwork / "ref_mot_moe"), grad_accum=2, **MOT_MOE_SETTINGS)
    runs = [argv(spec, vwork / plan, plan, steps=STEPS, ckpt_every=2, **SETTINGS)
            for plan in PIPELINES]
    runs += [argv(str(vwork / "specs" / "vlm_xattn.forge"), vwork / "pp2_xattn", "pp2_xattn",
                  **XATTN_SETTINGS),
             argv(VLM, resumed, "pp2_vlm") + ["--resume"],
             argv(str(mot_moe), vwork / "mot_moe_pp2", "mot_moe_pp2", **MOT_MOE_SETTINGS)]
    spawn(train_runs, ([(r, {}) for r in runs],), 2, vwork, timeout=300)
    return vwork


@pytest.fixture(scope="module")
def fsdp_pp(vwork) -> Path:
    """FSDP × PP on 4 spawned ranks (the shipped fsdp2_pp2_vlm)."""
    runs = [(argv(VLM, vwork / "fsdp2_pp2_vlm", "fsdp2_pp2_vlm", steps=STEPS, **SETTINGS), {})]
    spawn(train_runs, (runs,), 4, vwork, timeout=240)
    return vwork / "fsdp2_pp2_vlm"


def test_cli_fsdp2_vlm_equals_single_process(vwork, cli_vlm):
    out, proc = cli_vlm
    assert_clean_exit(proc)
    assert "with plan 'fsdp2_vlm' on 2 processes (dp 2 × pp 1" in proc.stderr
    assert "batch 4 images x 26 caption tokens" in proc.stderr
    assert_same(losses(out), losses(vwork / "ref"), "fsdp2_vlm (torchrun)")
    # same metrics schema, eval rows included, and the same eval numbers
    got, want = (read_metrics(str(r / "metrics.jsonl")) for r in (out, vwork / "ref"))
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    assert [r["step"] for r in got if "eval" in r] == [STEPS]
    assert evals(out) == evals(vwork / "ref")
    assert evals(out)[0]["images"] == 128
    assert "eval step 4: caption-token accuracy" in proc.stderr
    run = json.loads((out / "run.json").read_text())
    assert (run["plan"], run["world"], run["task"]) == ("fsdp2_vlm", 2, "captions")
    assert (out / "loss.png").exists()


def test_resume_2_rank_vlm_checkpoint_at_1_rank(vwork, cli_vlm):
    assert_clean_exit(cli_vlm[1])
    run = without_step(cli_vlm[0], vwork / "resume1_from_2")
    quiet_train(VLM, str(run), resume=True)
    assert_same(losses(run), losses(vwork / "ref"), "2 ranks → resume at 1")
    assert evals(run) == evals(vwork / "ref")


def test_fsdp_cross_attention_vlm_equals_single_process(vwork, xattn):
    assert_same(losses(xattn), losses(vwork / "ref_xattn"), "vlm_xattn fsdp2")
    assert evals(xattn) == evals(vwork / "ref_xattn")
    plans = (xattn / "package" / "vlm_xattn" / "plan.py").read_text()
    assert '"transformer.cross_attention_layers.1"' in plans


@pytest.mark.parametrize("plan", PIPELINES)
def test_pipeline_schedule_vlm_equals_single_process(vwork, pipelines, plan):
    assert_same(losses(pipelines / plan), losses(vwork / "ref"), plan)
    # the eval batches run through the stages; the last stage's ranks count the hits
    assert evals(pipelines / plan) == evals(vwork / "ref")
    run = json.loads((pipelines / plan / "run.json").read_text())
    assert (run["plan"], run["world"], run["task"]) == (plan, 2, "captions")


def test_pipeline_cross_attention_vlm_equals_single_process(vwork, pipelines):
    # decoder stages pass on the image tokens with the hidden states
    assert_same(losses(pipelines / "pp2_xattn"), losses(vwork / "ref_xattn"), "pp2_xattn")
    assert evals(pipelines / "pp2_xattn") == evals(vwork / "ref_xattn")


def test_pipeline_mot_vlm_collects_its_moe_losses(vwork, pipelines):
    assert_same(losses(pipelines / "mot_moe_pp2"), losses(vwork / "ref_mot_moe"), "mot_moe_pp2")
    rows = [read_metrics(str(r / "metrics.jsonl")) for r in (pipelines / "mot_moe_pp2",
                                                              vwork / "ref_mot_moe")]
    # both modalities' copies of both MoE layers, on two stages: rank 0 logs them all
    assert set(rows[0][0]["moe"]) == {f"transformer.layers.{i}.mlp.{m}" for i in (1, 3)
                                      for m in ("image", "text")}
    assert [r["moe"] for r in rows[0]] == [r["moe"] for r in rows[1]]
    assert evals(pipelines / "mot_moe_pp2") == evals(vwork / "ref_mot_moe")


def test_fsdp_x_pipeline_vlm_on_4_ranks(vwork, fsdp_pp):
    assert_same(losses(fsdp_pp), losses(vwork / "ref"), "fsdp2_pp2_vlm")
    assert evals(fsdp_pp) == evals(vwork / "ref")


def test_pipelined_vlm_checkpoints_resume_across_plans(vwork, pipelines):
    # stages keep the VLM's FQNs: a pipelined checkpoint resumes in one process ...
    run = without_step(pipelines / "pp2_vlm", vwork / "resume1_from_pp2")
    quiet_train(str(vwork / "specs" / "vlm.forge"), str(run), resume=True)
    assert_same(losses(run), losses(vwork / "ref"), "pp2_vlm → resume at 1")
    # ... and a single-process one under the pipeline (stages built on the meta device)
    assert_same(losses(pipelines / "resume_pp2_from_1"), losses(vwork / "ref"),
                "1 rank → resume under pp2_vlm")
    assert evals(pipelines / "resume_pp2_from_1") == evals(vwork / "ref")


@pytest.mark.parametrize("spec, extra, message", [
    (VLM, ["--plan", "fsdp2_vlm", "--seq-len", "16"],
     "--seq-len does not apply to a vision-language model"),
    (VLM, ["--plan", "fsdp2_vlm", "--batch-size", "3"],
     "--batch-size 3 does not split over dp = 2"),
    (DEBUG, ["--plan", "fsdp2", "--eval-every", "2"],
     "--eval-every applies to vision-language models"),
])
def test_bad_vlm_plan_use_is_a_usage_error(tmp_path, capsys, spec, extra, message):
    code = main(["train", spec, "--out", str(tmp_path / "o"), "--steps", "1", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("forgec: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "o" / "checkpoints").exists()

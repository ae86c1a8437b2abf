"""Tensor and expert parallelism trained on CPU (gloo, 127.0.0.1): the plans
tp2, dp2_tp2 (FSDP × TP) and ep2 of the shipped specs, experts shared out
over 2 of 4 data-parallel ranks, TP and EP inside 2 pipeline stages, and TP
with EP, each checked against the single-process
trainer's per-step losses (fp32, ≤ 1e-5) and MoE routing statistics; TP
checkpoints resumed by one process and one process's resumed under TP; TP
shards initialised per rank.

Ranks run under torch.multiprocessing (tests/dist_helpers.py); one spawn per
world size runs its trainings in a row.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from dist_helpers import spawn, train_runs
from test_distributed import (
    MOE_SPEC,
    SETTINGS,
    argv,
    assert_same,
    losses,
    moe_rows,
    quiet_train,
)

from forgec.compiler.cli import main

DEBUG = str(ROOT / "specs" / "llama_debug.forge")
MOE = str(ROOT / "specs" / "moe_debug.forge")
STEPS = 5

# test_distributed's MoE (balance and z losses that count) with plans of experts
# over 2 of 4 dp ranks, with TP and inside pipeline stages
MOE_AUX_SPEC = MOE_SPEC + """
plan dp4_ep2 for moe_dist {
  mesh(dp = 4, ep = 2)
  fsdp()
}

plan dp2_ep2_tp2 for moe_dist {     # experts over 2 dp ranks, attention and dense MLPs over 2 tp
  mesh(dp = 2, ep = 2, tp = 2)
  fsdp()
}

plan dp2_ep2_pp2 for moe_dist {     # experts over both dp ranks of each of 2 stages
  mesh(dp = 2, ep = 2, pp = 2)
  fsdp()
  pipeline(schedule = "1f1b", microbatches = 2)
}
"""

# TP inside each of 2 pipeline stages
TP_PP_PLAN = """
plan pp2_tp2 for llama_debug {
  mesh(pp = 2, tp = 2)
  pipeline(schedule = "1f1b", microbatches = 2)
}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # the ranks share the 2 cores with this process
    root = tmp_path_factory.mktemp("dist_tp")
    specs = root / "specs"
    specs.mkdir()
    (specs / "llama_debug.forge").write_text(Path(DEBUG).read_text() + TP_PP_PLAN)
    (specs / "moe_dist.forge").write_text(MOE_AUX_SPEC)
    return root


@pytest.fixture(scope="module")
def reference(work) -> dict[str, list[float]]:
    """Single-process losses; the MoE models with their distributed runs'
    micro-batches (one per dp rank) as gradient accumulation."""
    quiet_train(DEBUG, str(work / "ref"), steps=STEPS, ckpt_every=3, **SETTINGS)
    quiet_train(MOE, str(work / "ref_moe"), steps=STEPS, grad_accum=2, **SETTINGS)
    quiet_train(str(work / "specs" / "moe_dist.forge"), str(work / "ref_aux"), steps=STEPS,
                grad_accum=4, **SETTINGS)
    return {"dense": losses(work / "ref"), "moe": losses(work / "ref_moe"),
            "aux": losses(work / "ref_aux")}


def before_last_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of run `src` as if it had stopped right after its step-3 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / f"step_{STEPS:06d}")
    return dst


@pytest.fixture(scope="module")
def two_ranks(work, reference) -> Path:
    """tp2 (checkpoints at 3 and 5), moe_debug's ep2, the single-process run
    resumed at step 3 under tp2, and tp2 initialised on each rank's own shards
    (a model "too large" for host initialisation)."""
    resumed = before_last_checkpoint(work / "ref", work / "resume_tp2_from_1")
    runs = [(argv(DEBUG, work / "tp2", "tp2", steps=STEPS, ckpt_every=3), {}),
            (argv(MOE, work / "ep2", "ep2", steps=STEPS), {}),
            (argv(DEBUG, resumed, "tp2", steps=STEPS, resume=True), {}),
            (argv(DEBUG, work / "meta_init_tp2", "tp2", steps=2),
             {"FORGEC_HOST_INIT_MAX_PARAMS": "0"})]
    spawn(train_runs, (runs,), 2, work, timeout=240)
    return work


@pytest.fixture(scope="module")
def four_ranks(work, reference) -> Path:
    aux = str(work / "specs" / "moe_dist.forge")
    runs = [(argv(DEBUG, work / "dp2_tp2", "dp2_tp2", steps=STEPS), {}),
            (argv(aux, work / "dp4_ep2", "dp4_ep2", steps=STEPS), {}),
            (argv(str(work / "specs" / "llama_debug.forge"), work / "pp2_tp2", "pp2_tp2",
                  steps=STEPS), {}),
            (argv(aux, work / "dp2_ep2_pp2", "dp2_ep2_pp2", steps=STEPS), {}),
            # 2 dp ranks × 2 micro-batches: the reference's 4 micro-batches
            (argv(aux, work / "dp2_ep2_tp2", "dp2_ep2_tp2", steps=STEPS, grad_accum=2), {})]
    spawn(train_runs, (runs,), 4, work, timeout=240)
    return work


def chunks(run: Path, fqn: str, step: int = STEPS) -> list[tuple[tuple, tuple]]:
    """(offsets, sizes) of the pieces the ranks saved of parameter `fqn`."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(run / "checkpoints" / f"step_{step:06d}")).read_metadata()
    return sorted((tuple(c.offsets), tuple(c.sizes))
                  for c in meta.state_dict_metadata[f"model.{fqn}"].chunks)


# ---- tensor parallelism --------------------------------------------------------------------


def test_tp2_equals_single_process(two_ranks, reference):
    assert_same(losses(two_ranks / "tp2"), reference["dense"], "tp2")
    # q_proj split by output features (heads), o_proj by input features; the
    # embedding and norms are whole on both ranks (one piece)
    assert chunks(two_ranks / "tp2", "layers.0.attention.q_proj.weight") == [
        ((0, 0), (64, 128)), ((64, 0), (64, 128))]
    assert chunks(two_ranks / "tp2", "layers.0.attention.o_proj.weight") == [
        ((0, 0), (128, 64)), ((0, 64), (128, 64))]
    assert chunks(two_ranks / "tp2", "token_embedding.embedding.weight") == [
        ((0, 0), (256, 128))]


def test_fsdp_x_tp_on_4_ranks(four_ranks, reference):
    assert_same(losses(four_ranks / "dp2_tp2"), reference["dense"], "dp2_tp2")
    # 2-D: FSDP shards each TP shard over the 2 replicas
    assert len(chunks(four_ranks / "dp2_tp2", "layers.0.mlp.gate_proj.weight")) == 4


def test_resume_tp2_checkpoint_at_1_rank(work, two_ranks, reference):
    resumed = before_last_checkpoint(two_ranks / "tp2", work / "resume1_from_tp2")
    quiet_train(DEBUG, str(resumed), resume=True, steps=STEPS)
    assert_same(losses(resumed), reference["dense"], "tp2 → resume at 1 rank")


def test_resume_1_rank_checkpoint_under_tp2(two_ranks, reference):
    # DCP loads whole tensors into TP shards, optimizer state included
    assert_same(losses(two_ranks / "resume_tp2_from_1"), reference["dense"], "1 rank → tp2")


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.detach().flatten(), b.detach().flatten()]))[0, 1])


def test_meta_device_initialisation_draws_each_tp_shard(two_ranks, reference):
    from forgec.runtime.checkpoint import latest_checkpoint, load_checkpoint
    from forgec.runtime.package import import_package

    run = two_ranks / "meta_init_tp2"
    got = losses(run)
    assert abs(got[0] - reference["dense"][0]) > 1e-5  # its own weights...
    assert abs(got[0] - math.log(256)) < 0.2, got  # ...from the same law
    model = import_package(str(run / "package" / "llama_debug")).Transformer()
    load_checkpoint(latest_checkpoint(str(run))[1], model)
    # the two ranks' heads are independent draws, not copies of one seed
    for w in (model.layers["0"].attention.q_proj.weight, model.layers["0"].mlp.up_proj.weight):
        half = w.shape[0] // 2
        assert abs(_corr(w[:half], w[half:])) < 0.1


# ---- expert parallelism --------------------------------------------------------------------


def test_ep2_equals_single_process(two_ranks, reference):
    assert_same(losses(two_ranks / "ep2"), reference["moe"], "ep2")
    # routing statistics of all ranks' tokens: the same as one process
    want = moe_rows(two_ranks / "ref_moe")
    assert set(want[0]) == {"layers.1.mlp", "layers.3.mlp"}
    assert moe_rows(two_ranks / "ep2") == want
    assert chunks(two_ranks / "ep2", "layers.1.mlp.experts.gate_proj") == [
        ((0, 0, 0), (4, 128, 64)), ((4, 0, 0), (4, 128, 64))]


def test_experts_over_2_of_4_dp_ranks(four_ranks, reference):
    """dp 4, ep 2: two copies of each half of the experts, whose gradients
    add up over the copies; balance and z losses count in the loss."""
    run = four_ranks / "dp4_ep2"
    assert_same(losses(run), reference["aux"], "dp4_ep2")
    assert moe_rows(run) == moe_rows(four_ranks / "ref_aux")
    # experts in 2 pieces (ep), the router FSDP-sharded in 4 (dp)
    assert len(chunks(run, "layers.3.mlp.experts.down_proj")) == 2
    assert len(chunks(run, "layers.3.mlp.router.weight")) == 4


# ---- with pipelines ------------------------------------------------------------------------


def test_tp_inside_pipeline_stages(four_ranks, reference):
    run = four_ranks / "pp2_tp2"
    assert_same(losses(run), reference["dense"], "pp2_tp2")
    # each stage's layers split over its tp pair: 2 pieces of a layer of each stage
    assert len(chunks(run, "layers.0.attention.q_proj.weight")) == 2
    assert len(chunks(run, "layers.3.mlp.down_proj.weight")) == 2


def test_ep_inside_pipeline_stages(four_ranks, reference):
    """dp 2 × ep 2 × pp 2: each stage's MoE layer has its experts over the
    stage's 2 dp ranks; routing statistics and MoE losses stay global."""
    run = four_ranks / "dp2_ep2_pp2"
    assert_same(losses(run), reference["aux"], "dp2_ep2_pp2")
    assert moe_rows(run) == moe_rows(four_ranks / "ref_aux")
    assert len(chunks(run, "layers.1.mlp.experts.down_proj")) == 2
    assert len(chunks(run, "layers.3.mlp.experts.down_proj")) == 2


def test_tp_and_ep_together(four_ranks, reference):
    """dp 2 × ep 2 × tp 2: each tp pair splits the attention, each MoE layer's
    experts are shared out over the 2 dp ranks (whole within a tp pair)."""
    run = four_ranks / "dp2_ep2_tp2"
    assert_same(losses(run), reference["aux"], "dp2_ep2_tp2")
    assert moe_rows(run) == moe_rows(four_ranks / "ref_aux")
    assert len(chunks(run, "layers.0.attention.q_proj.weight")) == 4  # tp × FSDP
    assert len(chunks(run, "layers.1.mlp.experts.down_proj")) == 2


# ---- bad input ---------------------------------------------------------------------------


def test_tp_plan_on_the_wrong_world_size_is_a_usage_error(tmp_path, capsys):
    code = main(["train", DEBUG, "--out", str(tmp_path / "o"), "--steps", "1",
                 "--plan", "dp2_tp2", "--nproc", "2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == ("forgec: error: plan 'dp2_tp2' runs on 4 processes (dp 2 × pp 1 × tp 2), "
                   "not --nproc 2\n")

"""Distributed training on CPU (gloo, 127.0.0.1): FSDP2, every pipeline
schedule, FSDP × PP and DCP resume across world sizes, each checked against
the single-process trainer's per-step losses (fp32, ≤ 1e-5).

Ranks run under torch.multiprocessing (tests/dist_helpers.py) or, for the
command line, under torchrun itself; every launch has a time limit. One spawn
runs several trainings in a row to pay process start-up once.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from dist_helpers import spawn, train_runs

from forgec.compiler.cli import main
from forgec.runtime.train import read_metrics, train

DEBUG = str(ROOT / "specs" / "llama_debug.forge")
TIED = str(ROOT / "specs" / "qwen_debug.forge")  # its head is tied to the embedding
SETTINGS = {"batch_size": 8, "seq_len": 32, "lr": 3e-3, "seed": 0}
STEPS = 6  # checkpoints at 3 and 6: resumes start from step 3
TOL = 1e-5

# a MoE model whose balance and z losses count, and plans over it
MOE_SPEC = """
import "llama_debug.forge"

model moe_dist extends llama_debug {
  block sparse(x) extends dense {
    mlp = moe(dim, experts = 8, top_k = 2, hidden = 64, shared_experts = 1,
              router = sigmoid_topk(bias_rate = 1e-2, schedule = constant, n_group = 4,
                                    topk_group = 2, seq_aux_loss_weight = 0.01,
                                    z_loss_weight = 0.001),
              capacity_factor = 1.0)
  }

  layers = stack(n_layers) {
    default:        dense
    every 2 from 1: sparse
  }
}

plan moe_fsdp2 for moe_dist {
  mesh(dp = 2)
  fsdp()
}

plan moe_pp2 for moe_dist {
  mesh(pp = 2)
  pipeline(schedule = "1f1b", microbatches = 2)
}
"""

# plans of the debug model beyond the shipped ones
EXTRA_PLANS = """
plan pp2_zbv for llama_debug {
  mesh(pp = 2)
  pipeline(schedule = zbv, virtual_stages = 2, microbatches = 4)
}

plan fsdp2_bf16 for llama_debug {
  mesh(dp = 2)
  fsdp(compute = bf16)
}

plan fsdp2_offload for llama_debug {
  mesh(dp = 2)
  fsdp(cpu_offload = true, reshard = never)
}

plan fsdp2_sac for llama_debug {
  mesh(dp = 2)
  fsdp()
  activation_checkpoint(default = selective(save = [matmul, sdpa]))
}
"""


# a V-shaped schedule puts the first and the last stage (the embedding and the
# tied head's copy) on the same rank
TIED_PLANS = """
plan pp2_zbv for qwen_debug {
  mesh(pp = 2)
  pipeline(schedule = zbv, virtual_stages = 2, microbatches = 4)
}
"""


def argv(spec: str, out: Path, plan: str, steps: int = STEPS, **extra) -> list[str]:
    args = [spec, "--out", str(out), "--plan", plan, "--steps", str(steps), "--no-progress"]
    for key, value in {**SETTINGS, **extra}.items():
        if value is True:
            args.append("--" + key.replace("_", "-"))
        else:
            args += ["--" + key.replace("_", "-"), str(value)]
    return args


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(str(run / "metrics.jsonl"))]


def assert_same(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} steps, expected {len(want)}"
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert worst <= TOL, f"{what}: losses {got} differ from {want} by {worst:.2e}"


def quiet_train(*args, **kwargs) -> dict:
    with contextlib.redirect_stderr(io.StringIO()):
        return train(*args, progress=False, **kwargs)


def torchrun_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`forgec train ... --plan` in a fresh interpreter: it starts torchrun."""
    return subprocess.run([sys.executable, "-m", "forgec.compiler.cli", "train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_clean_exit(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the teardown hazard: an abort at interpreter exit after a DeviceMesh
    assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def without_last_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of run `src` as if it had stopped right after its step-3 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / f"step_{STEPS:06d}")
    return dst


# ---- references and runs, shared by the tests -------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # the ranks share the 2 cores with this process
    root = tmp_path_factory.mktemp("dist")
    specs = root / "specs"
    specs.mkdir()
    (specs / "llama_debug.forge").write_text(Path(DEBUG).read_text() + EXTRA_PLANS)
    (specs / "moe_dist.forge").write_text(MOE_SPEC)
    (specs / "qwen_debug.forge").write_text(Path(TIED).read_text() + TIED_PLANS)
    return root


@pytest.fixture(scope="module")
def reference(work) -> dict[str, list[float]]:
    """Single-process losses: the debug model, and the MoE model with the
    micro-batches of its distributed runs as gradient accumulation (2)."""
    quiet_train(DEBUG, str(work / "ref"), steps=STEPS, ckpt_every=3, **SETTINGS)
    quiet_train(str(work / "specs" / "moe_dist.forge"), str(work / "ref_moe"), steps=5,
                grad_accum=2, **SETTINGS)
    quiet_train(TIED, str(work / "ref_tied"), steps=STEPS, ckpt_every=3, **SETTINGS)
    return {"dense": losses(work / "ref"), "moe": losses(work / "ref_moe"),
            "tied": losses(work / "ref_tied")}


@pytest.fixture(scope="module")
def cli_fsdp(work, reference) -> tuple[Path, subprocess.CompletedProcess]:
    """The real command line: `forgec train --plan fsdp2 --nproc 2` under torchrun."""
    out = work / "cli_fsdp2"
    proc = torchrun_cli(*argv(DEBUG, out, "fsdp2", ckpt_every=3), "--nproc", "2")
    return out, proc


@pytest.fixture(scope="module")
def two_ranks(work, reference) -> Path:
    """One world-2 spawn running, in turn: the MoE model under FSDP and under a
    pipeline, every pipeline schedule of the debug model, FSDP with bf16
    compute, FSDP with CPU offload and no resharding, FSDP with op-level
    selective activation checkpointing, and a resume at 2 ranks of the single-process run's checkpoint."""
    moe = str(work / "specs" / "moe_dist.forge")
    extra = str(work / "specs" / "llama_debug.forge")
    resumed = without_last_checkpoint(work / "ref", work / "resume2_from_1")
    tied_resumed = without_last_checkpoint(work / "ref_tied", work / "tied_pp2_from_1")
    tied = str(work / "specs" / "qwen_debug.forge")
    runs = [argv(moe, work / "moe_fsdp2", "moe_fsdp2", steps=5),
            argv(moe, work / "moe_pp2", "moe_pp2", steps=5),
            argv(DEBUG, work / "pp2_gpipe", "pp2_gpipe"),
            argv(DEBUG, work / "pp2", "pp2"),
            argv(DEBUG, work / "pp2_interleaved", "pp2_interleaved"),
            argv(extra, work / "pp2_zbv", "pp2_zbv"),
            argv(extra, work / "fsdp2_bf16", "fsdp2_bf16"),
            argv(extra, work / "fsdp2_offload", "fsdp2_offload"),
            argv(extra, work / "fsdp2_sac", "fsdp2_sac"),
            argv(DEBUG, resumed, "fsdp2", resume=True),
            argv(TIED, work / "tied_pp2", "pp2", ckpt_every=3),
            argv(tied, work / "tied_pp2_zbv", "pp2_zbv"),
            argv(TIED, tied_resumed, "pp2", resume=True)]
    runs = [(r, {}) for r in runs]
    # a model "too large" for host initialisation: ranks initialise their own shards
    for plan in ("fsdp2", "pp2_interleaved"):
        runs.append((argv(DEBUG, work / f"meta_init_{plan}", plan, steps=2),
                     {"FORGEC_HOST_INIT_MAX_PARAMS": "0"}))
    runs.append((argv(TIED, work / "meta_init_tied_pp2", "pp2", steps=2),
                 {"FORGEC_HOST_INIT_MAX_PARAMS": "0"}))
    spawn(train_runs, (runs,), 2, work, timeout=240)
    return work


@pytest.fixture(scope="module")
def four_ranks(work, reference, cli_fsdp) -> Path:
    """One world-4 spawn: FSDP × PP from scratch, then a resume at 4 ranks of
    the 2-rank FSDP run's step-3 checkpoint, then FSDP × PP of the tied model."""
    resumed = without_last_checkpoint(cli_fsdp[0], work / "resume4_from_2")
    runs = [(argv(DEBUG, work / "fsdp2_pp2", "fsdp2_pp2"), {}),
            (argv(DEBUG, resumed, "fsdp2_pp2", resume=True), {}),
            (argv(TIED, work / "tied_fsdp2_pp2", "fsdp2_pp2"), {})]
    spawn(train_runs, (runs,), 4, work, timeout=240)
    return work


# ---- FSDP -------------------------------------------------------------------------------


def test_cli_fsdp2_equals_single_process_and_exits_cleanly(cli_fsdp, reference):
    out, proc = cli_fsdp
    assert_clean_exit(proc)
    assert "with plan 'fsdp2' on 2 processes (dp 2 × pp 1" in proc.stderr
    assert_same(losses(out), reference["dense"], "fsdp2 (torchrun)")
    run = json.loads((out / "run.json").read_text())
    assert (run["plan"], run["world"]) == ("fsdp2", 2)
    # rank 0 alone writes the metrics: one row per step
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]
    # one DCP shard per rank, plus the trainer state rank 0 sealed the folder with
    names = {p.name for p in (out / "checkpoints" / "step_000006").iterdir()}
    assert names == {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer.json"}


def moe_rows(run: Path) -> list[dict]:
    return [r["moe"] for r in read_metrics(str(run / "metrics.jsonl"))]


def test_fsdp_moe_equals_single_process(work, two_ranks, reference):
    assert_same(losses(two_ranks / "moe_fsdp2"), reference["moe"], "moe_fsdp2")
    # routing statistics summed over the ranks' rows of the batch: the same as one process
    want = moe_rows(work / "ref_moe")
    assert set(want[0]) == {"layers.1.mlp", "layers.3.mlp"}
    assert moe_rows(two_ranks / "moe_fsdp2") == want


def test_fsdp_bf16_compute_keeps_fp32_master_weights(two_ranks, reference):
    from torch.distributed.checkpoint import FileSystemReader

    got = losses(two_ranks / "fsdp2_bf16")
    want = reference["dense"]
    # bf16 matmuls: close to the fp32 run, yet not equal to it (so bf16 really ran)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 0.05
    assert got != pytest.approx(want, abs=TOL)
    meta = FileSystemReader(str(two_ranks / "fsdp2_bf16" / "checkpoints" / "step_000006")) \
        .read_metadata().state_dict_metadata
    weights = {k: v for k, v in meta.items() if k.startswith("model.")}
    assert weights and {v.properties.dtype for v in weights.values()} == {torch.float32}


def test_fsdp_with_selective_activation_checkpointing_equals_single_process(two_ranks,
                                                                          reference):
    assert_same(losses(two_ranks / "fsdp2_sac"), reference["dense"], "fsdp2_sac")


def test_fsdp_cpu_offload_without_resharding_equals_single_process(two_ranks, reference):
    # CPUOffloadPolicy keeps the shards in (pageable, on a CPU mesh) host memory;
    # reshard = never keeps each unit gathered from forward to backward
    assert_same(losses(two_ranks / "fsdp2_offload"), reference["dense"], "fsdp2_offload")


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.detach().flatten(), b.detach().flatten()]))[0, 1])


def test_meta_device_initialisation_draws_independent_shards_and_stages(two_ranks, reference):
    from forgec.runtime.checkpoint import latest_checkpoint, load_checkpoint
    from forgec.runtime.package import import_package

    def trained(name: str):
        run = two_ranks / name
        model = import_package(str(run / "package" / "llama_debug")).Transformer()
        load_checkpoint(latest_checkpoint(str(run))[1], model)
        return losses(run), model

    for name in ("meta_init_fsdp2", "meta_init_pp2_interleaved"):
        got, _ = trained(name)
        # other weights than one process draws, from the same law: a near-uniform
        # first prediction over 256 bytes
        assert abs(got[0] - reference["dense"][0]) > TOL, name
        assert abs(got[0] - math.log(256)) < 0.2, (name, got)
    # FSDP: the two ranks' halves of a weight are independent draws, not copies
    _, model = trained("meta_init_fsdp2")
    for w in (model.layers["0"].attention.q_proj.weight, model.token_embedding.embedding.weight):
        half = w.shape[0] // 2
        assert abs(_corr(w[:half], w[half:])) < 0.1
    # interleaved: stages 1 and 2 ([layers.1], [layers.2]) have the same shapes and
    # live on different ranks, yet draw their own weights
    _, model = trained("meta_init_pp2_interleaved")
    q = [model.layers[str(i)].attention.q_proj.weight for i in range(4)]
    assert max(abs(_corr(q[i], q[j])) for i in range(4) for j in range(i)) < 0.1


# ---- pipelines ----------------------------------------------------------------------------


@pytest.mark.parametrize("plan", ["pp2_gpipe", "pp2", "pp2_interleaved", "pp2_zbv"])
def test_pipeline_schedule_equals_unpipelined(two_ranks, reference, plan):
    assert_same(losses(two_ranks / plan), reference["dense"], plan)


def test_pipeline_moe_equals_single_process(work, two_ranks, reference):
    # each stage's MoE losses join the objective, as in one process
    assert_same(losses(two_ranks / "moe_pp2"), reference["moe"], "moe_pp2")
    # layers.1 lives on stage 0, layers.3 on stage 1: rank 0 logs both
    assert moe_rows(two_ranks / "moe_pp2") == moe_rows(work / "ref_moe")


def test_fsdp_x_pipeline_on_4_ranks(four_ranks, reference):
    assert_same(losses(four_ranks / "fsdp2_pp2"), reference["dense"], "fsdp2_pp2")


# ---- a head tied to the embedding, split across pipeline stages ---------------------------


def tied_pair(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding table and the head's weight in the run's last checkpoint
    (a pipeline saves them from different stages)."""
    from forgec.runtime.checkpoint import latest_checkpoint, load_checkpoint
    from forgec.runtime.package import import_package

    pkg = import_package(str(run / "package" / "qwen_debug"))
    model = pkg.Transformer()
    model.output_head.proj.weight = torch.nn.Parameter(model.output_head.proj.weight.clone())
    load_checkpoint(latest_checkpoint(str(run))[1], model)
    return model.token_embedding.embedding.weight, model.output_head.proj.weight


@pytest.mark.parametrize("run", ["tied_pp2", "tied_pp2_zbv", "tied_fsdp2_pp2"])
def test_tied_head_across_stages_equals_single_process(work, two_ranks, four_ranks,
                                                      reference, run):
    """The last stage's copy of the embedding table takes the summed gradient of
    both uses: the losses are the single process's, and the two saved tensors
    are equal (the V schedule holds both stages on one rank; FSDP shards both)."""
    assert_same(losses(work / run), reference["tied"], run)
    embedding, head = tied_pair(work / run)
    assert torch.equal(embedding, head)


def test_tied_copy_starts_equal_under_meta_initialisation(two_ranks):
    # each stage initialises its own modules; the copy takes the first stage's table
    embedding, head = tied_pair(two_ranks / "meta_init_tied_pp2")
    assert torch.equal(embedding, head) and embedding.std() > 0


def test_tied_pipeline_resumes_across_world_sizes(work, two_ranks, reference):
    assert_same(losses(work / "tied_pp2_from_1"), reference["tied"], "tied: 1 → pp2")
    resumed = without_last_checkpoint(work / "tied_pp2", work / "tied_1_from_pp2")
    quiet_train(TIED, str(resumed), resume=True, steps=STEPS)
    assert_same(losses(resumed), reference["tied"], "tied: pp2 → 1")


# ---- DCP resume across world sizes --------------------------------------------------------


def test_resume_2_rank_checkpoint_at_1_rank(work, cli_fsdp, reference):
    resumed = without_last_checkpoint(cli_fsdp[0], work / "resume1_from_2")
    quiet_train(DEBUG, str(resumed), resume=True, steps=STEPS)
    assert_same(losses(resumed), reference["dense"], "2 ranks → resume at 1")


def test_resume_2_rank_checkpoint_at_4_ranks(four_ranks, reference):
    rows = read_metrics(str(four_ranks / "resume4_from_2" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert_same([r["loss"] for r in rows], reference["dense"], "2 ranks → resume at 4 (pp × dp)")


def test_resume_1_rank_checkpoint_at_2_ranks(two_ranks, reference):
    assert_same(losses(two_ranks / "resume2_from_1"), reference["dense"], "1 rank → resume at 2")


# ---- bad input: one line, exit 2, nothing launched ------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--plan", "fsdp2", "--nproc", "3"],
     "plan 'fsdp2' runs on 2 processes (dp 2 × pp 1 × tp 1), not --nproc 3"),
    (["--plan", "fsdp8"], "has no plan 'fsdp8' (plans: dp2_tp2, fsdp2, fsdp2_pp2, pp2, "
                          "pp2_gpipe, pp2_interleaved, tp2)"),
    (["--nproc", "2"], "--nproc needs --plan NAME"),
    (["--plan", "pp2", "--batch-size", "6"],
     "6 sequences per rank and micro-batch do not split into the plan's 4 pipeline "
     "microbatches"),
    (["--plan", "fsdp2", "--batch-size", "3"], "--batch-size 3 does not split over dp = 2"),
])
def test_bad_plan_use_is_a_usage_error(tmp_path, capsys, extra, message):
    code = main(["train", DEBUG, "--out", str(tmp_path / "o"), "--steps", "1", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("forgec: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_cli_error_in_the_workers_is_one_line_and_tears_down(work, cli_fsdp):
    """A corrupt checkpoint found by every rank: exit 1, the one-line message, no
    torchrun failure report, no abort at exit, the checkpoint left as it was."""
    run = without_last_checkpoint(cli_fsdp[0], work / "corrupt")
    shard = run / "checkpoints" / "step_000003" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes() + b"garbage")
    before = shard.read_bytes()
    proc = torchrun_cli(DEBUG, "--out", str(run), "--plan", "fsdp2", "--resume",
                        "--steps", str(STEPS), "--no-progress")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"forgec: error: checkpoint {run}/checkpoints/step_000003 is "
                                   "corrupt: __0_0.distcp does not match its checksum")
    assert shard.read_bytes() == before

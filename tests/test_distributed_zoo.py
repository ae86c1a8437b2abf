"""One model of each new kind trains, alone and under the committed plans: a dense
Gemma-2-style model (specs/gemma2_debug.forge: soft-capped attention over packed
documents, sliding windows, a tied head), an MLA mixture of experts
(specs/deepseek_debug.forge: latent attention, a sigmoid group-limited router, a
shared expert) and a hybrid (specs/jamba_debug.forge: Mamba mixers, attention and
experts). Each plan's per-step losses equal the single process's within 1e-5
(gloo on 127.0.0.1, fp32): `fsdp2` (2 data-parallel ranks, parameters sharded)
and `pp2` (2 pipeline stages, 1F1B over 2 microbatches).

The single-process reference accumulates 2 micro-batches: an FSDP rank's half of
the batch, and a pipeline's microbatch, are each one of them (MoE routing and its
losses are per micro-batch). All six distributed runs share one 2-rank spawn.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ROOT
from dist_helpers import spawn, train_runs
from test_distributed import argv, assert_same, losses, quiet_train

MODELS = ("gemma2_debug", "deepseek_debug", "jamba_debug")
SETTINGS = {"batch_size": 4, "seq_len": 32, "lr": 3e-3, "seed": 0}
STEPS = 4


def spec(name: str) -> str:
    return str(ROOT / "specs" / f"{name}.forge")


def run_args(name: str, out: Path, plan: str) -> list[str]:
    args = argv(spec(name), out, plan, steps=STEPS)
    # this file's (smaller) batch in place of test_distributed's settings
    for key, value in SETTINGS.items():
        flag = "--" + key.replace("_", "-")
        args[args.index(flag) + 1] = str(value)
    return args


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # the ranks share the cores with this process
    work = tmp_path_factory.mktemp("dist_zoo")
    for name in MODELS:
        quiet_train(spec(name), str(work / f"ref_{name}"), steps=STEPS, grad_accum=2,
                    **SETTINGS)
    plans = [(run_args(name, work / f"{name}_{plan}", plan), {})
             for name in MODELS for plan in ("fsdp2", "pp2")]
    spawn(train_runs, (plans,), 2, work, timeout=300)
    return work


@pytest.mark.parametrize("name", MODELS)
def test_the_model_trains(runs, name):
    got = losses(runs / f"ref_{name}")
    assert len(got) == STEPS and got[-1] < got[0] - 0.2, got


@pytest.mark.parametrize("plan", ["fsdp2", "pp2"])
@pytest.mark.parametrize("name", MODELS)
def test_plan_equals_single_process(runs, name, plan):
    assert_same(losses(runs / f"{name}_{plan}"), losses(runs / f"ref_{name}"),
                f"{name} {plan}")

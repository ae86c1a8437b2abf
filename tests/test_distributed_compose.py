"""A spec's own modules under tensor parallelism (gloo on CPU, 2 ranks): the derived
"column in, row out" layout of specs/composed_debug.forge trains as the single
process does (fp32, ≤ 1e-5), with its linear maps split as TP_PLAN says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ROOT
from dist_helpers import spawn, train_runs
from test_distributed import SETTINGS, argv, assert_same, losses, quiet_train
from test_distributed_tp import chunks

SPEC = str(ROOT / "specs" / "composed_debug.forge")
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # the ranks share the cores with this process
    work = tmp_path_factory.mktemp("dist_compose")
    quiet_train(SPEC, str(work / "ref"), steps=STEPS, **SETTINGS)
    spawn(train_runs, ([(argv(SPEC, work / "tp2", "tp2", steps=STEPS, ckpt_every=STEPS), {})],),
          2, work, timeout=240)
    return work


def test_composed_modules_under_tp2_equal_single_process(runs):
    assert_same(losses(runs / "tp2"), losses(runs / "ref"), "composed_debug tp2")
    # GeGLU (layer 0) and ReLU² (layer 1) modules: in-projections split by output
    # features, down_proj by input features
    assert chunks(runs / "tp2", "layers.0.mlp.gate_proj.weight", STEPS) == [
        ((0, 0), (128, 128)), ((128, 0), (128, 128))]
    assert chunks(runs / "tp2", "layers.1.mlp.up_proj.weight", STEPS) == [
        ((0, 0), (128, 128)), ((128, 0), (128, 128))]
    assert chunks(runs / "tp2", "layers.0.mlp.down_proj.weight", STEPS) == [
        ((0, 0), (128, 128)), ((0, 128), (128, 128))]
    # the block's own gate is a plain linear op: whole on both ranks
    assert chunks(runs / "tp2", "layers.0.gate.weight", STEPS) == [((0, 0), (128, 128))]

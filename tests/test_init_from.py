"""`forgec train --init-from SRC`: a run starts from another run's checkpoint
or a Hugging Face folder, weights only.

The proof that the weights arrived: the first logged loss of the fine-tune
(taken before its first update) equals the loss of the source model on the
same batch, within 1e-5, single process and under FSDP and pipeline plans
(gloo on 127.0.0.1, bounded in time). A source that does not fit the spec is
refused before training with the first mismatching parameter; --resume of a
run that has a checkpoint wins over --init-from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, THREADS
from dist_helpers import spawn, train_runs

from forgec.compiler.cli import main as forgec
from forgec.runtime.checkpoint import list_checkpoints
from forgec.runtime.hf import load_hf_checkpoint
from forgec.runtime.loop import count_targets, cross_entropy_sum, load_data, read_metrics
from forgec.runtime.package import import_package, run_package_dir
from forgec.runtime.train import Settings, train

DEBUG = str(ROOT / "specs" / "llama_debug.forge")
TIED = str(ROOT / "specs" / "qwen_debug.forge")
SETTINGS = {"batch_size": 8, "seq_len": 32, "lr": 3e-3}
TOL = 1e-5
HF_CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
# plans for the imported model (import-hf writes none)
HF_PLANS = """
plan fsdp2 for tiny {
  mesh(dp = 2)
  fsdp()
}

plan pp2 for tiny {
  mesh(pp = 2)
  pipeline(schedule = "1f1b", microbatches = 2)
}
"""


def quiet_train(*args, **kwargs) -> dict:
    with contextlib.redirect_stderr(io.StringIO()):
        return train(*args, progress=False, **kwargs)


def first_loss(run: Path) -> float:
    return read_metrics(str(run / "metrics.jsonl"))[0]["loss"]


def first_batch_loss(model: torch.nn.Module, run: Path) -> float:
    """The loss of `model` on the first batch of `run` (its settings, data and
    tokenizer), as the trainer computes it."""
    saved = json.loads((run / "run.json").read_text())["settings"]
    fields = {f.name for f in dataclasses.fields(Settings)}
    s = Settings(**{k: v for k, v in saved.items() if k in fields})
    batch = load_data(s, model.config.vocab_size).next_batch(s.batch_size)
    with torch.no_grad():
        logits = model(batch.inputs, doc_ids=batch.doc_ids)
    return float(cross_entropy_sum(logits, batch.targets) / count_targets(batch.targets))


def fresh_model(run: Path) -> torch.nn.Module:
    return import_package(run_package_dir(str(run))).Transformer()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    torch.set_num_threads(THREADS)
    root = tmp_path_factory.mktemp("init_from")
    quiet_train(DEBUG, str(root / "src"), steps=2, seed=0, **SETTINGS)
    return root


@pytest.fixture(scope="module")
def hf_src(work) -> tuple[Path, Path]:
    """A tiny random Llama with its own tokenizer (save_pretrained), and the
    spec import-hf writes for it, without a tokenizer of its own."""
    import transformers
    from tokenizer_helpers import make_hf_tokenizer

    folder = work / "hf"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
    model.save_pretrained(folder)
    make_hf_tokenizer(folder, vocab_size=300)
    spec = work / "specs" / "tiny.forge"
    spec.parent.mkdir()
    assert forgec(["import-hf", str(folder), "-o", str(spec)]) == 0
    shutil.rmtree(work / "specs" / "tiny.tokenizer")  # the run takes SRC's
    spec.write_text(spec.read_text() + HF_PLANS)
    return folder, spec


def source_loss(src: Path, run: Path) -> float:
    """The loss of run `src`'s latest weights on the first batch of `run`."""
    from forgec.runtime.checkpoint import load_checkpoint

    model = fresh_model(src)
    load_checkpoint(list_checkpoints(str(src))[-1][1], model)
    return first_batch_loss(model, run)


def test_a_fine_tune_starts_from_the_source_runs_weights(work):
    src = work / "src"
    out = work / "ft"
    quiet_train(DEBUG, str(out), steps=2, seed=1, init_from=str(src), **SETTINGS)
    want = source_loss(src, out)
    assert abs(first_loss(out) - want) <= TOL, (first_loss(out), want)
    # another seed's random weights give another loss: the weights are the source's
    assert abs(first_batch_loss(fresh_model(out), out) - want) > 1e-2
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["init_from"] == list_checkpoints(str(src))[-1][1]
    # a checkpoint folder names the same weights as its run
    out2 = work / "ft_ckpt"
    quiet_train(DEBUG, str(out2), steps=1, seed=1, init_from=list_checkpoints(str(src))[-1][1],
                **SETTINGS)
    assert first_loss(out2) == first_loss(out)


def test_a_fine_tune_starts_from_a_hugging_face_folder_and_takes_its_tokenizer(work, hf_src):
    folder, spec = hf_src
    out = work / "ft_hf"
    quiet_train(str(spec), str(out), steps=1, seed=1, init_from=str(folder), **SETTINGS)
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == \
        (folder / "tokenizer.json").read_bytes()
    model = load_hf_checkpoint(fresh_model(out), folder)
    assert abs(first_loss(out) - first_batch_loss(model, out)) <= TOL


def test_init_from_under_fsdp_and_pipeline_plans(work, hf_src):
    """One world-2 spawn: FSDP2 and a pipeline from a DCP checkpoint (loaded
    after sharding; also with ranks building on the meta device) and from the
    HF folder (loaded before sharding); the first loss is the single-process
    fine-tune's. The HF runs also prove the workers use SRC's tokenizer."""
    _, spec = hf_src
    src, hf = work / "src", work / "hf"
    single = work / "single_dcp"
    quiet_train(DEBUG, str(single), steps=1, seed=1, init_from=str(src), **SETTINGS)
    single_hf = work / "single_hf"
    quiet_train(str(spec), str(single_hf), steps=1, seed=1, init_from=str(hf), **SETTINGS)

    def argv(spec_path, out, plan, source):
        return [str(spec_path), "--out", str(out), "--plan", plan, "--steps", "1", "--seed", "1",
                "--init-from", str(source), "--no-progress", "--batch-size", "8",
                "--seq-len", "32", "--lr", "3e-3"]

    runs = [(argv(DEBUG, work / "fsdp2_dcp", "fsdp2", src), {}),
            (argv(DEBUG, work / "pp2_dcp", "pp2", src), {}),
            (argv(DEBUG, work / "fsdp2_dcp_meta", "fsdp2", src),
             {"FORGEC_HOST_INIT_MAX_PARAMS": "0"}),
            (argv(spec, work / "fsdp2_hf", "fsdp2", hf), {"FORGEC_HOST_INIT_MAX_PARAMS": "0"}),
            (argv(spec, work / "pp2_hf", "pp2", hf), {})]
    spawn(train_runs, (runs,), 2, work, timeout=300)
    for name, ref in (("fsdp2_dcp", single), ("pp2_dcp", single), ("fsdp2_dcp_meta", single),
                      ("fsdp2_hf", single_hf), ("pp2_hf", single_hf)):
        assert abs(first_loss(work / name) - first_loss(ref)) <= TOL, name
    for name in ("fsdp2_hf", "pp2_hf"):
        assert (work / name / "tokenizer" / "tokenizer.json").read_bytes() == \
            (hf / "tokenizer.json").read_bytes()


def test_a_source_that_does_not_fit_is_refused_before_training(work, capsys):
    out = work / "mismatch"
    for extra in ([], ["--plan", "pp2"]):  # the launcher refuses it before torchrun
        code = forgec(["train", TIED, "--out", str(out), "--init-from", str(work / "src"),
                       "--no-progress", *extra])
        err = capsys.readouterr().err
        assert code == 1
        assert err.splitlines() == [
            f"forgec: error: --init-from {work / 'src'} does not fit {TIED}: parameter "
            "token_embedding.embedding.weight has shape [256, 128] in SRC but [256, 96] in the "
            "spec's model; initialise from a checkpoint of the spec's architecture, or make the "
            "spec match SRC (`forgec import-hf SRC -o NAME.forge` writes the spec of a Hugging "
            "Face checkpoint)"]
        assert not list_checkpoints(str(out)) and not (out / "metrics.jsonl").exists()


def test_a_hf_source_missing_a_parameter_names_it(work, hf_src, tmp_path, capsys):
    folder, spec = hf_src
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "hf"
    shutil.copytree(folder, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    code = forgec(["train", str(spec), "--out", str(tmp_path / "run"), "--init-from",
                   str(broken), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"forgec: error: --init-from {broken} does not fit {spec}: SRC has no "
                          "parameter layers.1.mlp.up_proj.weight (shape [96, 64] in the spec's "
                          "model)")


@pytest.mark.parametrize("src, message", [
    ("nowhere", "--init-from nowhere: no such file or folder"),
    (".", "--init-from .: not a Hugging Face checkpoint folder (config.json and "
          "model.safetensors), a forgec run folder or one of its checkpoints/step_N folders"),
])
def test_a_bad_source_is_a_usage_error(tmp_path, capsys, src, message):
    code = forgec(["train", DEBUG, "--out", str(tmp_path / "run"), "--init-from", src])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"forgec: error: {message}"


def test_resume_wins_over_init_from_when_a_checkpoint_exists(work):
    """The one command line of a preemptible fine-tune: the first start
    initialises from SRC, every restart continues the run's own checkpoint."""
    src = work / "src"
    out = work / "preemptible"
    quiet_train(DEBUG, str(out), resume=True, steps=1, seed=1, init_from=str(src), **SETTINGS)
    assert abs(first_loss(out) - source_loss(src, out)) <= TOL  # a fresh start from SRC
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train(DEBUG, str(out), resume=True, steps=2, init_from=str(src), progress=False,
              **SETTINGS)
    assert "resuming from the run's latest checkpoint: --init-from applies only to a fresh " \
        "start" in err.getvalue()
    assert "steps 2..2" in err.getvalue()
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2]

"""torch.compile on the generated models: every block of every committed spec is
traced as one graph (fullgraph=True, no graph break), and what the compiled blocks
compute equals the eager model."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import SPECS
from torch import nn

BIG = ("llama3_8b", "llama3_70b", "mixtral_8x7b", "deepseek_v3",
       "gpt_oss_120b", "jamba")  # traced on the meta device
SMALL = sorted(p.stem for p in SPECS if p.stem not in BIG)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def load(name: str):
    return importlib.import_module(f"generated.{name}.model")


def build(name: str, seed: int = 0) -> nn.Module:
    mod = load(name)
    torch.manual_seed(seed)
    return mod.VLM() if hasattr(mod, "VLM") else mod.Transformer()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (text, cross-attention and vision layers), what a
    torchtitan-style per-block compile wraps."""
    return [block for fqn, m in model.named_modules()
            if isinstance(m, nn.ModuleDict) and fqn.split(".")[-1].endswith("layers")
            for block in m.values()]


def loss_of(name: str, model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name.startswith("vlm"):
        pixels = torch.randn(2, 3, 32, 32, generator=g)
        tokens = torch.randint(0, 256, (2, 12), generator=g)
        logits = model(pixels, tokens)
        logits = logits[:, -tokens.shape[1]:]
    else:
        tokens = torch.randint(0, 256, (2, 12), generator=g)
        logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           tokens[:, 1:].reshape(-1))


def loss_and_grads(name: str, model: nn.Module):
    model.zero_grad(set_to_none=True)
    loss = loss_of(name, model)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(name: str, compiled: nn.Module, eager: nn.Module, tol: float):
    want_loss, want = loss_and_grads(name, eager)
    got_loss, got = loss_and_grads(name, compiled)
    torch.testing.assert_close(got_loss, want_loss, rtol=tol, atol=tol)
    assert list(got) == list(want)
    for fqn in want:
        torch.testing.assert_close(got[fqn], want[fqn], rtol=tol, atol=tol, msg=fqn)


@pytest.mark.parametrize("name", SMALL)
def test_every_block_compiles_as_one_graph_forward_and_backward(name):
    """aot_eager traces forward and backward with fullgraph=True (a graph break
    raises) and runs them as traced: the same loss and gradients as eager."""
    eager = build(name).train()
    compiled = build(name).train()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    for block in blocks(compiled):
        block.compile(fullgraph=True, backend=backend)
    assert_same_training_step(name, compiled, eager, tol=1e-5)
    assert graphs  # the blocks did go through the backend


def logits_of(name: str, model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (2, 8), generator=g)
    with torch.no_grad():
        if name.startswith("vlm"):
            return model(torch.randn(2, 3, 32, 32, generator=g), tokens)
        return model(tokens)


@pytest.mark.parametrize("name", ["moe_debug", "vlm"])
def test_inductor_blocks_compute_the_eager_logits(name):
    """The inductor path (what `forgec train --compile` runs; the dense model's
    forward and backward are checked there): a MoE model with its grouped-matmul
    custom op, and a VLM with its vision encoder, in inference."""
    model = build(name).eval()
    want = logits_of(name, model)
    for block in blocks(model):
        block.compile(fullgraph=True)
    torch.testing.assert_close(logits_of(name, model), want, rtol=1e-5, atol=1e-5)


class Traced(Exception):
    pass


def trace_only(gm, example_inputs):
    """A backend that stops once Dynamo has captured the whole block."""
    def run(*args):
        raise Traced(len(list(gm.graph.nodes)))
    return run


@pytest.mark.parametrize("name", BIG)
def test_big_specs_blocks_trace_as_one_graph_on_the_meta_device(name):
    mod = load(name)
    config = mod.ModelConfig()
    with torch.device("meta"):
        kinds = {}
        for i in range(config.n_layers):  # one block of each class
            block = mod.TransformerBlock(config, i)
            kinds.setdefault(type(block), block)
        cos = sin = None  # a model without positions (Jamba) has no RoPE tables
        if hasattr(mod, "rope_tables"):
            cos, sin = (t[None] for t in mod.rope_tables(8, "meta", config))
        x = torch.randn(2, 8, config.dim)
    for block in kinds.values():
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, backend=trace_only)
        with pytest.raises(Traced):
            compiled(x, cos, sin)


# ---- forgec train --compile ---------------------------------------------------------------


def _losses(run) -> list[float]:
    from forgec.runtime.train import read_metrics

    return [r["loss"] for r in read_metrics(str(run / "metrics.jsonl"))]


def _quiet_train(*args, **kwargs):
    import contextlib
    import io

    from forgec.runtime.train import train

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return train(*args, progress=False, **kwargs)


COMPILE_RUN = dict(steps=2, seed=0, batch_size=4, seq_len=16)


def test_train_compile_equals_eager_with_inductor(tmp_path):
    """The single-process trainer compiles each block with inductor (forward and
    backward): the losses of eager training within float tolerance."""
    from conftest import ROOT

    spec = str(ROOT / "specs" / "llama_debug.forge")
    _quiet_train(spec, str(tmp_path / "eager"), **COMPILE_RUN)
    _quiet_train(spec, str(tmp_path / "compiled"), compile=True, **COMPILE_RUN)
    torch.testing.assert_close(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"),
                               rtol=1e-5, atol=1e-5)


def test_train_compile_under_plans_equals_eager(tmp_path):
    """--compile under FSDP, a pipeline, TP and EP (2 ranks; the aot_eager backend
    traces the same graphs as inductor at a fraction of the compile time): the
    single-process eager losses."""
    from conftest import ROOT
    from dist_helpers import spawn, train_runs

    dense, moe = str(ROOT / "specs" / "llama_debug.forge"), str(ROOT / "specs" / "moe_debug.forge")
    _quiet_train(dense, str(tmp_path / "ref"), **COMPILE_RUN)
    _quiet_train(moe, str(tmp_path / "ref_moe"), grad_accum=2, **COMPILE_RUN)

    def argv(spec, plan):
        return ([spec, "--out", str(tmp_path / plan), "--plan", plan, "--no-progress", "--compile"]
                + [f"--{k.replace('_', '-')}={v}" for k, v in COMPILE_RUN.items()])

    env = {"FORGEC_COMPILE_BACKEND": "aot_eager"}
    runs = [(argv(dense, plan), env) for plan in ("fsdp2", "pp2", "tp2")] + [(argv(moe, "ep2"), env)]
    spawn(train_runs, (runs,), 2, str(tmp_path), timeout=400)
    for plan in ("fsdp2", "pp2", "tp2", "ep2"):
        want = _losses(tmp_path / ("ref_moe" if plan == "ep2" else "ref"))
        torch.testing.assert_close(_losses(tmp_path / plan), want, rtol=1e-5, atol=1e-5,
                                   msg=plan)

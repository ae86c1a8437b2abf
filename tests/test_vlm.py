"""Vision-language models: compile-time invariants, the four fusions, generation paths."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from conftest import ROOT

from forgec.compiler.cost import vlm_cost
from forgec.compiler.driver import compile_spec

ARCHS = ("vlm", "vlm_xattn", "vlm_mot", "vlm_moma", "vlm_rope2d")
VLM_SPEC = (ROOT / "specs" / "vlm.forge").read_text()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def build(name: str, seed: int = 0):
    mod = importlib.import_module(f"generated.{name}.model")
    torch.manual_seed(seed)
    return mod, mod.VLM()


def inputs(batch=2, text=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 256, (batch, text),
                                                                      generator=g)


@pytest.mark.parametrize("name", ARCHS)
def test_compiler_counts_every_parameter_the_package_has(name):
    comp = compile_spec(f"specs/{name}.forge")
    c = vlm_cost(comp, comp.vlms[name])
    _, model = build(name)
    assert c.params_total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ARCHS)
def test_the_vlm_graph_names_every_parameter_of_the_package_with_its_shape(name):
    graph = compile_spec(f"specs/{name}.forge").vlm_graphs[name]
    weights = {}
    for _, data in graph.nodes(data=True):
        assert not set(weights) & set(data.get("weights", {}))  # each parameter on one node
        weights.update(data.get("weights", {}))
    _, model = build(name)
    assert weights == {k: tuple(p.shape) for k, p in model.named_parameters()}


@pytest.mark.parametrize("name, tokens", [("vlm", 64), ("vlm_xattn", 16), ("vlm_mot", 16),
                                          ("vlm_moma", 64), ("vlm_rope2d", 65)])
def test_image_tokens_follow_the_adapter(name, tokens):
    mod, model = build(name)
    assert mod.IMAGE_TOKENS == tokens
    image, mask = model.encode_images(inputs()[0])
    assert image.shape == (2, tokens, 128) and mask is None


def test_rope2d_turns_half_the_pairs_with_rows_and_half_with_columns():
    mod, model = build("vlm_rope2d")
    cos, sin = mod.vision_rope_tables()
    assert cos.shape == (65, 16)  # 8×8 patches + CLS, head_dim 16
    assert torch.equal(cos[0], torch.ones(16)) and torch.equal(sin[0], torch.zeros(16))
    angle = torch.atan2(sin[1:, :8], cos[1:, :8])  # the 8 rotary pairs (half-split layout)
    inv_freq = 1.0 / (100.0 ** (torch.arange(4).float() / 4))
    rows, cols = torch.arange(8).repeat_interleave(8), torch.arange(8).repeat(8)
    expected = torch.cat([torch.outer(rows.float(), inv_freq), torch.outer(cols.float(), inv_freq)], 1)
    torch.testing.assert_close(torch.remainder(angle - expected + math.pi, 2 * math.pi) - math.pi,
                               torch.zeros_like(angle), rtol=0, atol=1e-5)
    assert model.vision_encoder.rope_cos.shape == (65, 16)


def test_rope_kinds_are_checked(forge):
    text = (ROOT / "specs" / "vlm_rope2d.forge").read_text()
    extra = {"llama_debug.forge": (ROOT / "specs" / "llama_debug.forge").read_text()}
    comp, diags = forge(text.replace("head_dim = dim / n_heads, grid", "head_dim = 18, grid")
                        .replace("dim        = 64", "dim        = 72"), extra=extra)
    assert [d.code for d in diags.errors] == ["E072"]
    llama = extra["llama_debug.forge"].replace(
        "rope            = rope(head_dim = dim / n_heads, max_seq_len = max_seq_len, theta = 10000.0)",
        "rope            = rope2d(head_dim = dim / n_heads, grid = 4)")
    comp, diags = forge(llama)
    assert [(d.code, d.span.line) for d in diags.errors] == [("E078", 18)]


@pytest.mark.parametrize("name", ARCHS)
def test_logits_align_with_the_text_and_every_parameter_learns(name):
    mod, model = build(name)
    pixels, tokens = inputs()
    logits = model(pixels, tokens)
    assert logits.shape == (2, 20, 256)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256),
                                      tokens[:, 1:].reshape(-1)).backward()
    if name == "vlm_xattn":  # zero output projections: the rest gets gradient once they move
        assert all(b.attention.o_proj.weight.grad.abs().sum() > 0
                   and b.mlp.down_proj.weight.grad.abs().sum() > 0
                   for b in model.transformer.cross_attention_layers.values())
    else:
        assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", ["vlm", "vlm_xattn", "vlm_mot"])
def test_image_prefill_then_cached_decode_equals_the_full_forward(name):
    mod, model = build(name)
    pixels, tokens = inputs()
    with torch.no_grad():
        full = model(pixels, tokens)
        caches = model.make_kv_caches(2, 100)
        logits, context = model.prefill(pixels, tokens[:, :9], caches)
        steps = [logits] + [model.decode(tokens[:, t : t + 1], caches, context)
                            for t in range(9, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5)


def test_moma_is_training_only_and_not_causal():
    mod, model = build("vlm_moma")
    assert not hasattr(model, "make_kv_caches") and not hasattr(model, "prefill")
    with pytest.raises(ValueError, match=r"^llama_debug is training-only \(its moma fusion is "
                       r"not causal\): it cannot decode with kv_caches$"):
        model.transformer(torch.zeros(1, 4, dtype=torch.long), kv_caches=[])
    # the collectors of the VLM name its decoder's layers under `transformer.`
    assert model.get_dropped_tokens() == {
        f"transformer.{k}": v for k, v in model.transformer.get_dropped_tokens().items()}
    comp = compile_spec("specs/vlm_moma.forge")
    c = vlm_cost(comp, comp.vlms["vlm_moma"])
    assert not c.supports_kv_cache and c.non_causal == ["fusion moma (vlm_moma)"]
    # expert choice looks at the whole batch: a later token changes an earlier output
    pixels, tokens = inputs(batch=1)
    other = tokens.clone()
    other[0, -1] = (other[0, -1] + 1) % 256
    with torch.no_grad():
        a, b = model(pixels, tokens), model(pixels, other)
    assert not torch.allclose(a[0, :10], b[0, :10])


def test_causal_architectures_keep_earlier_logits_when_later_text_changes():
    for name in ("vlm", "vlm_xattn", "vlm_mot"):
        _, model = build(name)
        pixels, tokens = inputs(batch=1)
        other = tokens.clone()
        other[0, -1] = (other[0, -1] + 1) % 256
        with torch.no_grad():
            a, b = model(pixels, tokens), model(pixels, other)
        torch.testing.assert_close(a[0, :-1], b[0, :-1], rtol=0, atol=0)


def test_cross_attention_starts_as_the_identity():
    mod, model = build("vlm_xattn")
    pixels, tokens = inputs()
    blank = mod.ModalityContext(image_features=torch.zeros(2, 16, 128))
    with torch.no_grad():
        torch.testing.assert_close(model(pixels, tokens), model.transformer(tokens, modality=blank),
                                   rtol=0, atol=0)
        for block in model.transformer.cross_attention_layers.values():
            torch.nn.init.normal_(block.attention.o_proj.weight, std=0.02)  # as after training
        assert not torch.allclose(model(pixels, tokens), model.transformer(tokens, modality=blank))
    assert mod.XATTN_AFTER == {1: 0, 3: 1}  # after every second layer


def test_mot_routes_by_modality_ids_not_by_position():
    mod, model = build("vlm_mot")
    pixels, tokens = inputs(batch=1)
    image, _ = model.encode_images(pixels)
    ids = model.modality_ids(1, 16, 20, tokens.device)
    ctx = mod.ModalityContext(prefix_embeds=image, modality_ids=ids)
    with torch.no_grad():
        base = model.transformer(tokens, modality=ctx)
        text = mod.MODALITIES.index("text")
        flipped = torch.full_like(ids, text)  # call the image tokens text: other weights
        other = model.transformer(tokens, modality=mod.ModalityContext(
            prefix_embeds=image, modality_ids=flipped))
    assert not torch.allclose(base[:, :16], other[:, :16])
    sd = model.state_dict()
    assert "transformer.layers.0.attention.image.q_proj.weight" in sd
    assert "transformer.layers.0.mlp.text.gate_proj.weight" in sd


def test_video_frames_and_a_frame_mask():
    mod, model = build("vlm_xattn")
    video = torch.randn(2, 3, 3, 32, 32)
    frames = torch.tensor([[1, 1, 0], [1, 0, 0]])
    image, mask = model.encode_images(video, frames)
    assert image.shape == (2, 48, 128) and mask.shape == (2, 48)
    assert mask[0].sum() == 32 and mask[1].sum() == 16
    tokens = inputs()[1]
    with torch.no_grad():
        # a masked frame does not matter: replacing it changes nothing
        a = model(video, tokens, frame_mask=frames)
        video2 = video.clone()
        video2[1, 1:] = torch.randn(2, 3, 32, 32)
        for block in model.transformer.cross_attention_layers.values():
            torch.nn.init.normal_(block.attention.o_proj.weight, std=0.02)  # the image counts
        a = model(video, tokens, frame_mask=frames)
        c = model(video2[:, :1].expand_as(video2), tokens, frame_mask=frames)
        assert not torch.allclose(a, c)  # an unmasked frame does matter
        b = model(video2, tokens, frame_mask=frames)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name, kwargs, message", [
    ("vlm", {"prefix_embeds": torch.zeros(1, 64, 128), "inputs_embeds": torch.zeros(1, 3, 128)},
     "at most one residual route"),
    ("vlm_xattn", {"image_mask": torch.ones(1, 16, dtype=torch.bool)},
     "image_mask needs modality.image_features"),
    ("vlm", {"output_slice": slice(1, None)}, "kv_caches forbids modality.output_slice"),
])
def test_modality_context_invariants_have_exact_messages(name, kwargs, message):
    mod, model = build(name)
    tokens = torch.zeros(1, 3, dtype=torch.long) if "inputs_embeds" not in kwargs else None
    caches = model.make_kv_caches(1, 80) if "output_slice" in kwargs else None
    with pytest.raises(ValueError, match=message):
        model.transformer(tokens, modality=mod.ModalityContext(**kwargs), kv_caches=caches)


def test_cross_attention_without_images_is_refused():
    _, model = build("vlm_xattn")
    with pytest.raises(ValueError, match="need modality.image_features"):
        model.transformer(torch.zeros(1, 3, dtype=torch.long))


VLM_BLOCK = VLM_SPEC[VLM_SPEC.index("vlm vlm {"):]
BASE = VLM_SPEC[: VLM_SPEC.index("vlm vlm {")]


def vlm_errors(forge, adapter="mlp2(vit_tiny.dim, llama_debug.dim)",
               fusion="joint_decoder(max_text = 128)", extra=""):
    text = BASE + ("vlm v {\n  text = llama_debug\n  vision = vit_tiny\n"
                   f"  adapter = {adapter}\n  fusion = {fusion}\n{extra}}}\n")
    comp, diags = forge(text, extra={"llama_debug.forge":
                                     (ROOT / "specs" / "llama_debug.forge").read_text()})
    line0 = BASE.count("\n") + 1
    return [(d.code, d.span.line - line0, d.span.col) for d in diags.errors]


@pytest.mark.parametrize("kwargs, expected", [
    ({"fusion": "joint_decoder(max_text = 200)"}, [("E132", 4, 26)]),   # 64 + 200 > 256
    ({"adapter": "mlp2(64, llama_debug.dim)"}, [("E131", 3, 18)]),
    ({"adapter": "mlp2(vit_tiny.dim, 64)"}, [("E131", 3, 32)]),
    ({"adapter": "avgpool(vit_tiny.dim, llama_debug.dim, window = 3)"}, [("E134", 3, 52)]),
    ({"fusion": "cross_attention(every = 2, heads = 5)"}, [("E133", 4, 39)]),
    ({"fusion": 'mot(modalities = ["image", "audio"], max_text = 64)'}, [("E136", 4, 16)]),
    ({"fusion": 'mot(modalities = ["image", "text", "image"], max_text = 64)'},
     [("E136", 4, 16)]),
    ({"fusion": "attention(128, heads = 4)"}, [("E130", 4, 12)]),
    ({"extra": "  colour = 1\n"}, [("E130", 5, 3)]),
])
def test_vlm_invariants_are_proven_at_compile_time(forge, kwargs, expected):
    assert vlm_errors(forge, **kwargs) == expected


def test_patch_must_tile_the_image(forge):
    text = VLM_SPEC.replace("image_size = 32", "image_size = 30")
    comp, diags = forge(text, extra={"llama_debug.forge":
                                     (ROOT / "specs" / "llama_debug.forge").read_text()})
    assert "E137" in [d.code for d in diags.errors]

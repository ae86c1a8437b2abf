"""Vision-language models: `vlm NAME { text = ..., vision = ..., adapter = ..., fusion = ... }`.

Binds a vlm section against its text model and vision encoder (both bound as
models, see compiler/bind.py), and proves at compile time what the spec
decides: the adapter maps the encoder's width to the decoder's, a pooling
window divides the patch grid, image and text tokens fit the decoder's
sequence, cross-attention heads divide the width (E130–E139).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import ast
from .bind import Component, Model
from .diagnostics import Diagnostics, Span, did_you_mean
from .ops import OPS, numel, ops_for, patch_tokens

FIELDS = ("text", "vision", "adapter", "fusion")
ADAPTERS = ("linear", "mlp2", "avgpool", "attention_pool")


@dataclass
class VLM:
    name: str
    file: str
    span: Span
    name_span: Span
    text: str
    vision: str
    adapter: Component
    fusion: Component
    image_tokens: int  # per image, after the adapter

    @property
    def architecture(self) -> str:
        return self.fusion.op.name


def section_refs(sec) -> dict[str, tuple[str, Span]]:
    """`text = MODEL` / `vision = ENCODER` of a vlm section, as written."""
    out = {}
    for key in ("text", "vision"):
        decl = sec.decls.get(key)
        if isinstance(decl, ast.Assign) and isinstance(decl.value, ast.Ref) \
                and len(decl.value.parts) == 1:
            out[key] = (decl.value.parts[0], decl.value.span)
    return out


def bind_vlm(sec, binder, models: dict[str, Model], diags: Diagnostics) -> VLM | None:
    program = binder.program
    for name, decl in sec.decls.items():
        if name not in FIELDS:
            diags.error("E130", f"a vlm section has {', '.join(FIELDS)}; not '{name}'",
                        decl.name_span, hint=did_you_mean(name, FIELDS))
    for call in sec.calls:
        diags.error("E130", "a vlm section holds assignments, not calls", call.span)
    for key in FIELDS:
        if key not in sec.decls:
            diags.error("E130", f"vlm '{sec.name}' has no '{key}'", sec.name_span)
    refs = section_refs(sec)
    ok = True
    for key, kind in (("text", "model"), ("vision", "vision")):
        decl = sec.decls.get(key)
        if decl is None:
            ok = False
            continue
        if key not in refs:
            diags.error("E130", f"'{key}' names a {kind} section", decl.value.span)
            ok = False
            continue
        target, span = refs[key]
        other = program.sections.get(target)
        if other is None or other.kind != kind:
            diags.error("E021", f"unknown {kind} '{target}'", span,
                        hint=did_you_mean(target, [n for n, s in program.sections.items()
                                                   if s.kind == kind]))
            ok = False
    scope = binder.section_scope(sec.name)
    comps: dict[str, Component] = {}
    for key, role, choices in (("adapter", "adapter", ADAPTERS), ("fusion", "fusion", None)):
        decl = sec.decls.get(key)
        if decl is None:
            continue
        value = decl.value
        op = OPS.get(value.func.dotted) if isinstance(value, ast.Call) else None
        allowed = choices or tuple(n for n, o in OPS.items() if o.role == role)
        if op is None or op.name not in allowed:
            diags.error("E130", f"'{key}' is one of {', '.join(f'{c}(...)' for c in allowed)}",
                        value.span,
                        hint=did_you_mean(value.func.dotted, allowed)
                        if isinstance(value, ast.Call) else None)
            ok = False
            continue
        comp = binder.component(key, decl.name_span, value, scope)
        if not comp.ok:
            ok = False
            continue
        # the checks below divide by these (no model's positive_sizes pass sees them)
        bad = [a for a in comp.op.sizes if isinstance(comp.args.get(a), int) and comp.args[a] <= 0]
        for a in bad:
            diags.error("E073", f"'{a}' of {comp.op.name} must be positive, got {comp.args[a]}",
                        comp.arg_spans.get(a, comp.span))
        if bad:
            ok = False
            continue
        comps[key] = comp
    if not ok or len(comps) < 2:
        return None
    text, vision = models.get(refs["text"][0]), models.get(refs["vision"][0])
    if text is None or vision is None:
        return None
    fusion = comps["fusion"]
    # the fusion's weights and checks need the decoder's geometry
    fusion.args.setdefault("dim", text.components["token_embedding"].args["dim"])
    fusion.args.setdefault("n_layers", len(text.layers))
    if fusion.op.name == "cross_attention" and fusion.args.get("hidden") is None:
        fusion.args["hidden"] = 4 * fusion.args["dim"]
    return VLM(sec.name, sec.file, sec.span, sec.name_span, refs["text"][0], refs["vision"][0],
               comps["adapter"], fusion, image_tokens=0)


def validate(vlm: VLM, models: dict[str, Model], diags: Diagnostics) -> None:
    text, vision = models[vlm.text], models[vlm.vision]
    adapter, fusion = vlm.adapter, vlm.fusion
    a, spans = adapter.args, adapter.arg_spans
    vdim = vision.components["norm"].args["dim"]
    tdim = text.components["token_embedding"].args["dim"]
    if a["in_dim"] != vdim:
        diags.error("E131", f"the adapter takes width {a['in_dim']} but '{vision.name}' "
                    f"produces {vdim}", spans.get("in_dim", adapter.span),
                    hint=f"use {vision.name}.dim")
    if a["out_dim"] != tdim:
        diags.error("E131", f"the adapter gives width {a['out_dim']} but '{text.name}' "
                    f"takes {tdim}", spans.get("out_dim", adapter.span),
                    hint=f"use {text.name}.dim")
    patch = vision.components["patch_embedding"].args
    grid = patch["image_size"] // patch["patch"]
    tokens = patch_tokens(patch)
    if adapter.op.name in ("avgpool", "attention_pool"):
        window = a["window"]
        if patch["cls_token"]:
            diags.error("E134", "pooling adapters need the patch grid alone; the encoder adds "
                        "a CLS token", spans.get("window", adapter.span))
        elif grid % window:
            diags.error("E134", f"pooling window {window} does not divide the {grid}×{grid} "
                        "patch grid", spans.get("window", adapter.span))
        else:
            tokens = (grid // window) ** 2
    vlm.image_tokens = tokens
    f, fspans = fusion.args, fusion.arg_spans
    if fusion.op.name == "joint_decoder":
        max_seq = text.params.get("max_seq_len")
        rope = next((c for c in text.all_components() if c.op.name == "rope"), None)
        limit = rope.args["max_seq_len"] if rope is not None else max_seq
        if limit is not None and tokens + f["max_text"] > limit:
            diags.error("E132", f"{tokens} image tokens + max_text {f['max_text']} exceed the "
                        f"decoder's max_seq_len {limit}", fspans.get("max_text", fusion.span),
                        hint=f"max_text ≤ {limit - tokens}")
    if fusion.op.name in ("mot", "moma"):
        names = f["modalities"]
        bad = [m for m in names if not m.isidentifier()]
        span = fspans.get("modalities", fusion.span)
        if bad:
            diags.error("E136", f"modality name {bad[0]!r} is not an identifier", span)
        elif len(set(names)) != len(names) or len(names) < 2:
            diags.error("E136", "modalities are two or more distinct names", span)
        elif not {"image", "text"} <= set(names):
            missing = sorted({"image", "text"} - set(names))
            diags.error("E136", f"the modalities must name this vlm's inputs: "
                        f"{', '.join(repr(m) for m in missing)} missing", span,
                        hint='image tokens come from the vision encoder, text from the tokens: '
                        '["image", "text"]')
    if fusion.op.name in ("mot", "moma"):
        max_seq = text.params.get("max_seq_len")
        rope = next((c for c in text.all_components() if c.op.name == "rope"), None)
        limit = rope.args["max_seq_len"] if rope is not None else max_seq
        if limit is not None and tokens + f["max_text"] > limit:
            diags.error("E132", f"{tokens} image tokens + max_text {f['max_text']} exceed the "
                        f"decoder's max_seq_len {limit}", fspans.get("max_text", fusion.span),
                        hint=f"max_text ≤ {limit - tokens}")
    elif fusion.op.name == "cross_attention":
        if f["dim"] % f["heads"]:
            diags.error("E133", f"cross-attention heads {f['heads']} do not divide the text "
                        f"width {f['dim']}", fspans.get("heads", fusion.span))
        if f["every"] > f["n_layers"]:
            diags.error("E133", f"a block every {f['every']} layers never fires in "
                        f"{f['n_layers']} layers", fspans.get("every", fusion.span))


MLP_OPS = ops_for("mlp")  # a block's feed-forward, which MoMa replaces


def fusion_params(vlm: VLM, text: Model) -> tuple[int, int]:
    """Parameters the fusion adds to the text model's own: (total, active per token)."""
    f = vlm.fusion
    if f.op.name == "cross_attention":
        n = sum(numel(s) for s in f.op.weights(f.args).values())
        return n, n
    if f.op.name not in ("mot", "moma"):
        return 0, 0
    block_total = block_active = mlp_total = mlp_active = 0
    for slot in text.layers:
        for comp in text.blocks[slot.block].components.values():
            weights = sum(numel(s) for s in comp.op.weights(comp.args).values())
            active = comp.op.active_params(comp.args) if comp.op.active_params else weights
            block_total, block_active = block_total + weights, block_active + active
            if comp.op.name in MLP_OPS:
                mlp_total, mlp_active = mlp_total + weights, mlp_active + active
    modalities = len(f.args["modalities"])
    if f.op.name == "mot":  # a copy per modality; a token uses one
        return (modalities - 1) * block_total, 0
    per_layer = sum(numel(s) for s in f.op.weights(f.args).values())
    layers = sum(1 for slot in text.layers
                 if any(c.op.name in MLP_OPS for c in text.blocks[slot.block].components.values()))
    expert = 3 * f.args["dim"] * f.args["hidden"]
    active = layers * (f.args["dim"] * f.args["experts"]
                       + f.args["capacity"] * f.args["experts"] * expert)
    return layers * per_layer - mlp_total, int(active) - mlp_active

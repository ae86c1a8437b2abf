"""Vision-language models: `vlm NAME { text = ..., vision = ..., adapter = ..., fusion = ... }`.

Binds a vlm section against its text model and vision encoder (both bound as
models, see compiler/bind.py): its adapter and fusion components, the
decoder's geometry the fusion needs, and the image tokens per image (E130).
Lowering (compiler/lower.py, `lower_vlm`) joins the three into one graph; the
invariants of that graph (the adapter maps the encoder's width to the
decoder's, a pooling window divides the patch grid, image and text tokens fit
the decoder's sequence, cross-attention heads divide the width, E131–E136)
are passes over it (compiler/checks/modality.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import ast
from .bind import Component, Model
from .diagnostics import Diagnostics, Span, did_you_mean
from .ops import OPS, numel, ops_for, patch_tokens

FIELDS = ("text", "vision", "adapter", "fusion")
# the decoder's geometry a fusion's arguments receive (each the ModelConfig field of its name)
DECODER_ARGS = ("dim", "n_layers")
ADAPTERS = ops_for("adapter")  # the ops that may map the encoder's width to the decoder's


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
        # image_tokens() and the modality pass divide by these (no model's positive_sizes
        # pass sees them)
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
    patch = vision.components.get("patch_embedding")
    tokens = (image_tokens(comps["adapter"], patch.args)
              if patch is not None and patch.ok and patch.args["patch"] > 0 else 0)
    # the fusion's weights and checks need the decoder's geometry
    geometry = {"dim": text.components["token_embedding"].args["dim"], "n_layers": len(text.layers)}
    for arg in DECODER_ARGS:
        fusion.args.setdefault(arg, geometry[arg])
    fusion.op.derive(fusion.args)  # the defaults that depend on them
    return VLM(sec.name, sec.file, sec.span, sec.name_span, refs["text"][0], refs["vision"][0],
               comps["adapter"], fusion, image_tokens=tokens)


def image_tokens(adapter: Component, patch: dict) -> int:
    """Tokens per image after the adapter: the encoder's patch tokens, pooled by the
    adapter's window where the window tiles the patch grid (where it does not, the
    modality pass reports E134, and the tokens stay unpooled)."""
    tokens = patch_tokens(patch)
    if adapter.op.pool_window and not patch["cls_token"]:
        grid = patch["image_size"] // patch["patch"]
        window = adapter.args[adapter.op.pool_window]
        if grid % window == 0:
            tokens = (grid // window) ** 2
    return tokens


def fusion_params(vlm: VLM, text: Model) -> tuple[int, int]:
    """Parameters the fusion adds to the text model's own: (total, active per token)."""
    layers = []
    for slot in text.layers:
        comps = []
        for comp in text.blocks[slot.block].components.values():
            weights = sum(numel(s) for s in comp.op.weights(comp.args).values())
            active = comp.op.active_params(comp.args) if comp.op.active_params else weights
            comps.append((weights, active, comp.op.slots))
        layers.append(comps)
    return vlm.fusion.op.fusion.params(vlm.fusion.args, layers)

"""E059: names that become Python identifiers in generated code are safe there.

Component names become attributes of `nn.Module`s, dataflow values and block
inputs become local variables of `forward`. None may be a Python keyword, shadow
what the generated module itself uses (torch, nn, F, ...), or replace an
`nn.Module` attribute (`forward`, `training`, ...); block names must give
distinct class names, and a module's class (`geglu_mlp` → `GegluMlp`) a name
the generated code does not define otherwise. Together with the grammar's ASCII identifiers and
escaped string literals, this is what keeps a spec from injecting code.
"""

from __future__ import annotations

import keyword

import networkx as nx

from ..compose import class_name
from ..diagnostics import Diagnostics
from ..ops import OPS

# Names the generated module and the forward signature use.
_MODULE_NAMES = {"torch", "nn", "F", "math", "dataclass", "annotations", "self", "super",
                 "rope_cos", "rope_sin", "kv_cache", "doc_ids", "attn_mask", "caches",
                 "config", "layer_idx", "b", "s", "start", "std", "out_std"}
# nn.Module's own attributes and methods (and the generated ones) a component must not replace.
_MODULE_ATTRS = {
    "forward", "training", "parameters", "buffers", "children", "modules", "train", "eval",
    "to", "to_empty", "cuda", "cpu", "type", "float", "double", "half", "bfloat16", "apply",
    "state_dict", "load_state_dict", "zero_grad", "register_buffer", "register_parameter",
    "register_module", "add_module", "named_parameters", "named_buffers", "named_children",
    "named_modules", "extra_repr", "requires_grad_", "share_memory", "get_parameter",
    "get_submodule", "get_buffer", "set_submodule", "init_weights", "layer_idx", "compile",
    "call_super_init", "dump_patches", "ipu", "xpu", "mtia",
}


def _bad(name: str) -> str | None:
    if keyword.iskeyword(name) or keyword.issoftkeyword(name) or name in ("None", "True", "False"):
        return "a Python keyword"
    if name.startswith("__"):
        return "a dunder name"
    if name in _MODULE_NAMES:
        return "used by the generated code"
    return None


# Classes every generated model.py defines, besides its blocks' and ops'.
_CLASSES = {"Transformer", "TransformerBlock", "ModelConfig", "ModalityContext", "KVCache"}


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    model = graph.graph["model"]
    classes: dict[str, str] = {}
    for block in [*model.blocks.values(), *model.modules.values()]:
        for name, comp in block.components.items():
            why = _bad(name) or ("an nn.Module attribute" if name in _MODULE_ATTRS else None)
            if why:
                diags.error("E059", f"component name '{name}' is {why}", comp.name_span,
                            hint="rename it")
        for name, _, span in block.flow:
            why = _bad(name)
            if why:
                diags.error("E059", f"value name '{name}' is {why}", span, hint="rename it")
        for name in block.inputs:
            why = _bad(name)
            if why:
                diags.error("E059", f"input name '{name}' is {why}", block.name_span,
                            hint="rename it")
        if block.name in model.modules:
            continue  # its class is checked below, with every block's known
        cls = "".join(p[:1].upper() + p[1:] for p in block.name.split("_") if p)
        if cls in classes:
            diags.error("E059", f"blocks '{classes[cls]}' and '{block.name}' would both "
                        f"become class {cls}Block", block.name_span, hint="rename one")
        classes[cls] = block.name
    taken = _CLASSES | {f"{c}Block" for c in classes} | {
        name for op in OPS.values() for name in op.definitions}
    for module in model.modules.values():
        cls = class_name(module.name)
        if cls in taken:
            diags.error("E059", f"module '{module.name}' would become class {cls}, which the "
                        "generated code defines already", module.name_span, hint="rename it")
        taken.add(cls)

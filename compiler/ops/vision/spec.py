"""Vision encoders' ops: patch embedding and the adapters to a decoder's width."""

from __future__ import annotations

from typing import Any

from ..core import Args, ArgSpec, OpDef, Shape, hidden


def _patch_grid(a: Args) -> int:
    return a["image_size"] // a["patch"] if a["patch"] > 0 else 0


def patch_tokens(a: Args) -> int:
    """Tokens a patch embedding produces: the patch grid, plus the CLS token."""
    return _patch_grid(a) ** 2 + (1 if a["cls_token"] else 0)


def _patch_weights(a: Args) -> dict[str, Shape]:
    dim, c, p = a["dim"], a["channels"], a["patch"]
    w: dict[str, Shape] = {"proj.weight": (dim, c, p, p), "proj.bias": (dim,)}
    if a["cls_token"]:
        w["cls_token"] = (1, 1, dim)
    if a["positions"] == "learned":
        w["pos_embedding"] = (1, patch_tokens(a), dim)
    return w


def _adapter_derive(a: dict[str, Any]) -> None:
    if "hidden" in a and a.get("hidden") is None:
        a["hidden"] = a["out_dim"]


def _check_patches(comp: Any, model: Any, diags: Any) -> None:
    """E137: the patches tile the images exactly."""
    size, patch = comp.args["image_size"], comp.args["patch"]
    if size > 0 and patch > 0 and size % patch:
        diags.error("E137", f"patch {patch} does not tile images of {size} pixels",
                    comp.arg_spans.get("patch", comp.span),
                    hint="image_size must be a multiple of patch")


OPS = (
    OpDef(
        name="patch_embed",
        doc="Images (B, channels, image_size, image_size) → patch tokens (B, S, dim): a "
            "strided convolution, optional CLS token, learned positions.",
        args=(
            ArgSpec("channels", "size", 3),
            ArgSpec("patch", "size", doc="patch side in pixels"),
            ArgSpec("dim", "size"),
            ArgSpec("image_size", "size"),
            ArgSpec("positions", "choice", "learned", choices=("learned", "none")),
            ArgSpec("cls_token", "bool", False),
        ),
        sizes=("channels", "patch", "dim", "image_size"),
        inputs=lambda a: (("B", a["channels"], a["image_size"], a["image_size"]),),
        output=lambda a: hidden(a["dim"]),
        weights=_patch_weights,
        flops=lambda a, s: 2 * a["dim"] * a["channels"] * a["patch"] ** 2,
        slots=("patch_embedding",), check=_check_patches,
        class_name="PatchEmbedding", init_args="std",
        ctor=lambda a, u: {k: a[k] for k in ("channels", "patch", "dim", "image_size",
                                              "positions", "cls_token")},
        features=lambda a: frozenset({"cls_token"} if a["cls_token"] else ()),
    ),
    OpDef(
        name="mlp2",
        role="adapter",
        doc="Adapter: Linear → GELU → Linear from vision width to text width.",
        args=(ArgSpec("in_dim", "size"), ArgSpec("out_dim", "size"),
              ArgSpec("hidden", "size", derived=True, doc="default: out_dim")),
        sizes=("in_dim", "out_dim", "hidden"),
        derive=_adapter_derive, derived_code={"hidden": "{out_dim}"},
        inputs=lambda a: (hidden(a["in_dim"]),),
        output=lambda a: hidden(a["out_dim"]),
        weights=lambda a: {"fc1.weight": (a["hidden"], a["in_dim"]), "fc1.bias": (a["hidden"],),
                           "fc2.weight": (a["out_dim"], a["hidden"]), "fc2.bias": (a["out_dim"],)},
        flops=lambda a, s: 2 * a["hidden"] * (a["in_dim"] + a["out_dim"]),
        class_name="MLP2Adapter", init_args="std", slots=("adapter",),
        ctor=lambda a, u: {"in_dim": a["in_dim"], "out_dim": a["out_dim"], "hidden": a["hidden"]},
    ),
    OpDef(
        name="avgpool",
        role="adapter",
        doc="Adapter: average each window × window block of the patch grid, then a linear "
            "map to text width (fewer image tokens).",
        args=(ArgSpec("in_dim", "size"), ArgSpec("out_dim", "size"),
              ArgSpec("window", "size", doc="pooling window side, in patches")),
        sizes=("in_dim", "out_dim", "window"),
        inputs=lambda a: (hidden(a["in_dim"]),),
        output=lambda a: hidden(a["out_dim"]),
        weights=lambda a: {"proj.weight": (a["out_dim"], a["in_dim"]), "proj.bias": (a["out_dim"],)},
        flops=lambda a, s: 2 * a["in_dim"] * a["out_dim"],
        class_name="AvgPoolAdapter", init_args="std", slots=("adapter",), pool_window="window",
        ctor=lambda a, u: {"in_dim": a["in_dim"], "out_dim": a["out_dim"], "window": a["window"]},
    ),
    OpDef(
        name="attention_pool",
        role="adapter",
        doc="Adapter: a learned query attends over each window × window block of the patch "
            "grid (multi-head), then a linear map to text width.",
        args=(ArgSpec("in_dim", "size"), ArgSpec("out_dim", "size"),
              ArgSpec("window", "size"), ArgSpec("heads", "size", 1)),
        sizes=("in_dim", "out_dim", "window", "heads"),
        inputs=lambda a: (hidden(a["in_dim"]),),
        output=lambda a: hidden(a["out_dim"]),
        weights=lambda a: {"query": (1, 1, a["in_dim"]),
                           "attention.in_proj_weight": (3 * a["in_dim"], a["in_dim"]),
                           "attention.in_proj_bias": (3 * a["in_dim"],),
                           "attention.out_proj.weight": (a["in_dim"], a["in_dim"]),
                           "attention.out_proj.bias": (a["in_dim"],),
                           "proj.weight": (a["out_dim"], a["in_dim"]),
                           "proj.bias": (a["out_dim"],)},
        flops=lambda a, s: 2 * a["in_dim"] * (4 * a["in_dim"] + a["out_dim"]),
        class_name="AttentionPoolAdapter", init_args="std", slots=("adapter",),
        pool_window="window",
        ctor=lambda a, u: {"in_dim": a["in_dim"], "out_dim": a["out_dim"],
                           "window": a["window"], "heads": a["heads"]},
    ),
)

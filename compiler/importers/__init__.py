"""Spec importers: other frameworks' model configs → .forge specs.

`add_commands(sub)` registers `forgec import-hf` and `forgec import-kf`
(torch-free, like the rest of the compiler).

    forgec import-hf SRC -o specs/NAME.forge      SRC: a save_pretrained folder or its config.json
    forgec import-kf MODEL.toml -o specs/NAME.forge

The spec is written only if the config imports without errors, and then
compiled at once: a spec the importer wrote always passes `forgec check`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import EXIT_OK, EXIT_SPEC, UsageError

MAX_CONFIG_BYTES = 16 << 20  # a config is a few KB


def add_commands(sub: argparse._SubParsersAction) -> dict:
    """Add the importers' subcommands; return {name: function(args) -> exit code}."""
    h = sub.add_parser(
        "import-hf", help="write a spec for a Hugging Face model (its config.json)",
        description="Write a .forge spec for a transformers model: Llama (Llama 3 RoPE "
        "scaling included), Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE, GPT-NeoX, GPT-J, Phi, "
        "Phi-3, StableLM, Starcoder2, OLMo, OLMo 2, Granite, Cohere, GLM-4, SmolLM3 (README: "
        "Supported families). A config field the spec cannot "
        "express is a located error. Load the weights into the built model with "
        "runtime.hf.load_hf_checkpoint(model, SRC).")
    h.add_argument("src", metavar="SRC", help="a folder written by save_pretrained, or its "
                   "config.json")
    k = sub.add_parser(
        "import-kf", help="write a spec for a KempnerForge model config (TOML)",
        description="Write a .forge spec for the [model] table of a KempnerForge config. "
        "A KempnerForge checkpoint of a dense model loads into the built model as it is "
        "(the parameter names are the same).")
    k.add_argument("src", metavar="MODEL.toml", help="a KempnerForge config with a [model] table")
    for p in (h, k):
        p.add_argument("-o", "--output", required=True, metavar="SPEC",
                       help="the spec to write, e.g. specs/NAME.forge (NAME names the model)")
        p.add_argument("--force", action="store_true", help="replace an existing spec")
        p.add_argument("--ignore", action="append", default=[], metavar="FIELD",
                       help="accept a field the importer does not know (it must not change "
                       "the model); repeatable")
        p.add_argument("--max-seq-len", type=int, metavar="N",
                       help="the spec's max_seq_len instead of the config's (RoPE tables and "
                       "KV caches are sized by it)")
    return {"import-hf": cmd_import_hf, "import-kf": cmd_import_kf}


def _output(args) -> tuple[str, str]:
    """The spec path and the model name (its file name); usage errors otherwise."""
    out = args.output
    stem, ext = os.path.splitext(os.path.basename(out))
    if ext != ".forge":
        raise UsageError(f"-o {out}: the spec must be a .forge file")
    if not stem.isidentifier() or stem.startswith("_"):
        raise UsageError(f"-o {out}: '{stem}' cannot name a model; spec names are identifiers, "
                         "e.g. specs/llama_tiny.forge")
    parent = os.path.dirname(out) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"-o {out}: no folder '{parent}'")
    if os.path.exists(out) and not args.force:
        raise UsageError(f"{out} exists; --force replaces it")
    if args.max_seq_len is not None and args.max_seq_len <= 0:
        raise UsageError("--max-seq-len must be positive")
    return out, stem


def _read(path: str) -> str:
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise UsageError(f"{path} is {size:,} bytes: not a model config")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read '{path}': {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text: not a model config") from None


def _finish(text: str, out: str, name: str) -> int:
    """Write the spec, compile it, print one line about it."""
    from ..cost import cost
    from ..diagnostics import CompileFailed, Diagnostics, print_diagnostics
    from ..driver import compile_spec
    from ..source import sources_of

    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    diags = Diagnostics()
    try:
        comp = compile_spec(out, diags)
    except CompileFailed:
        print_diagnostics(diags, sources_of(diags))
        print(f"forgec: {out} was written but does not compile (above)", file=sys.stderr)
        return EXIT_SPEC
    c = cost(comp.graphs[name])
    print(f"wrote {out}: model {name}, {c.n_layers} layers, {c.params_total:,} parameters",
          file=sys.stderr)
    return EXIT_OK


def _import(args, parse, convert, path: str) -> int:
    from ..diagnostics import Diagnostics, SourceCache, print_diagnostics
    from ..source import display_path
    from .common import JSONSyntaxError

    out, name = _output(args)
    text = _read(path)
    shown = display_path(path)
    sources = SourceCache()
    sources.add(shown, text)
    diags = Diagnostics()
    spec = None
    try:
        located = parse(text, shown)
    except JSONSyntaxError as e:
        diags.error("E110", str(e), e.span)
    else:
        spec = convert(located, name, shown, diags, ignore=set(args.ignore),
                       max_seq_len=args.max_seq_len)
    if spec is None and not diags.error_count:  # every refusal must say why
        raise RuntimeError(f"the importer refused {shown} without saying why")
    if spec is None or diags.error_count:
        print_diagnostics(diags, sources)
        return EXIT_SPEC
    return _finish(spec, out, name)


def cmd_import_hf(args) -> int:
    from .common import parse_json
    from .hf import import_hf

    path = args.src
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise UsageError(f"{args.src} has no config.json (a save_pretrained folder has one)")
    elif not os.path.isfile(path):
        raise UsageError(f"no such file or folder: '{args.src}'")
    status = _import(args, parse_json, import_hf, path)
    if status == 0:
        _import_tokenizer(os.path.dirname(path) or ".", args.output)
    return status


def _import_tokenizer(folder: str, spec: str) -> None:
    """Copy the model's tokenizer files beside the spec (`specs/NAME.tokenizer/`),
    where runs of the spec find it; without a tokenizer.json, runs use bytes."""
    import shutil

    from .hf import copy_tokenizer, spec_tokenizer_dir

    dst = spec_tokenizer_dir(spec)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        names = copy_tokenizer(folder, dst)
        print(f"wrote {dst}/: {', '.join(names)} (runs of the spec use this tokenizer)",
              file=sys.stderr)
        return
    if os.path.isdir(dst):  # an earlier import's tokenizer is not this model's
        shutil.rmtree(dst)
    why = ("only a sentencepiece tokenizer.model; save it as tokenizer.json with "
           "transformers' AutoTokenizer" if os.path.isfile(os.path.join(folder, "tokenizer.model"))
           else "none")
    print(f"note: {folder} has no tokenizer.json ({why}): runs of {spec} use the byte tokenizer",
          file=sys.stderr)


def cmd_import_kf(args) -> int:
    from .common import parse_toml
    from .kf import import_kf

    if os.path.isdir(args.src) or not os.path.isfile(args.src):
        raise UsageError(f"no such file: '{args.src}' (a KempnerForge TOML config)")
    return _import(args, parse_toml, import_kf, args.src)

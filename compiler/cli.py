"""`forgec`: the command line.

Exit status: 0 success (warnings allowed), 1 a spec has errors, 2 usage
errors (bad flags, a path that is not a file). A Python traceback is never
shown for bad input; an internal error prints one line and exits 70
(set FORGEC_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback

from .diagnostics import Diagnostics, ForgeError, print_diagnostics
from .errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SPEC,
    EXIT_USAGE,
    RunError,
    UsageError,
)
from .source import sources_of

RUNTIME_COMMANDS: dict = {}  # filled by runtime.cli.add_commands


def _parser(full: bool = True) -> argparse.ArgumentParser:
    """The command line; `full=False` leaves out the runtime's and the importers'
    commands (for a compile command, which cannot reach them)."""
    p = argparse.ArgumentParser(prog="forgec", description="Compile .forge model specs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("check", help="validate specs and report every error")
    c.add_argument("specs", nargs="+", metavar="SPEC")
    c.add_argument("-q", "--quiet", action="store_true", help="print errors only")

    i = sub.add_parser("info", help="parameters, FLOPs, KV-cache and memory of a model")
    i.add_argument("spec", metavar="SPEC")
    i.add_argument("--model", help="which model of the spec (default: the one named like the "
                   "file, else the last)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--seq-len", type=int, help="sequence length for attention FLOPs "
                   "(default: max_seq_len)")
    i.add_argument("--kv-dtype", choices=("fp32", "bf16", "fp16", "fp8"), default="bf16")

    b = sub.add_parser("build", help="generate the PyTorch package of each spec")
    b.add_argument("specs", nargs="+", metavar="SPEC")
    b.add_argument("-o", "--out", default="generated", help="output folder (default: generated/)")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 with a diff if a package is stale")
    mode.add_argument("--update", action="store_true",
                      help="replace existing packages whose content changes (golden files)")

    if full:
        from forgec.runtime.cli import add_commands  # torch-free at import; see runtime/cli.py

        RUNTIME_COMMANDS.update(add_commands(sub))
        from .importers import add_commands as add_importers

        RUNTIME_COMMANDS.update(add_importers(sub))

    g = sub.add_parser("graph", help="the lowered graph as DOT, JSON or SVG")
    g.add_argument("spec", metavar="SPEC")
    g.add_argument("--model", help="a vlm (all of it, the default for a vlm spec), or one "
                   "model or vision encoder of the spec")
    g.add_argument("--format", choices=("dot", "json", "svg"), default="dot")
    g.add_argument("--view", default="model",
                   help="model (one node per layer), full (every op), or block:NAME")
    g.add_argument("-o", "--output", help="write to a file instead of standard output")
    return p


def _compile(path: str, quiet: bool = False):
    from .driver import compile_and_report

    return compile_and_report(path, quiet)


def _select(result, name: str | None) -> str:
    if name is None:
        return result.main_model()
    if name not in result.models and name not in result.vlms:
        known = [*result.models, *result.vlms]
        raise UsageError(f"no model '{name}' in the spec (models: {', '.join(known)})")
    return name


def cmd_check(args) -> int:
    status = EXIT_OK
    for spec in args.specs:
        result = _compile(spec, args.quiet)
        if result is None:
            status = EXIT_SPEC
            continue
        if not args.quiet:
            from .cost import cost, vlm_cost

            for name, graph in result.graphs.items():
                c = cost(graph)
                kind = result.models[name].kind
                print(f"{spec}: ok: {kind} {name}: {c.n_layers} layers, "
                      f"{c.params_total:,} parameters")
            for name, vlm in result.vlms.items():
                c = vlm_cost(result, vlm)
                print(f"{spec}: ok: vlm {name}: {vlm.architecture}, {vlm.image_tokens} image "
                      f"tokens per image, {c.params_total:,} parameters")
    return status


def cmd_info(args) -> int:
    from .cost import cost, format_bytes

    result = _compile(args.spec, quiet=args.json)
    if result is None:
        return EXIT_SPEC
    name = _select(result, args.model)
    if args.seq_len is not None and args.seq_len <= 0:
        raise UsageError("--seq-len must be positive")
    from .plans import plan_data, vlm_plan_data

    vlm = result.vlms.get(name)
    if vlm is not None:
        from .cost import vlm_cost

        c = vlm_cost(result, vlm)  # the text decoder's FLOPs and cache, all parameters
        c.model = name
    else:
        c = cost(result.graphs[name], args.seq_len, args.kv_dtype)
    if vlm is not None:
        plans = {p.name: vlm_plan_data(p, vlm, result.models, result.graphs)
                 for p in result.plans.values() if p.target == name}
    else:
        plans = {p.name: plan_data(p, result.models[name], result.graphs[name])
                 for p in result.plans.values() if p.target == name}
    if args.json:
        print(json.dumps({**c.to_json(), "plans": plans}, indent=2))
        return EXIT_OK
    print(f"model {c.model}  ({args.spec})")
    print(f"  layers               {c.n_layers}")
    print(f"  parameters           {c.params_total:,}")
    print(f"  active parameters    {c.params_active:,}")
    print(f"  forward FLOPs/token  {c.flops_per_token:,}  (seq_len {c.seq_len})")
    if c.supports_kv_cache:
        print(f"  KV cache / token     {format_bytes(c.kv_bytes_per_token)}  ({c.kv_dtype})")
        if c.state_bytes_per_seq:
            print(f"  state / sequence     {format_bytes(c.state_bytes_per_seq)}  ({c.kv_dtype})")
        print("  supports_kv_cache    yes")
    else:
        print(f"  supports_kv_cache    no — training-only ({', '.join(c.non_causal)} not causal)")
    print("  training memory (weights + grads + AdamW, activations excluded)")
    for dtype, m in c.training_memory.items():
        print(f"    {dtype} params  {format_bytes(m['total'])}  (weights {format_bytes(m['weights'])},"
              f" grads {format_bytes(m['grads'])}, optimizer {format_bytes(m['optimizer'])})")
    for pname, p in plans.items():
        mesh = " × ".join(f"{k} {v}" for k, v in p["mesh"].items() if v > 1) or "1 rank"
        extra = ""
        if "pipeline" in p:
            sizes = p["pipeline"]["stage_params"]
            extra = (f", {len(sizes)} stages ({p['pipeline']['schedule']}), largest/mean "
                     f"params {max(sizes) / (sum(sizes) / len(sizes)):.2f}")
        print(f"  plan {pname:<18} {mesh} ({p['world']} ranks){extra}")
    print("  parameters by component")
    width = max(len(k) for k in c.breakdown) if c.breakdown else 0
    for key, n in c.breakdown.items():
        share = 100 * n / c.params_total if c.params_total else 0
        print(f"    {key:<{width}}  {n:>16,}  {share:5.1f}%")
    return EXIT_OK


def cmd_graph(args) -> int:
    from . import graphio
    from .lower import block_view, model_view

    result = _compile(args.spec, quiet=True)
    if result is None:
        return EXIT_SPEC
    name = _select(result, args.model)
    if name in result.vlms:  # the whole VLM; `--model TEXT|ENCODER` draws one part
        vlm = result.vlms[name]
        graph = result.vlm_graphs[name]
        parts = [result.models[vlm.vision], result.models[vlm.text]]
    else:
        graph = result.graphs[name]
        parts = [result.models[name]]
    if args.view == "model":
        view = model_view(graph)
    elif args.view == "full":
        view = graph
    elif args.view.startswith("block:"):
        block = args.view.split(":", 1)[1]
        owners = [m for m in parts if block in m.blocks]
        if not owners:
            known = [b for m in parts for b in m.blocks]
            raise UsageError(f"no block '{block}' in model '{name}' "
                             f"(blocks: {', '.join(known)})")
        if len(owners) > 1:
            raise UsageError(f"block '{block}' is in both '{owners[0].name}' and "
                             f"'{owners[1].name}'; choose one with --model")
        view = block_view(owners[0], block)
        view.graph["name"] = f"{owners[0].name}.{block}"
    else:
        raise UsageError(f"unknown view '{args.view}' (model, full, block:NAME)")
    if name in result.vlms and not args.view.startswith("block:"):
        view = graphio.in_dataflow_order(view)
    if args.format == "json":
        text = graphio.to_json(view, args.view)
    elif args.format == "svg":
        text = graphio.to_svg(view, args.view)
    else:
        text = graphio.to_dot(view, args.view)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_build(args) -> int:
    from .build import build

    status = EXIT_OK
    for spec in args.specs:
        result = _compile(spec, quiet=True)
        if result is None:
            status = EXIT_SPEC
            continue
        try:
            out = build(result, args.out, check=args.check, update=args.update)
        except ForgeError as e:
            diags = Diagnostics()
            diags.add(e.diagnostic)
            print_diagnostics(diags, sources_of(diags))
            status = EXIT_SPEC
            continue
        if out.status == "stale":
            status = EXIT_SPEC
            sys.stdout.write(out.diff)
            if args.check:
                print(f"{out.package}: stale (regenerate with `forgec build --update {spec}` "
                      "and review the diff)", file=sys.stderr)
            else:
                print(f"{out.package}: would change; rerun with --update to replace it "
                      "(the diff is above)", file=sys.stderr)
        else:
            print(f"{out.package}: {out.status}", file=sys.stderr)
    return status


COMMANDS = {"check": cmd_check, "info": cmd_info, "graph": cmd_graph, "build": cmd_build}


# What the `train` extra of pyproject.toml installs: only the runtime's commands import it.
TRAIN_EXTRA = ("torch", "numpy")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `forgec check` runs in editors and hooks: registering the other commands'
    # options would be a few per cent of it
    args = _parser(full=not argv or argv[0] not in COMMANDS).parse_args(argv)
    collecting = gc.isenabled()
    if args.command in COMMANDS:
        # A compile is short and allocates many small objects: the cyclic collector
        # only slows it down (~10 % of `forgec check`). Training keeps it on.
        gc.disable()
    try:
        return {**COMMANDS, **RUNTIME_COMMANDS}[args.command](args)
    except UsageError as e:
        print(f"forgec: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunError as e:
        print(f"forgec: error: {e}", file=sys.stderr)
        return EXIT_SPEC
    except ForgeError as e:  # a spec-level error found after compiling (E006: no model)
        diags = Diagnostics()
        diags.add(e.diagnostic)
        print_diagnostics(diags, sources_of(diags))
        return EXIT_SPEC
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 — a compiler bug must not look like a spec error
        missing = (e.name or "").split(".")[0] if isinstance(e, ModuleNotFoundError) else ""
        if missing in TRAIN_EXTRA:
            print(f"forgec: error: `forgec {args.command}` needs {missing}, which is not "
                  "installed: pip install 'forgec[train]'", file=sys.stderr)
            return EXIT_USAGE
        if os.environ.get("FORGEC_DEBUG"):
            traceback.print_exc()
        print(f"forgec: internal error: {type(e).__name__}: {e} (please report; "
              "FORGEC_DEBUG=1 shows details)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if collecting:
            gc.enable()


if __name__ == "__main__":
    sys.exit(main())

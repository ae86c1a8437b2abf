"""The front-end pipeline: source → AST → sections → bound models → graphs → checks.

Each stage reports into one `Diagnostics`; the pipeline stops between stages
once errors exist, so later passes only ever see well-formed input, while every
independent error within a stage is still reported in the same run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import networkx as nx

from .bind import Model, bind_program, new_binder
from .checks import run_checks, run_vlm_checks
from .diagnostics import CompileFailed, Diagnostics, ForgeError, Span, print_diagnostics
from .errors import UsageError
from .lower import lower, lower_vlm
from .plans import Plan, bind_plan, validate, validate_vlm_plan
from .resolve import Program, load_program
from .source import sources_of
from .vlm import VLM, bind_vlm, section_refs


@dataclass
class Compilation:
    program: Program
    models: dict[str, Model]
    graphs: dict[str, nx.MultiDiGraph]
    diagnostics: Diagnostics
    plans: dict[str, Plan] = field(default_factory=dict)
    vlms: dict[str, VLM] = field(default_factory=dict)
    vlm_graphs: dict[str, nx.MultiDiGraph] = field(default_factory=dict)  # one per vlm

    def main_model(self) -> str:
        """The model a spec is about: the one named like the file, else the last one."""
        stem = os.path.splitext(os.path.basename(self.program.root))[0]
        names = [n for n in self.program.root_sections
                 if n in self.vlms or (n in self.models and self.models[n].kind == "model")]
        if stem in names:
            return stem
        if not names:
            raise ForgeError("E006", "the spec defines no model", Span.point(self.program.root),
                             hint="`info`, `graph` and `build` need a `model` or `vlm` section")
        return names[-1]


def compile_spec(path: str, diags: Diagnostics | None = None) -> Compilation:
    """Run the front end on one spec file. Raises CompileFailed with all errors."""
    diags = diags if diags is not None else Diagnostics()
    try:
        program = load_program(path, diags)
    except ForgeError as e:
        diags.add(e.diagnostic)
        raise CompileFailed(diags) from None
    if diags.error_count:
        raise CompileFailed(diags)
    names = list(program.root_sections)
    if not names:
        diags.error("E006", "the spec defines nothing", Span.point(program.root),
                    hint="start with `model NAME { ... }`")
        raise CompileFailed(diags)
    plan_secs = [program.sections[n] for n in names if program.sections[n].kind == "plan"]
    vlm_secs = [program.sections[n] for n in names if program.sections[n].kind == "vlm"]
    # what plans and vlms name is bound too, also when it lives in an imported file
    targets = [s.target[0] for s in plan_secs if s.target and s.target[0] in program.sections]
    targets += [ref for s in vlm_secs for ref, _ in section_refs(s).values()
                if ref in program.sections]
    models = bind_program(program, diags, names + [t for t in dict.fromkeys(targets)
                                                   if t not in names])
    binder = new_binder(program, diags)
    plans = {s.name: p for s in plan_secs if (p := bind_plan(s, binder, diags)) is not None}
    vlms = {s.name: v for s in vlm_secs if (v := bind_vlm(s, binder, models, diags)) is not None}
    bound_cleanly = diags.error_count == 0
    graphs = {name: lower(model) for name, model in models.items()}
    for graph in graphs.values():
        run_checks(graph, diags, bound_cleanly=bound_cleanly)
    vlm_graphs = {}
    if diags.error_count == 0:
        # a vlm joins graphs that are sound on their own
        for name, vlm in vlms.items():
            vlm_graphs[name] = lower_vlm(vlm, graphs[vlm.text], graphs[vlm.vision])
            run_vlm_checks(vlm_graphs[name], diags)
        for plan in plans.values():
            if plan.target in vlms:
                validate_vlm_plan(plan, vlms[plan.target], models, graphs, diags)
            elif plan.target in graphs:
                validate(plan, models[plan.target], graphs[plan.target], diags)
    if diags.error_count:
        raise CompileFailed(diags)
    return Compilation(program, models, graphs, diags, plans, vlms, vlm_graphs)


def compile_and_report(path: str, quiet: bool = False) -> Compilation | None:
    """Compile a spec a command was given, printing its diagnostics (errors only
    with `quiet`); None when it has errors. A path that is no file is a UsageError."""
    if not os.path.exists(path):
        raise UsageError(f"no such file: '{path}'")
    if os.path.isdir(path):
        raise UsageError(f"'{path}' is a directory, not a spec file")
    diags = Diagnostics()
    try:
        result = compile_spec(path, diags)
    except CompileFailed:
        print_diagnostics(diags, sources_of(diags), quiet)
        return None
    print_diagnostics(diags, sources_of(diags), quiet)
    return result

"""The typed syntax tree of a .forge file, as produced by compiler/parse.py.

Nodes are plain named tuples (immutable, cheap to define and build) with a `span`;
no semantics live here.
"""

from __future__ import annotations

from typing import NamedTuple

from .diagnostics import Span

# ---- expressions ----------------------------------------------------------


class Int(NamedTuple):
    value: int
    span: Span


class Float(NamedTuple):
    value: float
    span: Span


class Str(NamedTuple):
    value: str
    span: Span


class Bool(NamedTuple):
    value: bool
    span: Span


class Ref(NamedTuple):
    """`name` or `section.name`."""

    parts: tuple[str, ...]
    span: Span

    @property
    def dotted(self) -> str:
        return ".".join(self.parts)


class Arg(NamedTuple):
    name: str | None  # None for a positional argument
    value: Expr
    span: Span
    name_span: Span | None = None


class Call(NamedTuple):
    func: Ref
    args: tuple[Arg, ...]
    span: Span


class BinOp(NamedTuple):
    op: str  # + - * / // %
    left: Expr
    right: Expr
    span: Span
    op_span: Span


class Neg(NamedTuple):
    operand: Expr
    span: Span


class ListExpr(NamedTuple):
    items: tuple[Expr, ...]
    span: Span


Expr = Int | Float | Str | Bool | Ref | Call | BinOp | Neg | ListExpr


# ---- statements -------------------------------------------------------------


class Assign(NamedTuple):
    name: str
    name_span: Span
    value: Expr
    span: Span


class RuleWord(NamedTuple):
    """One word of a stack selector: a keyword, a parameter name or an integer."""

    value: str | int
    span: Span


class Rule(NamedTuple):
    words: tuple[RuleWord, ...]
    target: str
    target_span: Span
    span: Span


class RuleAssign(NamedTuple):
    """`layers = stack(n_layers) { default: dense ... }`."""

    name: str
    name_span: Span
    call: Call
    rules: tuple[Rule, ...]
    span: Span


class Return(NamedTuple):
    value: Expr
    span: Span


class CallStmt(NamedTuple):
    call: Call
    span: Span


class BlockDecl(NamedTuple):
    name: str
    name_span: Span
    inputs: tuple[tuple[str, Span], ...]
    base: tuple[str, Span] | None
    body: tuple[Stmt, ...]
    span: Span
    kind: str = "block"  # or "module": a sub-module used as a component


Stmt = Assign | RuleAssign | Return | CallStmt | BlockDecl


# ---- top level --------------------------------------------------------------


class Import(NamedTuple):
    path: str
    span: Span


class Section(NamedTuple):
    """`model NAME [extends BASE] [for TARGET] { ... }` and its siblings."""

    kind: str
    kind_span: Span
    name: str
    name_span: Span
    base: tuple[str, Span] | None
    target: tuple[str, Span] | None
    body: tuple[Stmt, ...]
    span: Span


class Module(NamedTuple):
    file: str
    imports: tuple[Import, ...]
    sections: tuple[Section, ...]

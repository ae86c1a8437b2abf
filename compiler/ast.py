"""The typed syntax tree of a .forge file, as produced by compiler/parse.py.

Nodes are plain frozen dataclasses with a `span`; no semantics live here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .diagnostics import Span

# ---- expressions ----------------------------------------------------------


@dataclass(frozen=True)
class Int:
    value: int
    span: Span


@dataclass(frozen=True)
class Float:
    value: float
    span: Span


@dataclass(frozen=True)
class Str:
    value: str
    span: Span


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span


@dataclass(frozen=True)
class Ref:
    """`name` or `section.name`."""

    parts: tuple[str, ...]
    span: Span

    @property
    def dotted(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class Arg:
    name: str | None  # None for a positional argument
    value: Expr
    span: Span
    name_span: Span | None = None


@dataclass(frozen=True)
class Call:
    func: Ref
    args: tuple[Arg, ...]
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / // %
    left: Expr
    right: Expr
    span: Span
    op_span: Span


@dataclass(frozen=True)
class Neg:
    operand: Expr
    span: Span


@dataclass(frozen=True)
class ListExpr:
    items: tuple[Expr, ...]
    span: Span


Expr = Int | Float | Str | Bool | Ref | Call | BinOp | Neg | ListExpr


# ---- statements -------------------------------------------------------------


@dataclass(frozen=True)
class Assign:
    name: str
    name_span: Span
    value: Expr
    span: Span


@dataclass(frozen=True)
class RuleWord:
    """One word of a stack selector: a keyword, a parameter name or an integer."""

    value: str | int
    span: Span


@dataclass(frozen=True)
class Rule:
    words: tuple[RuleWord, ...]
    target: str
    target_span: Span
    span: Span


@dataclass(frozen=True)
class RuleAssign:
    """`layers = stack(n_layers) { default: dense ... }`."""

    name: str
    name_span: Span
    call: Call
    rules: tuple[Rule, ...]
    span: Span


@dataclass(frozen=True)
class Return:
    value: Expr
    span: Span


@dataclass(frozen=True)
class CallStmt:
    call: Call
    span: Span


@dataclass(frozen=True)
class BlockDecl:
    name: str
    name_span: Span
    inputs: tuple[tuple[str, Span], ...]
    base: tuple[str, Span] | None
    body: tuple[Stmt, ...]
    span: Span


Stmt = Assign | RuleAssign | Return | CallStmt | BlockDecl


# ---- top level --------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    path: str
    span: Span


@dataclass(frozen=True)
class Section:
    """`model NAME [extends BASE] [for TARGET] { ... }` and its siblings."""

    kind: str
    kind_span: Span
    name: str
    name_span: Span
    base: tuple[str, Span] | None
    target: tuple[str, Span] | None
    body: tuple[Stmt, ...]
    span: Span


@dataclass(frozen=True)
class Module:
    file: str
    imports: tuple[Import, ...]
    sections: tuple[Section, ...]

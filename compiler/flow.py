"""A block's (or module's) dataflow: small immutable expression trees over its
components, built by compiler/bind.py and read by lowering, checks and emission.

Nodes are named tuples, as in compiler/ast.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from .diagnostics import Span


class FRef(NamedTuple):
    name: str  # a block input or an earlier dataflow value
    span: Span


class FApply(NamedTuple):
    component: str
    args: tuple[Flow, ...]
    span: Span


class FAdd(NamedTuple):
    left: Flow
    right: Flow
    span: Span


class FScale(NamedTuple):
    factor: float
    operand: Flow
    span: Span


class FMul(NamedTuple):
    """The element-wise product of two tensors of one shape."""

    left: Flow
    right: Flow
    span: Span


class FSub(NamedTuple):
    """The element-wise difference of two tensors of one shape."""

    left: Flow
    right: Flow
    span: Span


class FAct(NamedTuple):
    """An element-wise function (compiler/functions.py, ACTIVATIONS) of a tensor;
    `args` are its compile-time arguments in declaration order (softcap's cap)."""

    name: str
    operand: Flow
    args: tuple[float, ...]
    span: Span


Flow = FRef | FApply | FAdd | FScale | FMul | FSub | FAct


def children(f: Flow) -> tuple[Flow, ...]:
    """The operands of a node, in evaluation order."""
    if isinstance(f, FApply):
        return f.args
    if isinstance(f, FAdd | FMul | FSub):
        return (f.left, f.right)
    if isinstance(f, FScale | FAct):
        return (f.operand,)
    return ()


def walk(f: Flow) -> Iterator[Flow]:
    """Every node of an expression, operands before the node that uses them."""
    for c in children(f):
        yield from walk(c)
    yield f


def replace_children(f: Flow, new: tuple[Flow, ...]) -> Flow:
    if isinstance(f, FApply):
        return f._replace(args=new)
    if isinstance(f, FAdd | FMul | FSub):
        return f._replace(left=new[0], right=new[1])
    if isinstance(f, FScale | FAct):
        return f._replace(operand=new[0])
    return f

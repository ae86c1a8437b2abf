"""Text → typed AST (compiler/ast.py) with the LALR grammar in grammar.lark.

Only syntax is decided here. Errors are `ForgeError`s with a location; the
conversion is depth-bounded so that no input can exhaust Python's stack.
"""

from __future__ import annotations

import os
import re
import sys
from functools import lru_cache

from . import ast
from .diagnostics import ForgeError, Span


def _import_tables():
    """compiler/grammar_lalr.py: grammar.lark compiled by lark's standalone tool
    (`make parser`; tests/test_parse.py fails when it is stale). Importing it
    instead of lark keeps grammar analysis and lark's own imports out of every
    command. The module tries `import regex`, which only Lark(regex=True) uses:
    with `regex` installed (transformers pulls it in) that import alone is a
    tenth of `forgec check`, so it is hidden while the tables load."""
    hidden = "regex" not in sys.modules
    if hidden:
        sys.modules["regex"] = None  # `import regex` raises ImportError
    try:
        from . import grammar_lalr
    finally:
        if hidden:
            del sys.modules["regex"]
    return grammar_lalr


_lalr = _import_tables()
Lark, Token, Tree = _lalr.Lark, _lalr.Token, _lalr.Tree
UnexpectedCharacters, UnexpectedEOF = _lalr.UnexpectedCharacters, _lalr.UnexpectedEOF
UnexpectedInput, UnexpectedToken = _lalr.UnexpectedInput, _lalr.UnexpectedToken

GRAMMAR_PATH = os.path.join(os.path.dirname(__file__), "grammar.lark")

# Deeper expressions than this are not written by people; refusing them keeps
# every later (recursive) pass far from Python's recursion limit.
MAX_EXPR_DEPTH = 64
# Integers beyond 64 bits have no meaning in a model spec.
MAX_INT_DIGITS = 19
MAX_INT = (1 << 63) - 1

_TERMINAL_NAMES = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "STRING": "a string",
    "LPAR": "'('", "RPAR": "')'", "LBRACE": "'{'", "RBRACE": "'}'", "LSQB": "'['",
    "RSQB": "']'", "COMMA": "','", "COLON": "':'", "SEMICOLON": "';'", "EQUAL": "'='",
    "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "PERCENT": "'%'",
    "DOT": "'.'", "$END": "end of file", "__ANON_0": "'//'",
}


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return _lalr.Lark_StandAlone()


def parse(text: str, file: str) -> ast.Module:
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None
    return _Converter(file, text).module(tree)


# ---- syntax errors ------------------------------------------------------------


def _describe_expected(expected) -> str:
    names = sorted({_TERMINAL_NAMES.get(t, f"'{t.lower()}'" if t.isalpha() else t) for t in expected})
    if len(names) > 10:
        return ""
    return "; expected " + (names[0] if len(names) == 1 else "one of " + ", ".join(names))


def _syntax_error(e: UnexpectedInput, text: str, file: str) -> ForgeError:
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if 0 <= e.pos_in_stream < len(text) else ""
        span = Span(file, e.line, e.column, e.line, e.column + 1)
        if ch == '"':
            return ForgeError("E003", "unterminated string", span,
                              hint="strings end with '\"' on the same line")
        if ch == "/" and text.startswith("/*", e.pos_in_stream):
            return ForgeError("E003", "unterminated block comment", span,
                              hint="block comments end with '*/'")
        shown = repr(ch) if ch.isprintable() else f"U+{ord(ch):04X}" if ch else "end of file"
        return ForgeError("E002", f"unexpected character {shown}", span)
    if isinstance(e, UnexpectedEOF):
        lines = text.split("\n")
        line = len(lines)
        col = len(lines[-1]) + 1
        return ForgeError("E002", "unexpected end of file" + _describe_expected(e.expected),
                          Span(file, line, col, line, col + 1), hint="is a '}' or ')' missing?")
    assert isinstance(e, UnexpectedToken)
    tok = e.token
    if tok.type == "$END":
        lines = text.split("\n")
        line, col = len(lines), len(lines[-1]) + 1
        return ForgeError("E002", "unexpected end of file" + _describe_expected(e.expected),
                          Span(file, line, col, line, col + 1), hint="is a '}' or ')' missing?")
    # A closed `/* ... */` is skipped by the lexer, so `/*` reaching the parser
    # (as '/' then '*') is a block comment that never ends.
    start = tok.start_pos if tok.type == "SLASH" else (tok.start_pos or 0) - 1
    if tok.type in ("SLASH", "STAR") and start >= 0 and text.startswith("/*", start):
        col = tok.column - (start != tok.start_pos)
        return ForgeError("E003", "unterminated block comment",
                          Span(file, tok.line, col, tok.line, col + 1),
                          hint="block comments end with '*/'")
    shown = str(tok)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    span = Span(file, tok.line, tok.column, tok.end_line or tok.line,
                tok.end_column or tok.column + 1)
    hint = None
    if tok.type == "EQUAL":
        hint = "only a name can be assigned to"
    elif tok.type == "__ANON_0":
        hint = "comments start with '#'; '//' is integer division rounding down"
    return ForgeError("E002", f"unexpected {shown!r}" + _describe_expected(e.expected), span, hint)


# ---- tree → AST -----------------------------------------------------------------

_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
_ESCAPE_RE = re.compile(r"\\(.)")


class _Converter:
    def __init__(self, file: str, text: str):
        self.file = file
        self.text = text

    def operator_span(self, left, right, op: str) -> Span:
        """The operator between two operands: the first `op` outside comments in
        the gap (which may also hold parentheses and comments)."""
        start = left.meta.end_pos if isinstance(left, Tree) else left.end_pos
        end = right.meta.start_pos if isinstance(right, Tree) else right.start_pos
        i = start
        while i < end:
            if self.text.startswith("#", i):
                newline = self.text.find("\n", i, end)
                i = end if newline < 0 else newline + 1
            elif self.text.startswith("/*", i):
                close = self.text.find("*/", i + 2, end)
                i = end if close < 0 else close + 2
            elif self.text.startswith(op, i):
                break
            else:
                i += 1
        assert i < end, "an operator lies between its operands"
        line = self.text.count("\n", 0, i) + 1
        col = i - (self.text.rfind("\n", 0, i) + 1) + 1
        return Span(self.file, line, col, line, col + len(op))

    def span(self, node) -> Span:
        if isinstance(node, Token):
            return Span(self.file, node.line, node.column, node.end_line, node.end_column)
        m = node.meta
        return Span(self.file, m.line, m.column, m.end_line, m.end_column)

    def module(self, tree: Tree) -> ast.Module:
        imports, sections = [], []
        for item in tree.children:
            if item.data == "import_decl":
                tok = item.children[0]
                imports.append(ast.Import(self.string(tok), self.span(item)))
            else:
                sections.append(self.section(item))
        return ast.Module(self.file, tuple(imports), tuple(sections))

    def section(self, tree: Tree) -> ast.Section:
        kind, name, *rest = tree.children
        base = target = None
        body = []
        for child in rest:
            if isinstance(child, Tree) and child.data == "extends_clause":
                base = (str(child.children[0]), self.span(child.children[0]))
            elif isinstance(child, Tree) and child.data == "for_clause":
                target = (str(child.children[0]), self.span(child.children[0]))
            else:
                stmt = self.stmt(child)
                if stmt is not None:
                    body.append(stmt)
        return ast.Section(str(kind), self.span(kind), str(name), self.span(name), base, target,
                           tuple(body), self.span(tree))

    def stmt(self, tree: Tree):
        kind = tree.data
        if kind == "empty_stmt":
            return None
        if kind == "assign":
            name, value = tree.children
            return ast.Assign(str(name), self.span(name), self.expr(value, 0), self.span(tree))
        if kind == "rule_assign":
            name, call, *rules = tree.children
            return ast.RuleAssign(str(name), self.span(name), self.call(call, 0),
                                  tuple(self.rule(r) for r in rules), self.span(tree))
        if kind == "return_stmt":
            return ast.Return(self.expr(tree.children[0], 0), self.span(tree))
        if kind == "call_stmt":
            return ast.CallStmt(self.call(tree.children[0], 0), self.span(tree))
        if kind in ("block_decl", "module_decl"):
            name, *rest = tree.children
            inputs: list[tuple[str, Span]] = []
            base = None
            body = []
            for child in rest:
                if isinstance(child, Tree) and child.data == "names":
                    inputs = [(str(t), self.span(t)) for t in child.children]
                elif isinstance(child, Tree) and child.data == "extends_clause":
                    base = (str(child.children[0]), self.span(child.children[0]))
                else:
                    stmt = self.stmt(child)
                    if stmt is not None:
                        body.append(stmt)
            return ast.BlockDecl(str(name), self.span(name), tuple(inputs), base, tuple(body),
                                 self.span(tree), "module" if kind == "module_decl" else "block")
        raise AssertionError(f"unhandled statement {kind}")

    def rule(self, tree: Tree) -> ast.Rule:
        *words, target = tree.children
        out = []
        for w in words:
            tok = w.children[0]
            value = self.integer(tok) if w.data == "word_int" else str(tok)
            out.append(ast.RuleWord(value, self.span(tok)))
        return ast.Rule(tuple(out), str(target), self.span(target), self.span(tree))

    # -- expressions

    def expr(self, node, depth: int):
        if depth > MAX_EXPR_DEPTH:
            raise ForgeError("E005", f"expression nested deeper than {MAX_EXPR_DEPTH} levels",
                             self.span(node), hint="split it into named parameters")
        if isinstance(node, Token):  # only reached through inlined rules
            raise AssertionError(f"bare token {node.type}")
        kind = node.data
        d = depth + 1
        if kind == "int_lit":
            return ast.Int(self.integer(node.children[0]), self.span(node))
        if kind == "float_lit":
            tok = node.children[0]
            try:
                value = float(str(tok).replace("_", ""))
            except ValueError:
                raise ForgeError("E032", f"malformed number {str(tok)[:40]!r}",
                                 self.span(tok)) from None
            if value != value or value in (float("inf"), float("-inf")):
                raise ForgeError("E032", "number out of range", self.span(tok))
            return ast.Float(value, self.span(node))
        if kind == "string_lit":
            return ast.Str(self.string(node.children[0]), self.span(node))
        if kind == "true_lit":
            return ast.Bool(True, self.span(node))
        if kind == "false_lit":
            return ast.Bool(False, self.span(node))
        if kind == "ref":
            return ast.Ref(tuple(str(t) for t in node.children), self.span(node))
        if kind == "call":
            return self.call(node, d)
        if kind == "list_lit":
            items = node.children[0].children if node.children else []
            return ast.ListExpr(tuple(self.expr(i, d) for i in items), self.span(node))
        if kind == "neg":
            return ast.Neg(self.expr(node.children[0], d), self.span(node))
        ops = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "mod": "%"}
        if kind in ops:
            left, right = node.children
            op_span = self.operator_span(left, right, ops[kind])
            return ast.BinOp(ops[kind], self.expr(left, d), self.expr(right, d), self.span(node),
                             op_span)
        raise AssertionError(f"unhandled expression {kind}")

    def call(self, tree: Tree, depth: int) -> ast.Call:
        ref, *rest = tree.children
        func = ast.Ref(tuple(str(t) for t in ref.children), self.span(ref))
        args = []
        for a in (rest[0].children if rest else []):
            if isinstance(a, Tree) and a.data == "kwarg":
                name, value = a.children
                args.append(ast.Arg(str(name), self.expr(value, depth + 1), self.span(a),
                                    self.span(name)))
            else:
                args.append(ast.Arg(None, self.expr(a, depth + 1), self.span(a)))
        return ast.Call(func, tuple(args), self.span(tree))

    def integer(self, tok: Token) -> int:
        digits = str(tok).replace("_", "")
        if len(digits.lstrip("0")) > MAX_INT_DIGITS or int(digits) > MAX_INT:
            raise ForgeError("E032", f"integer literal too large ({len(digits)} digits)",
                             self.span(tok), hint=f"integers are limited to {MAX_INT:,}")
        return int(digits)

    def string(self, tok: Token) -> str:
        body = str(tok)[1:-1]

        def unescape(m: re.Match) -> str:
            ch = m.group(1)
            if ch not in _ESCAPES:
                raise ForgeError("E003", f"invalid escape '\\{ch}' in string", self.span(tok),
                                 hint='valid escapes: \\" \\\\ \\n \\t')
            return _ESCAPES[ch]

        return _ESCAPE_RE.sub(unescape, body)

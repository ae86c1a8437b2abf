"""What the importers share: located config fields and a .forge spec writer.

A config is read into plain Python values plus the source position of every
key (`Located`), so that a field forgec cannot express is reported like any
compiler error — `config.json:12:3: error[E114]: ...` with the line and a
caret — instead of being ignored. `Fields` hands the values out, type-checks
them and remembers which keys were read; a key nobody read is an error
(E115), never silently dropped.

The writer (`Decoder.render`) turns a Llama-style decoder description into a
readable spec: named parameters with a comment naming the source field, one
block per kind of layer (the others `extends` it), and a layer stack.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

from ..diagnostics import Diagnostics, Span
from ..functions import ACTIVATIONS, FUNCTIONS
from ..ops import OPS, foreign_op

# ---- located values ------------------------------------------------------------------

Path = tuple  # keys (str) and list indices (int) from the root


@dataclass
class Located:
    """A parsed config: its values and where each key (or list item) is written."""

    file: str  # as shown in diagnostics
    text: str
    value: Any
    # path → span of the key (objects) or of the item (lists); () → the root value
    spans: dict[Path, Span]

    def span(self, path: Path) -> Span:
        """The span of `path`, else of its nearest written ancestor."""
        while path not in self.spans and path:
            path = path[:-1]
        return self.spans.get(path, Span.point(self.file))


class _Lines:
    def __init__(self, text: str) -> None:
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def pos(self, offset: int) -> tuple[int, int]:
        i = bisect.bisect_right(self.starts, offset) - 1
        return i + 1, offset - self.starts[i] + 1

    def span(self, file: str, start: int, end: int) -> Span:
        line, col = self.pos(start)
        end_line, end_col = self.pos(end)
        return Span(file, line, col, end_line, end_col)


class JSONSyntaxError(Exception):
    def __init__(self, message: str, span: Span) -> None:
        super().__init__(message)
        self.span = span


_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?")
_WS = re.compile(r"[ \t\n\r]*")
_CONSTANTS = {"true": True, "false": False, "null": None,
              "NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def parse_json(text: str, file: str) -> Located:
    """Parse JSON, recording the position of every key; duplicate keys are an error."""
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise JSONSyntaxError(f"not valid JSON: {e.msg}",
                              Span.point(file, e.lineno, e.colno)) from None
    lines = _Lines(text)
    spans: dict[Path, Span] = {}
    decode = json.decoder.scanstring

    def ws(i: int) -> int:
        return _WS.match(text, i).end()

    def value(i: int, path: Path) -> tuple[Any, int]:
        i = ws(i)
        c = text[i]
        if c == "{":
            obj: dict[str, Any] = {}
            i = ws(i + 1)
            if text[i] == "}":
                return obj, i + 1
            while True:
                start = i
                key, i = decode(text, i + 1)
                kpath = path + (key,)
                if key in obj:
                    raise JSONSyntaxError(f"'{'.'.join(map(str, kpath))}' is given twice",
                                          lines.span(file, start, i))
                spans[kpath] = lines.span(file, start, i)
                i = ws(i) + 1  # ':'
                obj[key], i = value(i, kpath)
                i = ws(i)
                if text[i] == "}":
                    return obj, i + 1
                i = ws(i + 1)  # ','
        if c == "[":
            items: list[Any] = []
            i = ws(i + 1)
            if text[i] == "]":
                return items, i + 1
            while True:
                ipath = path + (len(items),)
                start = ws(i)
                item, i = value(i, ipath)
                spans.setdefault(ipath, lines.span(file, start, i))
                items.append(item)
                i = ws(i)
                if text[i] == "]":
                    return items, i + 1
                i += 1  # ','
        if c == '"':
            return decode(text, i + 1)
        for word, v in _CONSTANTS.items():
            if text.startswith(word, i):
                return v, i + len(word)
        m = _NUMBER.match(text, i)
        assert m, "json.loads accepted it"
        s = m.group(0)
        return (float(s) if m.group(1) or m.group(2) else int(s)), m.end()

    start = ws(0)
    spans[()] = lines.span(file, start, start + 1)
    root, _ = value(0, ())
    return Located(file, text, root, spans)


_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")
_TOML_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\s*(#.*)?$")
_TOML_KEY = re.compile(r"^\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+(?:\s*\.\s*[A-Za-z0-9_\-]+)*)\s*=")


def parse_toml(text: str, file: str) -> Located:
    """Parse TOML (tomllib) and locate the keys of its tables, line by line.

    Only the forms model configs use are located precisely: `[table]` headers
    and `key = value` lines (dotted keys included); anything else is located
    at its table's header.
    """
    import tomllib

    try:
        value = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = _TOML_POS.search(str(e))
        line, col = (int(m.group(1)), int(m.group(2))) if m else (1, 1)
        message = _TOML_POS.sub("", str(e)).strip()
        raise JSONSyntaxError(f"not valid TOML: {message}", Span.point(file, line, col)) from None
    spans: dict[Path, Span] = {(): Span.point(file)}
    table: Path = ()
    for n, raw in enumerate(text.split("\n"), 1):
        if raw.lstrip().startswith("[["):
            continue  # arrays of tables: not part of model configs
        m = _TOML_HEADER.match(raw)
        if m:
            table = tuple(p.strip().strip('"') for p in m.group(1).split("."))
            col = raw.index("[") + 1
            spans.setdefault(table, Span(file, n, col, n, len(raw.rstrip()) + 1))
            continue
        m = _TOML_KEY.match(raw)
        if m:
            key = tuple(p.strip().strip("\"'") for p in m.group(1).split("."))
            col = m.start(1) + 1
            spans.setdefault(table + key, Span(file, n, col, n, m.end(1) + 1))
    return Located(file, text, value, spans)


# ---- reading fields ----------------------------------------------------------------

MISSING = object()


class Fields:
    """The keys of one config object, handed out with type checks and locations."""

    def __init__(self, src: Located, obj: dict, path: Path, diags: Diagnostics,
                 what: str) -> None:
        self.src, self.obj, self.path, self.diags, self.what = src, obj, path, diags, what
        self.used: set[str] = set()
        self.defaulted: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.obj

    def span(self, key: str | None = None) -> Span:
        return self.src.span(self.path if key is None else self.path + (key,))

    def name(self, key: str) -> str:
        return ".".join([*map(str, self.path), key])

    def error(self, code: str, key: str | None, message: str, hint: str | None = None) -> None:
        self.diags.error(code, message, self.span(key), hint)

    def raw(self, key: str) -> Any:
        self.used.add(key)
        return self.obj.get(key, MISSING)

    def get(self, key: str, kind: str, default: Any = MISSING, *, positive: bool = False,
            hint: str | None = None) -> Any:
        """The value of `key` as `kind` (int, float, bool, str, list, dict; `?` allows
        null). Missing without a default: E112; of the wrong kind: E113 (None returned)."""
        self.used.add(key)
        if key not in self.obj:
            if default is MISSING:
                self.error("E112", None, f"{self.what} has no '{key}'",
                           hint or "forgec does not guess sizes: write the field")
                return None
            self.defaulted.add(key)
            return default
        v = self.obj[key]
        nullable = kind.endswith("?")
        base = kind.rstrip("?")
        if v is None and nullable:
            return None
        ok = {
            "int": isinstance(v, int) and not isinstance(v, bool),
            "float": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            "bool": isinstance(v, bool),
            "str": isinstance(v, str),
            "list": isinstance(v, list),
            "dict": isinstance(v, dict),
        }[base]
        if ok and positive and v <= 0:
            self.error("E113", key, f"'{self.name(key)}' must be positive, got {v!r}")
            return None
        if not ok:
            words = {"int": "an integer", "float": "a number", "bool": "true or false",
                     "str": "a string", "list": "a list", "dict": "an object"}
            self.error("E113", key, f"'{self.name(key)}' must be {words[base]}"
                       f"{' or null' if nullable else ''}, got {json.dumps(v)}")
            return None
        return float(v) if base == "float" else v

    def consume(self, *keys: str) -> None:
        self.used.update(keys)

    def unknown(self, ignore: set[str], family: str) -> list[str]:
        """Report every key nobody read (E115); return the keys acknowledged by --ignore."""
        acknowledged = []
        for key in self.obj:
            if key in self.used:
                continue
            if self.name(key) in ignore:
                acknowledged.append(self.name(key))
                continue
            self.error("E115", key, f"unknown field '{self.name(key)}' in a {family} config",
                       "forgec does not know whether it changes the model; if it does not, "
                       f"rerun with --ignore {self.name(key)}")
        return acknowledged


# ---- writing specs ---------------------------------------------------------------------


class Expr(str):
    """A parameter value written as an expression (e.g. a compile-time function call)."""


def own_module_name(name: str) -> str:
    """`name` for a module an importer writes into a spec, or `name` + `_module` where
    an op, a function or an activation has that name (a spec's module may not, E069):
    an op added later under the name, `relu2_mlp` say, does not break an import."""
    while name in OPS or name in FUNCTIONS or name in ACTIVATIONS:
        name += "_module"
    return name


def fmt(v: Any) -> str:
    """A value as .forge source."""
    if isinstance(v, Expr):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return f"{v:.1f}"
        s = repr(v)
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{'-' if m.group(1) == '-' else ''}"
                      f"{m.group(2)}", s)
    return str(v)


@dataclass
class Param:
    name: str
    value: Any
    note: str = ""
    used: bool = False


class Params:
    """Named model parameters; only those the body uses are written."""

    def __init__(self) -> None:
        self.items: dict[str, Param] = {}

    def add(self, name: str, value: Any, note: str = "") -> None:
        self.items[name] = Param(name, value, note)

    def __call__(self, name: str) -> str:
        """Use parameter `name` in the body; returns the name."""
        self.items[name].used = True
        return name

    def __contains__(self, name: str) -> bool:
        return name in self.items

    def value(self, name: str) -> Any:
        return self.items[name].value


_NESTED = re.compile(r"(\w+ = \w+)\((.*)\)")


def call(op: str, args: list[str], indent: int, width: int = 100) -> str:
    """`op(a, b, c)`, wrapped after commas and aligned under the first argument."""
    head = f"{op}("
    lines, current = [], head
    for i, a in enumerate(args):
        piece = a + (", " if i < len(args) - 1 else ")")
        if len(current) + len(piece.rstrip()) + indent > width and current != head:
            lines.append(current.rstrip())
            current = " " * len(head) + piece
            nested = _NESTED.fullmatch(a)
            if nested and len(current.rstrip()) + indent > width:
                # a call too long for a line of its own (a router): wrapped inside
                name, inner = nested.group(1), nested.group(2).split(", ")
                current = (" " * len(head) + call(name, inner, indent + len(head), width)
                           + piece[len(a):])
        else:
            current += piece
    if not args:
        current += ")"
    lines.append(current)
    pad = " " * indent
    return ("\n" + pad).join(lines)


def selectors(layers: set[int], n: int) -> list[str]:
    """Stack selectors choosing exactly `layers` of a stack of n (see docs: layer stacks)."""
    s = sorted(layers)
    if not s:
        return []
    if s == list(range(n)):
        return ["default"]
    if s == list(range(len(s))):
        return [f"first {len(s)}"]
    if s == list(range(n - len(s), n)):
        return [f"last {len(s)}"]
    if len(s) >= 2:
        k = s[1] - s[0]
        if k > 1 and s == list(range(s[0], n, k)):
            return [f"every {k}"] if s[0] == k - 1 else [f"every {k} from {s[0]}"]
    return [f"at {i}" for i in s]


# the components of an imported block, named after their places in it (runtime/hf.py maps
# their weights to each family's names)
BLOCK_COMPONENTS = "attention_norm attention attention_post_norm mlp_norm mlp mlp_post_norm".split()


@dataclass
class LayerKind:
    window: bool  # sliding-window attention
    moe: bool  # a mixture of experts instead of the dense MLP
    nope: bool = False  # attention without positions (SmolLM3's no_rope_layers)
    ssm: bool = False  # a state-space mixer (Decoder.ssm) instead of attention


@dataclass
class Decoder:
    """A pre-norm decoder (embedding → blocks → norm → head), ready to be written."""

    name: str
    header: list[str]  # comment lines, without the `# `
    params: Params
    norm: str  # the norm call, e.g. "rmsnorm(dim, eps = norm_eps)"
    rope: list[str] | None  # rope arguments
    attention: list[str]  # attention arguments (without window)
    window: str | None  # the window expression of sliding layers
    mlp: tuple[str, list[str]] | None  # dense MLP: op and arguments
    moe: tuple[str, list[str]] | None  # mixture of experts: op and arguments
    kinds: list[LayerKind]  # one per layer
    tie: bool
    # whose config it comes from ("hf", "kf"): the ops of the spine and the attention are
    # the ones that framework's decoders use (OpDef.foreign)
    framework: str
    stack_notes: list[str] = field(default_factory=list)
    block_notes: dict[str, str] = field(default_factory=dict)
    # how a block adds to the residual: "sequential" (attention, then the MLP on the
    # sum), "parallel" (both read x through norms of their own: GPT-NeoX) or
    # "parallel_shared" (both read one norm of x: GPT-J, Phi)
    residual: str = "sequential"
    # modules of the spec's own (each a list of lines), written before the blocks
    modules: list[list[str]] = field(default_factory=list)
    head_bias: bool = False
    # norms before attention and MLP (pre-norm), and/or on their outputs before the residual
    # sum (post-norm: OLMo 2; both: sandwich norms, GLM-4)
    pre_norms: bool = True
    post_norms: bool = False
    residual_scale: str | None = None  # multiplies each branch before the sum (Granite)
    embedding_args: list[str] = field(default_factory=list)  # after (vocab_size, dim)
    head_args: list[str] = field(default_factory=list)  # after (dim, vocab_size)
    # the post-norms' component names where the weight loader expects others (Gemma's
    # post_attention_norm, post_mlp_norm)
    post_norm_names: tuple[str, str] | None = None
    # the names of sliding-window and full-attention blocks (Gemma's local, global)
    window_names: tuple[str, str] | None = None
    window_args: list[str] = field(default_factory=list)  # further arguments of local layers
    attention_op: str | None = None  # another op of the self-attention role (DeepSeek's)
    # hybrids (Jamba, Mamba-2): the state-space mixer of the `ssm` layers (op, arguments),
    # the names of its norm and its component (the weight loader reads them), and the
    # stack's rules as (selector, kind, comment), "default" first, when the config states
    # the layout as periods rather than a list of layers
    ssm: tuple[str, list[str]] | None = None
    ssm_names: tuple[str, str] = ("norm", "mixer")
    rules: list[tuple[str, LayerKind, str]] | None = None
    # a hybrid's block names by mixer (the state-space mixer's, attention's)
    mixer_names: tuple[str, str] = ("ssm", "attn")

    def _op(self, role: str) -> str:
        name = foreign_op(self.framework, role)
        assert name is not None, f"no {self.framework} op for {role}"
        return name

    def _block_name(self, kind: LayerKind, mixed_window: bool) -> str:
        if self.ssm is not None:  # a hybrid: named by mixer, then MLP
            return self.mixer_names[0 if kind.ssm else 1] + ("_moe" if kind.moe else "")
        if self.window_names and not kind.nope:  # (families whose layers all match in moe)
            return self.window_names[0 if kind.window else 1]
        base = "sparse" if kind.moe else "dense"
        return base + ("_local" if kind.window and mixed_window else "") + \
            ("_nope" if kind.nope else "")

    def _attention(self, window: bool, indent: int, nope: bool = False) -> str:
        args = [a for a in self.attention if not (nope and a == "rope = rope")]
        if window:
            args += self.window_args + [f"window = {self.window}"]
        return call(self.attention_op or self._op("self_attention"), args, indent)

    def _mlp(self, moe: bool, indent: int) -> str:
        spec = self.moe if moe else self.mlp
        assert spec is not None
        return call(spec[0], spec[1], indent)

    def _block_body(self, window: bool, moe: bool, nope: bool, ssm: bool = False) -> list[str]:
        """The components and dataflow of the base block."""
        attention_norm, attention_, attention_post_norm, mlp_norm, mlp_, mlp_post_norm = \
            BLOCK_COMPONENTS
        if self.post_norm_names:
            attention_post_norm, mlp_post_norm = self.post_norm_names
        if ssm:  # the state-space mixer and its norm in place of attention's
            attention_norm, attention_ = self.ssm_names
        parts = []
        if self.pre_norms:
            parts.append((attention_norm, lambda indent: self.norm))
        if ssm:
            parts.append((attention_, lambda indent: call(self.ssm[0], self.ssm[1], indent)))
        else:
            parts.append((attention_, lambda indent: self._attention(window, indent, nope)))
        if self.post_norms:
            parts.append((attention_post_norm, lambda indent: self.norm))
        has_mlp = self.mlp is not None or self.moe is not None
        if has_mlp and self.pre_norms and self.residual != "parallel_shared":
            parts.append((mlp_norm, lambda indent: self.norm))
        if has_mlp:
            parts.append((mlp_, lambda indent: self._mlp(moe, indent)))
        if has_mlp and self.post_norms:
            parts.append((mlp_post_norm, lambda indent: self.norm))
        width = max(len(n) for n, _ in parts)
        lines = [f"    {n:<{width}} = {text(4 + width + 3)}" for n, text in parts]
        scale = f" * {self.residual_scale}" if self.residual_scale else ""

        def pre(norm: str, x: str) -> str:
            return f"{norm}({x})" if self.pre_norms else x

        def post(norm: str, out: str) -> str:
            return f"{norm}({out})" if self.post_norms else out

        def attention(x: str) -> str:
            return post(attention_post_norm, f"{attention_}({pre(attention_norm, x)})")

        def mlp(x: str) -> str:
            return post(mlp_post_norm, f"mlp({pre('mlp_norm', x)})")

        if not has_mlp:  # a mixer alone (Mamba-2)
            flow = [f"    return x + {attention('x')}{scale}"]
        elif self.residual == "sequential":
            flow = [f"    h = x + {attention('x')}{scale}", f"    return h + {mlp('h')}{scale}"]
        elif self.residual == "parallel":
            flow = [f"    return x + {attention('x')} + {mlp('x')}"]
        else:
            flow = ["    y = attention_norm(x)", "    return x + attention(y) + mlp(y)"]
        return lines + [""] + flow

    def render(self) -> str:
        n = len(self.kinds)
        counts: dict[tuple[bool, bool, bool, bool], list[int]] = {}
        for i, k in enumerate(self.kinds):
            counts.setdefault((k.window, k.moe, k.nope, k.ssm), []).append(i)
        mixed_window = len({k[0] for k in counts}) > 1
        # the most common kind is the stack's default and the base of the others
        order = sorted(counts, key=lambda k: (-len(counts[k]), min(counts[k])))
        if self.rules is not None:  # the config's default kind is the base
            default = self.rules[0][1]
            default = (default.window, default.moe, default.nope, default.ssm)
            order = [default] + [k for k in order if k != default]
        base = order[0]
        names = {k: self._block_name(LayerKind(*k), mixed_window) for k in order}

        body: list[str] = []
        body.append(f"  token_embedding = {self._op('token_embedding')}("
                    + ", ".join(["vocab_size", "dim", *self.embedding_args]) + ")")
        self.params("vocab_size")
        self.params("dim")
        if self.rope is not None:
            body.append("  rope            = " + call(self._op("positions"), self.rope, 20))
        body.append("")

        for module in self.modules:
            body += [f"  {line}".rstrip() for line in module] + [""]
        bw, bm, bn, bs = base
        note = self.block_notes.get(names[base])
        if note:
            body.append(f"  # {note}")
        body.append(f"  block {names[base]}(x) {{")
        body += self._block_body(bw, bm, bn, bs)
        body.append("  }")
        for kind in order[1:]:
            w, m, nope, s = kind
            body.append("")
            note = self.block_notes.get(names[kind])
            if note:
                body.append(f"  # {note}")
            if s != bs:  # another mixer: a block of its own
                body.append(f"  block {names[kind]}(x) {{")
                body += self._block_body(w, m, nope, s)
                body.append("  }")
                continue
            body.append(f"  block {names[kind]}(x) extends {names[base]} {{")
            if w != bw or nope != bn:
                body.append(f"    attention = {self._attention(w, 16, nope)}")
            if m != bm:
                body.append(f"    mlp = {self._mlp(m, 10)}")
            body.append("  }")
        body.append("")

        if self.rules is not None:  # the config's own periods (a later rule wins)
            rules = [(sel, names[(k.window, k.moe, k.nope, k.ssm)], why)
                     for sel, k, why in self.rules]
        else:
            rules = [("default", names[base], "")]
            for kind in order[1:]:
                rules += [(sel, names[kind], "") for sel in selectors(set(counts[kind]), n)]
        for note in self.stack_notes:
            body += [f"  # {line}" for line in textwrap.wrap(note, 94)]
        self.params("n_layers")
        if len(rules) == 1:
            body.append(f"  layers      = stack(n_layers) {{ default: {rules[0][1]} }}")
        else:
            width = max(len(s) for s, _, _ in rules) + 1
            bwidth = max(len(b) for _, b, _ in rules)
            body.append("  layers = stack(n_layers) {")
            body += [f"    {s + ':':<{width}} {b:<{bwidth}}  # {why}" if why
                     else f"    {s + ':':<{width}} {b}" for s, b, why in rules]
            body.append("  }")
        body.append(f"  norm        = {self.norm}")
        tie = ", tie = token_embedding" if self.tie else ""
        if self.head_bias:
            tie += ", bias = true"
        tie += "".join(f", {a}" for a in self.head_args)
        body.append(f"  output_head = {self._op('output_head')}(dim, vocab_size{tie})")
        body.append("}")

        out = [f"# {line}".rstrip() for h in self.header for line in textwrap.wrap(h, 96) or [""]]
        out += ["", f"model {self.name} {{"]
        used = [p for p in self.params.items.values() if p.used]
        width = max(len(p.name) for p in used)
        values = [f"  {p.name:<{width}} = {fmt(p.value)}" for p in used]
        # align the comments, except after the odd long expression
        vwidth = max((len(v) for v in values if len(v) <= 40), default=0)
        for p, v in zip(used, values, strict=True):
            out.append(f"{v:<{vwidth}}  # {p.note}" if p.note else v)
        out.append("")
        return "\n".join(out + body) + "\n"

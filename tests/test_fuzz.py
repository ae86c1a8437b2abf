"""Property-based fuzzing of the front end: whatever the bytes, `forgec` answers.

Every input must end in exit status 0 (compiled) or 1 (spec errors, located):
never an exception escaping `main`, never the internal-error status 70, never
a "Traceback" on stderr, never a hang. Inputs are (a) soups of the language's
own tokens, (a') random well-formed but ill-typed expressions put into a real
spec, which reach the binder and the checks, and (b) mutations of every
committed spec.

The compiler runs in-process through `compiler.cli.main`. Hypothesis is
derandomized and keeps no example database, so CI sees the same inputs on
every run; each property is bounded (examples, seconds per compile, and an
alarm that turns a hang into a failure).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from conftest import SPECS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgec.compiler.cli import main

# One compile of the largest spec takes tens of milliseconds; two seconds is
# far beyond any legitimate run, and the alarm catches a genuine hang.
PER_COMPILE_S = 2.0
HANG_S = 10

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Mutations run once per committed spec: fewer each, so that the file stays
# well under a minute on two cores as specs are added.
FUZZ_PER_SPEC = settings(FUZZ, max_examples=100)

LOCATED = re.compile(r"^[^\n]+:\d+:\d+: error\[E\d{3}\]: ", re.MULTILINE)


class _Hang(BaseException):  # not an Exception: main()'s handler must not swallow it
    pass


def _alarm(signum, frame):
    raise _Hang(f"compile did not finish within {HANG_S} s")


def _run(argv: list[str]) -> tuple[int, str, str, float]:
    """main(argv) in-process: (status, stdout, stderr, CPU seconds; a bound on the
    work, which processes sharing the machine do not stretch as they stretch wall time)."""
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    start = time.process_time()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return status, out.getvalue(), err.getvalue(), time.process_time() - start


GRAPHS = (["--format", "json", "--view", "full"], ["--format", "dot", "--view", "full"],
          ["--format", "json"], ["--format", "dot"])


def assert_answers(path: Path, text: str, graph: int = 0) -> int:
    """Compile `path` (whose content is `text`) and check the front end's contract;
    a spec that compiles is also costed (`info`) and drawn (`graph`, GRAPHS[graph])."""
    path.write_text(text, encoding="utf-8")
    status, out, err, seconds = _run(["check", str(path)])
    context = f"input:\n{text[:2000]!r}\nstderr:\n{err[-3000:]}"
    assert status in (0, 1), f"exit status {status}\n{context}"
    assert "Traceback" not in err, context
    assert "internal error" not in err, context
    assert seconds < PER_COMPILE_S, f"compile took {seconds:.2f} s\n{context}"
    if status == 1:
        assert LOCATED.search(err), f"no located error\n{context}"
        assert err.rstrip().endswith(("error", "errors")), context
    else:
        assert " error[" not in err, context
        # A spec that compiles is also costed and drawn without a crash; one without
        # a model (only a plan, say) has nothing to cost: E006, located.
        has_model = ": ok: model " in out
        for argv in (["info", "--json", str(path)], ["graph", *GRAPHS[graph], str(path)]):
            status2, _, err2, seconds2 = _run(argv)
            assert status2 == (0 if has_model else 1), \
                f"{argv[0]}: exit status {status2}\n{err2}\n{context}"
            assert has_model or re.match(r"^[^\n]+:1:1: error\[E006\]: ", err2), err2
            assert "Traceback" not in err2 and seconds2 < PER_COMPILE_S, context
    return status


# ---- (a) token soups --------------------------------------------------------------

KEYWORDS = ["model", "vision", "vlm", "plan", "block", "return", "import", "extends", "for",
            "true", "false", "stack", "default", "every", "from", "first", "last", "at",
            "after"]
NAMES = ["x", "h", "m", "dim", "n_layers", "n_heads", "vocab_size", "layers", "dense",
         "token_embedding", "norm", "output_head", "attention", "embedding", "rmsnorm",
         "layernorm", "rope", "swiglu", "gelu_mlp", "lm_head", "linear", "ffn_hidden", "min",
         "max", "heads", "kv_heads", "head_dim", "hidden", "eps", "tie", "causal", "window",
         "max_seq_len", "theta", "rotary_dim", "scaling", "llama3", "bias", "_", "Ω"]
NUMBERS = ["0", "1", "2", "3", "4", "7", "64", "128", "4096", "1_000", "0.5", "1e-5", "1.",
           "10000.0", "9223372036854775807", "9223372036854775808", "1" + "0" * 18,
           "1" + "0" * 30, "1e308", "1e999", "00", "1__0", "4611686018427387904"]
PUNCT = ["(", ")", "{", "}", "[", "]", ",", ":", ";", "=", "+", "-", "*", "/", "//", "%",
         ".", "@", "#", "'", "\\", "\t", "\n", "\r\n", "\ufeff", "é"]
STRINGS = ['"a"', '""', '"llama3_8b.forge"', '"x.forge"', '"../x.forge"', '"/etc/passwd"',
           '"\\n"', '"\\q"', '"\\"', '"', '"abc']
COMMENTS = ["# comment\n", "#", "// old-style comment\n", "/* c */", "/* multi\nline */", "/*",
            "*/", "/**/"]
TOKENS = KEYWORDS + NAMES + NUMBERS + PUNCT + STRINGS + COMMENTS

token = st.sampled_from(TOKENS)
separator = st.sampled_from([" ", " ", " ", "", "\n", "\t"])
soup = st.lists(st.tuples(token, separator), max_size=120).map(
    lambda pairs: "".join(t + s for t, s in pairs))
# A soup inside a model's braces reaches the binder and the checks, not just the parser.
framed = st.tuples(st.sampled_from(["", "model m {\n", "model m {\n  block dense(x) {\n"]),
                   soup, st.sampled_from(["", "\n}", "\n}\n}"])).map("".join)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="forgec-fuzz-") as d:
        for spec in SPECS:  # so that mutated specs' imports resolve
            shutil.copy(spec, d)
        yield Path(d)


@FUZZ
@given(text=st.one_of(soup, framed))
def test_token_soup_never_crashes(workdir, text):
    assert_answers(workdir / "soup.forge", text)


# ---- (a') expressions: well-formed, ill-typed values in a real spec --------------------

CALLEES = ["min", "max", "ffn_hidden", "embedding", "attention", "rmsnorm", "layernorm", "rope",
           "swiglu", "gelu_mlp", "lm_head", "linear", "stack", "nope", "dim", "x"]
KWARGS = ["dim", "heads", "kv_heads", "head_dim", "hidden", "eps", "rope", "tie", "causal",
          "window", "max_seq_len", "theta", "rotary_dim", "scaling", "multiple_of", "bias", "a"]
leaf = st.sampled_from(NUMBERS + NAMES + ['"a"', '"llama3"', "true", "false", "-1", "0.0"])


def _call(parts) -> str:
    callee, args = parts
    return f"{callee}({', '.join(args)})"


expression = st.recursive(leaf, lambda inner: st.one_of(
    st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "%"]), inner).map(
        lambda t: f"({t[0]} {t[1]} {t[2]})"),
    st.tuples(st.sampled_from(CALLEES), st.lists(st.one_of(
        inner, st.tuples(st.sampled_from(KWARGS), inner).map(lambda kv: f"{kv[0]} = {kv[1]}")),
        max_size=4)).map(_call),
    inner.map(lambda e: f"-{e}"),
    st.lists(inner, max_size=3).map(lambda items: f"[{', '.join(items)}]"),
), max_leaves=10)

ASSIGNMENT = re.compile(r"^(\s*)(\w+)(\s*=\s*)(.+?)(\s*(?:#.*)?)$", re.MULTILINE)


@FUZZ
@given(data=st.data())
def test_random_values_in_a_spec_never_crash(workdir, data):
    text = (workdir / "llama_debug.forge").read_text(encoding="utf-8")
    lines = list(ASSIGNMENT.finditer(text))
    chosen = data.draw(st.lists(st.sampled_from(lines), min_size=1, max_size=3, unique_by=id),
                       label="lines")
    for m in sorted(chosen, key=lambda m: -m.start()):
        value = data.draw(expression, label=m[2])
        text = text[:m.start(4)] + value + text[m.end(4):]
    assert_answers(workdir / "values.forge", text, data.draw(st.integers(0, len(GRAPHS) - 1)))


# ---- (b) mutations of the committed specs --------------------------------------------

TOKEN_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|/\*.*?\*/|[A-Za-z_][A-Za-z0-9_]*'
                      r"|[0-9][0-9_.eE+-]*|//|\S", re.DOTALL)
NUMBER_RE = re.compile(r"(?<![A-Za-z0-9_.])[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?")
REPLACEMENTS = ["0", "-1", "1", "3", str(10**18), str(10**30), "1e400", "0.0", "-0",
                str(2**63 - 1), str(2**63)]


MUTATIONS = ["delete_char", "duplicate_char", "swap_tokens", "replace_number", "delete_line",
             "duplicate_line"]


def _mutate(text: str, data, several: bool = True) -> str:
    kind = data.draw(st.sampled_from(MUTATIONS + ["several"] * several), label="mutation")
    if kind == "several":
        for _ in range(data.draw(st.integers(2, 5), label="count")):
            text = _mutate(text, data, several=False)
        return text
    if kind in ("delete_char", "duplicate_char"):
        if not text:
            return text
        i = data.draw(st.integers(0, len(text) - 1), label="at")
        return text[:i] + text[i + 1:] if kind == "delete_char" else text[:i] + text[i] + text[i:]
    if kind in ("delete_line", "duplicate_line"):
        lines = text.split("\n")
        i = data.draw(st.integers(0, len(lines) - 1), label="line")
        if kind == "delete_line":
            del lines[i]
        else:
            lines.insert(i, lines[i])
        return "\n".join(lines)
    if kind == "swap_tokens":
        toks = list(TOKEN_RE.finditer(text))
        if len(toks) < 2:
            return text
        i = data.draw(st.integers(0, len(toks) - 1), label="first")
        j = data.draw(st.integers(0, len(toks) - 1), label="second")
        a, b = sorted((toks[i], toks[j]), key=lambda m: m.start())
        if a.start() == b.start():
            return text
        return (text[:a.start()] + b.group() + text[a.end():b.start()] + a.group()
                + text[b.end():])
    assert kind == "replace_number"
    numbers = list(NUMBER_RE.finditer(text))
    if not numbers:
        return text
    m = numbers[data.draw(st.integers(0, len(numbers) - 1), label="number")]
    new = data.draw(st.sampled_from(REPLACEMENTS), label="by")
    return text[:m.start()] + new + text[m.end():]


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
@FUZZ_PER_SPEC
@given(data=st.data())
def test_spec_mutation_never_crashes(workdir, spec, data):
    original = spec.read_text(encoding="utf-8")
    mutated = _mutate(original, data)
    path = workdir / spec.name
    try:
        assert_answers(path, mutated, data.draw(st.integers(0, len(GRAPHS) - 1), label="graph"))
    finally:
        path.write_text(original, encoding="utf-8")


def test_mutation_operators_change_the_spec():
    """The mutation strategies really mutate (a fuzzer that feeds the original is no fuzzer)."""
    text = SPECS[0].read_text(encoding="utf-8")
    assert NUMBER_RE.search(text) and len(TOKEN_RE.findall(text)) > 20
    seen: set[str] = set()

    @settings(max_examples=30, derandomize=True, database=None, deadline=None)
    @given(data=st.data())
    def collect(data):
        seen.add(_mutate(text, data))

    collect()
    assert len(seen - {text}) >= 20

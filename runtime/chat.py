"""Instruction examples as tokens with a loss mask: prompt/response pairs and
chat conversations rendered with the tokenizer's chat template.

A chat template is the jinja2 `chat_template` of tokenizer_config.json (or a
file given with --chat-template). It is rendered as transformers'
`apply_chat_template` renders it: an immutable sandboxed environment with
trim_blocks and lstrip_blocks, the loop-control extension, `raise_exception`,
a `tojson` that does not escape HTML, `strftime_now`, the tokenizer's special
tokens (`bos_token`, `eos_token`, ...) and `add_generation_prompt`. The text
is then encoded whole, without the tokenizer's own special tokens, so the ids
are those of `apply_chat_template(messages, tokenize=True)`.

Which tokens are trained: an assistant turn's text is what the template adds
between rendering the conversation up to that turn with the generation prompt
and rendering it including the turn (its content and the template's end of
turn). A token is trained when its characters overlap such a span (as
transformers' `return_assistant_tokens_mask` marks them). A
pair is the prompt's tokens, then the response's and the end-of-text token,
which are trained.
"""

from __future__ import annotations

import json
from datetime import datetime

from forgec.compiler.errors import RunError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


class TemplateError(Exception):
    """A chat template that cannot be compiled or rendered, or that raised."""


def compile_template(source: str):
    """A jinja2 template of `source` in transformers' sandboxed chat environment."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant
        tracker) renders its body; the spans come from rendering increments."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"the chat template does not compile: {e}") from None


class ChatTemplate:
    """A compiled chat template with the tokenizer's special tokens."""

    def __init__(self, source: str, special_tokens: dict[str, str], origin: str) -> None:
        self.source, self.special_tokens, self.origin = source, special_tokens, origin
        self.template = compile_template(source)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"the chat template raised: {e}") from None
        except Exception as e:  # noqa: BLE001 — a template's own failure is bad input
            raise TemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, the character spans of its assistant turns)."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise TemplateError(
                    f"the chat template does not render the conversation turn by turn (the "
                    f"text up to assistant message {i + 1} is not a prefix of the whole), so "
                    "the assistant's tokens cannot be told apart")
            spans.append((len(before), len(upto)))
        return full, spans


def load_chat_template(tok, path: str | None = None) -> ChatTemplate:
    """The chat template of file `path`, else of the tokenizer's tokenizer_config.json."""
    config = getattr(tok, "config", {}) or {}
    special = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except OSError as e:
            raise RunError(f"cannot read the chat template {path}: {e}") from None
        origin = path
    else:
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name", "template"}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str):
            where = tok.folder or "the byte tokenizer"
            raise RunError(f"{where} has no chat_template (tokenizer_config.json); give one "
                           "with --chat-template FILE")
        origin = f"{tok.folder}/tokenizer_config.json"
    try:
        return ChatTemplate(source, special, origin)
    except TemplateError as e:
        raise RunError(f"{origin}: {e}") from None


def encode_with_offsets(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of `text` (no special tokens added) and each token's characters [start, end)."""
    if getattr(tok, "tok", None) is not None:  # an HFTokenizer
        enc = tok.tok.encode(text, add_special_tokens=False)
        return enc.ids, list(enc.offsets)
    ids, offsets = [], []
    for i, ch in enumerate(text):  # the byte tokenizer: a character's bytes
        b = ch.encode("utf-8")
        ids += b
        offsets += [(i, i + 1)] * len(b)
    return ids, offsets


def encode_chat(tok, template: ChatTemplate, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation: mask 1 on the assistant turns' tokens."""
    text, spans = template.assistant_spans(messages)
    ids, offsets = encode_with_offsets(tok, text)
    mask = [int(any(start < hi and end > lo for lo, hi in spans)) for start, end in offsets]
    return ids, mask


def encode_pair(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of a prompt/response pair: the response and end-of-text are trained."""
    p = tok.encode(prompt)
    r = tok.encode(response, eos=True)
    return p + r, [0] * len(p) + [1] * len(r)


def check_messages(messages, field: str) -> str | None:
    """Why `messages` is not a conversation with an assistant turn (None: it is one)."""
    if not isinstance(messages, list) or not messages:
        return f"'{field}' is not a list of messages"
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            return (f"message {i + 1} of '{field}' is not an object with a string 'role' and "
                    "'content'")
    if not any(m["role"] == "assistant" for m in messages):
        return "the conversation has no assistant turn (nothing to train on)"
    return None


def render_user_message(tok, message: str, template_path: str | None = None) -> str:
    """`message` as a conversation's user turn followed by the generation prompt
    (`forgec generate --chat`)."""
    template = load_chat_template(tok, template_path)
    try:
        return template.render([{"role": "user", "content": message}],
                               add_generation_prompt=True)
    except TemplateError as e:
        raise RunError(f"{template.origin}: {e}") from None

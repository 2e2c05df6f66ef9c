"""Chat templates: how a conversation becomes token ids and a loss mask (SFT), or a prompt (generation).

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``: an
optional system message first, then user and assistant turns alternating, starting with a user turn.
A template lays a conversation out as *segments*, each either text or one special token, and each
either a prompt segment (loss mask 0) or a response segment (loss mask 1). Every text segment is
tokenized on its own (``tokenizer.encode(segment)``, no BOS/EOS added) and the ids are concatenated,
as LLaMA-Factory does, so the ids of a prompt at generation (:meth:`ChatTemplate.prompt_ids`) are
exactly the ids the same prompt had in training. :meth:`ChatTemplate.render_prompt` joins the segments
as text for string-based generation (the evaluation's ``model.generate(prompts)``).

Templates
---------
``evolm``
    LLaMA-Factory's ``default`` template as EvoLM used it for SFT (EvoLM's SFT configs say
    ``template: default``; its evaluation prompts are ``Human: {problem}\\nAssistant:`` with stop strings
    ``Human``/``Human:``/``Assistant``/``Assistant:``). This follows the ``default`` of LLaMA-Factory
    releases up to v0.9.1 (``src/llamafactory/data/template.py``)::

        format_user      = "Human: {{content}}\\nAssistant:"
        format_assistant = "{{content}}" + eos_token          (the default assistant formatter)
        format_system    = "{{content}}\\n"
        format_separator = "\\n"                              (before every user turn after the first)
        no prefix, so no BOS

    Later releases removed ``format_separator`` and changed ``default`` to ``"Human: {{content}}" +
    eos + "\\nAssistant:"``, ``"{{content}}" + eos + "\\n"`` and ``"System: {{content}}" + eos + "\\n"``;
    that version would give the prompt ``Human: {problem}</s>\\nAssistant:``, not EvoLM's evaluation
    prompt, so megaevo follows the older one. Segments, tokenized one by one as LLaMA-Factory's
    ``_convert_elements_to_ids`` does (``|`` separates segments, ``[1]`` marks loss)::

        system + "\\n" | "Human: " + u1 + "\\nAssistant:" | a1 [1] | EOS [1]
        | "\\n" | "Human: " + u2 + "\\nAssistant:" | a2 [1] | EOS [1] ...

    An empty system message is left out (as LLaMA-Factory does). Needs the tokenizer's EOS.
``chat``
    megaevo's role tokens (:data:`megaevo.data.tokenizers.CHAT_TOKENS`, single tokens in every
    tokenizer ``megaevo tokenizer train`` writes)::

        <|system|> | s | <|end|> | <|user|> | u1 | <|end|> | <|assistant|> | a1 [1] | <|end|> [1] | <|user|> ...

    No BOS and no EOS: ``<|end|>`` closes every turn, the model learns to emit it after its answer,
    and generation stops there (it is one of the stop strings). Needs the four chat tokens as single
    tokens.
``hf``
    The tokenizer's own Jinja ``chat_template`` (``tokenizer_config.json`` beside the tokenizer, or
    ``chat_template.jinja`` / ``chat_template.json``), rendered in a sandbox as Hugging Face's
    ``apply_chat_template`` does (``messages``, ``add_generation_prompt``, ``bos_token``,
    ``eos_token``, ``raise_exception``). Segments come from incremental rendering: for the assistant
    message k, ``render(messages[:k], add_generation_prompt=True)`` ends where its answer begins and
    ``render(messages[:k + 1])`` ends where the template has closed that turn; the text between is a
    response segment (the answer and whatever the template emits to close the turn, up to the next
    turn's header), the rest are prompt segments. A template that renders earlier turns differently
    once later turns follow cannot be split this way and is refused for that conversation.
``raw``
    No markup: the contents back to back, the system and user texts as prompt, each assistant text
    followed by EOS as response. Its prompt for one problem is the problem as it is; for SFT it is
    ``prompt + response + EOS``. Needs the tokenizer's EOS to encode conversations.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from megaevo.data.tokenizers import CHAT_TOKENS, Tokenizer, load_tokenizer
from megaevo.errors import UserError

ROLES = ("system", "user", "assistant")
TEMPLATE_NAMES = ("evolm", "chat", "hf", "raw")
"""The template registry's names: every choice of ``--template``, ``data.template`` and ``rl.template``."""
TOKENIZER_TEMPLATES = ("hf",)
"""The templates read from the tokenizer, which render nothing without it."""

# Where a completion under each template ends: the next turn's markers.
STOP_STRINGS = {
    "evolm": ("Human", "Human:", "Assistant", "Assistant:"),
    "chat": ("<|user|>", "<|end|>", "<|assistant|>"),
    "raw": (),
}

# Shown for the EOS token in rendered text when the tokenizer gives it no text of its own.
DEFAULT_EOS_TEXT = "</s>"


class TemplateError(UserError):
    """A template that cannot be used with this tokenizer (unknown name, missing special tokens, no
    chat_template)."""


class ConversationError(UserError):
    """A conversation that a template cannot lay out; the message says which message and why."""


Message = Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Token:
    """One special token in a template's layout: a vocabulary entry such as ``<|user|>``, or ``EOS``."""

    name: str


EOS = Token("EOS")


# -- checking conversations ----------------------------------------------------------------------

def check_messages(messages, generation: bool = False) -> list[dict]:
    """The messages as plain ``{"role", "content"}`` dicts, after checking their shape.

    An optional system message first, then user and assistant alternating from a user turn. For
    training (``generation=False``) the conversation ends with an assistant turn; for a prompt it
    ends with a user turn (the model answers it). Raises :class:`ConversationError`.
    """
    if not isinstance(messages, (list, tuple)):
        raise ConversationError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise ConversationError("the conversation has no messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise ConversationError(f"{where} is {type(m).__name__}, not an object with role and content")
        for key in ("role", "content"):
            if key not in m:
                raise ConversationError(f"{where} has no {key!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ConversationError(f"{where}: unknown role {role!r} (use one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ConversationError(f"{where}: content is {type(content).__name__}, not a string")
        out.append({"role": role, "content": content})
    start = 1 if out[0]["role"] == "system" else 0
    for i in range(start, len(out)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        role = out[i]["role"]
        if role == "system":
            raise ConversationError(f"messages[{i}]: a system message may only come first")
        if role != expected:
            article = "an" if expected == "assistant" else "a"
            raise ConversationError(f"messages[{i}]: expected {article} {expected} turn, got {role} (after an optional "
                                    f"system message, turns alternate user, assistant, starting with user)")
    if len(out) == start:
        raise ConversationError("the conversation has a system message and no turns")
    last = out[-1]["role"]
    if not generation:
        if not any(m["role"] == "assistant" for m in out):
            raise ConversationError("no assistant turn (nothing to train on)")
        if last != "assistant":
            raise ConversationError("the conversation ends with a user turn that has no assistant reply")
    elif last != "user":
        raise ConversationError("a prompt must end with a user turn (the model writes the assistant's reply)")
    return out


def _split_system(messages: list[dict]) -> tuple[str, list[tuple[str, str | None]]]:
    """(system text, [(user, assistant or None)]) of checked messages."""
    system = ""
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    pairs = []
    for i in range(0, len(messages), 2):
        reply = messages[i + 1]["content"] if i + 1 < len(messages) else None
        pairs.append((messages[i]["content"], reply))
    return system, pairs


# -- the templates -------------------------------------------------------------------------------

Segment = tuple  # (str | Token, loss: bool)


class ChatTemplate:
    """Lays conversations out for one template; see the module docstring for each layout.

    Instances are small, immutable and picklable (they hold no tokenizer), so worker processes get
    a copy cheaply.
    """

    name: str = ""
    stop_strings: tuple[str, ...] = ()
    eos_text: str = DEFAULT_EOS_TEXT

    # -- what each template defines -------------------------------------------------------------
    def segments(self, messages: list[dict], generation: bool) -> list[Segment]:
        """The layout of checked messages; with ``generation``, the prompt up to the assistant header."""
        raise NotImplementedError

    def required_tokens(self) -> tuple[Token, ...]:
        """The special tokens every encoded conversation needs."""
        return ()

    # -- the API ---------------------------------------------------------------------------------
    def encode(self, tokenizer: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """(token ids, loss mask) of a conversation: 1 for the tokens the model learns to write (each
        assistant answer and what closes its turn), 0 for the rest."""
        self.check_tokenizer(tokenizer)
        ids: list[int] = []
        mask: list[int] = []
        for piece, loss in self.segments(check_messages(messages), generation=False):
            part = self._ids(tokenizer, piece)
            ids.extend(part)
            mask.extend([int(loss)] * len(part))
        return ids, mask

    def prompt_ids(self, tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
        """Token ids of the conversation so far (ending with a user turn) and the assistant header:
        the same ids that part had in training."""
        ids: list[int] = []
        for piece, _ in self.segments(check_messages(messages, generation=True), generation=True):
            ids.extend(self._ids(tokenizer, piece))
        return ids

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The prompt of :meth:`prompt_ids` as text (the conversation so far and the assistant header)."""
        segments = self.segments(check_messages(messages, generation=True), generation=True)
        return "".join(self._text(piece) for piece, _ in segments)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Raise :class:`TemplateError` naming the special tokens the template needs that the tokenizer lacks."""
        missing = [t.name for t in self.required_tokens() if self._token_id(tokenizer, t) is None]
        if missing:
            raise TemplateError(self._missing_message(tokenizer, missing))

    # -- helpers ---------------------------------------------------------------------------------
    def _missing_message(self, tokenizer: Tokenizer, missing: list[str]) -> str:
        what = ", ".join("an end-of-sequence (eos) token" if m == EOS.name else m for m in missing)
        hint = ""
        if self.name == "chat":
            hint = (" as single tokens (tokenizers written by `megaevo tokenizer train` have them; use "
                    "--template evolm or hf for other tokenizers)")
        return f"template {self.name!r} needs {what}{hint}, which {tokenizer.name} does not have"

    @staticmethod
    def _token_id(tokenizer: Tokenizer, token: Token) -> int | None:
        if token == EOS:
            return tokenizer.eos_id
        return tokenizer.token_to_id(token.name)

    def _ids(self, tokenizer: Tokenizer, piece) -> list[int]:
        if isinstance(piece, Token):
            i = self._token_id(tokenizer, piece)
            if i is None:
                raise TemplateError(self._missing_message(tokenizer, [piece.name]))
            return [i]
        return tokenizer.encode(piece) if piece else []

    def _text(self, piece) -> str:
        if isinstance(piece, Token):
            return self.eos_text if piece == EOS else piece.name
        return piece

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class EvolmTemplate(ChatTemplate):
    name = "evolm"
    stop_strings = STOP_STRINGS["evolm"]

    def __init__(self, eos_text: str = DEFAULT_EOS_TEXT):
        self.eos_text = eos_text

    def required_tokens(self):
        return (EOS,)

    def segments(self, messages, generation):
        system, pairs = _split_system(messages)
        out: list[Segment] = []
        if system:
            out.append((system + "\n", False))
        for turn, (user, reply) in enumerate(pairs):
            if turn:
                out.append(("\n", False))
            out.append((f"Human: {user}\nAssistant:", False))
            if reply is not None:
                out += [(reply, True), (EOS, True)]
        return out


class ChatTokensTemplate(ChatTemplate):
    name = "chat"
    stop_strings = STOP_STRINGS["chat"]

    SYSTEM, USER, ASSISTANT, END = (Token(t) for t in CHAT_TOKENS)

    def required_tokens(self):
        return (self.SYSTEM, self.USER, self.ASSISTANT, self.END)

    def segments(self, messages, generation):
        system, pairs = _split_system(messages)
        out: list[Segment] = []
        if system:
            out += [(self.SYSTEM, False), (system, False), (self.END, False)]
        for user, reply in pairs:
            out += [(self.USER, False), (user, False), (self.END, False), (self.ASSISTANT, False)]
            if reply is not None:
                out += [(reply, True), (self.END, True)]
        return out


class RawTemplate(ChatTemplate):
    name = "raw"
    stop_strings = STOP_STRINGS["raw"]

    def __init__(self, eos_text: str = DEFAULT_EOS_TEXT):
        self.eos_text = eos_text

    def required_tokens(self):
        return (EOS,)

    def segments(self, messages, generation):
        out: list[Segment] = []
        for m in messages:
            if m["role"] == "assistant":
                out += [(m["content"], True), (EOS, True)]
            else:
                out.append((m["content"], False))
        return out


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _raise(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    """A Jinja chat template compiled in a sandbox (once per process and source)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(f"the tokenizer's chat_template is not valid Jinja: {e.message} "
                            f"(line {e.lineno})") from None


class HFChatTemplate(ChatTemplate):
    """A tokenizer's Jinja chat template; built by :func:`get_template` ``("hf", tokenizer)``."""

    name = "hf"
    stop_strings = ()

    def __init__(self, source: str, bos_text: str = "", eos_text: str = "", origin: str = "chat_template"):
        self.source = source
        self.bos_text = bos_text
        self.eos_text = eos_text
        self.origin = origin

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template's text for messages, as ``apply_chat_template(..., tokenize=False)`` gives it."""
        import jinja2

        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=self.bos_text, eos_token=self.eos_text)
        except jinja2.exceptions.TemplateError as e:
            raise ConversationError(f"the chat template of {self.origin} refused the conversation: {e}") from None

    def segments(self, messages, generation):
        out: list[Segment] = []
        done = ""
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:k], add_generation_prompt=True)
            whole = self.render(messages[: k + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not whole.startswith(prompt):
                raise ConversationError(
                    f"the chat template of {self.origin} does not render this conversation incrementally (the "
                    f"text up to assistant turn messages[{k}] changes once that turn or a later one follows), so "
                    f"the assistant spans cannot be found; use --template evolm, chat or raw")
            out += [(prompt[len(done):], False), (whole[len(prompt):], True)]
            done = whole
        if generation:
            prompt = self.render(messages, add_generation_prompt=True)
            if not prompt.startswith(done):
                raise ConversationError(f"the chat template of {self.origin} does not render this conversation "
                                        f"incrementally (earlier turns change once a later one follows)")
            out.append((prompt[len(done):], False))
        return out


# -- finding a tokenizer's chat template ---------------------------------------------------------

def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_text(tokenizer: Tokenizer, token_id: int | None) -> str:
    """The text of a special token, or "" when the tokenizer shows it as none (SentencePiece control pieces)."""
    if token_id is None:
        return ""
    try:
        return tokenizer.decode([token_id])
    except Exception:  # a tokenizer that cannot decode its own control pieces
        return ""


def read_chat_template(tokenizer: Tokenizer) -> HFChatTemplate:
    """The Jinja chat template stored beside a tokenizer: ``tokenizer_config.json``'s ``chat_template``
    (a string, or a list of named templates of which ``default`` is used), else ``chat_template.jinja``,
    else ``chat_template.json``."""
    path = getattr(tokenizer, "path", None)
    if path is None:
        raise TemplateError(f"template 'hf' reads the chat_template stored beside the tokenizer; {tokenizer.name} "
                            f"has no file")
    folder = Path(path).parent
    config: dict = {}
    source, origin = None, None
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise TemplateError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            config = {}
        value = config.get("chat_template")
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
            if value is None:
                raise TemplateError(f"{config_path}: chat_template lists templates {sorted(map(str, named))} but "
                                    f"none named 'default'")
        if value is not None:
            if not isinstance(value, str):
                raise TemplateError(f"{config_path}: chat_template must be a string, got {type(value).__name__}")
            source, origin = value, str(config_path)
    if source is None and (folder / "chat_template.jinja").is_file():
        origin = str(folder / "chat_template.jinja")
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if source is None and (folder / "chat_template.json").is_file():
        origin = str(folder / "chat_template.json")
        try:
            value = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise TemplateError(f"{origin}: not a JSON object with a chat_template ({e})") from None
        if isinstance(value, str):
            source = value
    if source is None:
        raise TemplateError(
            f"template 'hf' needs the tokenizer's Jinja chat_template, and {tokenizer.name} has none (looked for "
            f"'chat_template' in {config_path}, and for chat_template.jinja and chat_template.json beside it): use "
            f"--template evolm, chat or raw, or add a chat_template")
    bos = _config_token(config, "bos_token") or _token_text(tokenizer, tokenizer.bos_id)
    eos = _config_token(config, "eos_token") or _token_text(tokenizer, tokenizer.eos_id)
    template = HFChatTemplate(source, bos, eos, origin)
    _compile(source)  # a syntax error is reported now, not at the first conversation
    return template


# -- lookup --------------------------------------------------------------------------------------

def get_template(name: str | ChatTemplate, tokenizer: Tokenizer | str | os.PathLike | None = None) -> ChatTemplate:
    """The chat template called ``name`` (one of :data:`TEMPLATE_NAMES`).

    With a tokenizer, the template is checked against it (the special tokens it needs to encode
    conversations) and shows the tokenizer's own EOS text in rendered prompts; ``hf`` needs the
    tokenizer, whose chat_template it reads.
    """
    if isinstance(name, ChatTemplate):
        template = name
    else:
        if name not in TEMPLATE_NAMES:
            raise TemplateError(f"unknown template {name!r}: use one of {', '.join(TEMPLATE_NAMES)}")
        tok = load_tokenizer(tokenizer) if tokenizer is not None else None
        if name == "hf":
            if tok is None:
                raise TemplateError("template 'hf' reads the tokenizer's chat_template: give the tokenizer "
                                    "(get_template('hf', tokenizer))")
            return read_chat_template(tok)
        eos_text = (_token_text(tok, tok.eos_id) if tok is not None else "") or DEFAULT_EOS_TEXT
        template = {"evolm": lambda: EvolmTemplate(eos_text), "chat": ChatTokensTemplate,
                    "raw": lambda: RawTemplate(eos_text)}[name]()
        tokenizer = tok
    if tokenizer is not None:
        template.check_tokenizer(load_tokenizer(tokenizer))
    return template


def render(problem: str, template: str = "evolm") -> str:
    """``problem`` as the one user turn of ``template``'s prompt (what evaluation sends the model)."""
    if template == "hf":
        raise TemplateError("template 'hf' needs the tokenizer: use get_template('hf', tokenizer).render_prompt(...)")
    return get_template(template).render_prompt([{"role": "user", "content": problem}])


# The one-turn prompt of each template that needs no tokenizer, with ``{problem}`` for the problem.
PROMPT_FORMATS = {name: render("{problem}", name) for name in TEMPLATE_NAMES if name not in TOKENIZER_TEMPLATES}

"""Token usage: read from OpenAI / Anthropic JSON responses and SSE streams, or estimated.

Responses carry ``usage`` blocks; streams carry them in a final chunk (OpenAI with
``stream_options.include_usage``) or spread over events (Anthropic ``message_start`` /
``message_delta``). When a stream ends without usage (no ``include_usage``, or the client
went away), completion tokens are estimated from the streamed text and prompt tokens from
the request, at about four characters per token, and the result is marked ``estimated``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple, NoReturn

from .errors import BadRequest

#: Characters per token for estimates (the rule of thumb OpenAI documents for English).
CHARS_PER_TOKEN = 4
_MAX_EVENT_BYTES = 1 << 20


class Usage(NamedTuple):
    """Tokens one request used (immutable). A named tuple: one is built per LLM request,
    and a frozen dataclass costs several times more to build."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str | None = None
    #: True when the counts were estimated rather than reported by the model.
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


#: ``_usage((prompt, completion, model, estimated))``: a :class:`Usage` built without the
#: Python-level ``__new__`` of a named tuple.
_usage = partial(tuple.__new__, Usage)


def _int(value: Any) -> int:
    """A positive token count, else 0 (``bool`` is not a count)."""
    if type(value) is int:
        return value if value > 0 else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


#: The member that holds an object part's text, the first of these set: ``text`` (a text
#: block), ``content`` (an Anthropic tool result, an OpenAI Responses input item),
#: ``output`` (a Responses tool call's output), ``parts`` (a Gemini content).
_PART_TEXT = ("text", "content", "output", "parts")


def _part_text(part: Mapping[str, Any]) -> Any:
    """The text (or list of parts) of an object part: its first member of
    :data:`_PART_TEXT` that is not null."""
    for name in _PART_TEXT:
        value = part.get(name)
        if value is not None:
            return value
    return None


#: Prompt tokens counted for each image, audio clip, video or file a prompt carries, unless
#: the app sets ``LLMAUTH_PROMPT_MEDIA_TOKENS``: 48,169, the most one image costs on a model
#: of the shipped price table — gpt-4o-mini's high-detail image (2,833 + 5,667 per 512-pixel
#: tile, at most 8 tiles once scaled into 2048 × 768). Elsewhere an image costs far less
#: (GPT-4o 85 + 170 × 8 = 1,445; GPT-4.1-nano 1,536 patches × 2.46 = 3,779; Anthropic
#: about 1,600 after its resize; Gemini 258 per tile). Its bytes give no bound: an image's
#: tokens follow its pixels after the provider's resize, a PDF's follow its pages.
MEDIA_TOKENS = 48_169
#: Content part types that carry an image, audio clip, video or file: OpenAI chat
#: (``image_url``, ``input_audio``, ``file``, ``video_url``), OpenAI Responses
#: (``input_image``, ``input_file``, ``input_audio``), Anthropic (``image``, ``document``).
_MEDIA_TYPES = frozenset(("image_url", "input_audio", "file", "video_url", "input_image",
                          "input_file", "image", "document", "audio"))
#: The members of a Gemini part that carry media: inline bytes or a file's URI.
_MEDIA_KEYS = frozenset(("inlineData", "inline_data", "fileData", "file_data"))


def _text_length(content: Any, media: int = MEDIA_TOKENS) -> int:
    """The length of a content's text: a string, or a list of parts (strings, objects
    holding text or parts in one of :data:`_PART_TEXT`, lists) joined by spaces; anything
    else has none. A part that carries an image, audio, video or file (a type of
    :data:`_MEDIA_TYPES`, a Gemini part with a member of :data:`_MEDIA_KEYS`) counts
    ``media`` tokens (an Anthropic document, the text it carries too); an object part
    without text (a tool call and its arguments, a Gemini function call or response) counts
    the length of its JSON (:func:`_json_length`). Walked without recursion: a client may
    nest lists as deep as the JSON parser goes."""
    if type(content) is str:
        return len(content)
    length = 0
    stack = [content]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            length += len(value)
        elif isinstance(value, list):
            if value:
                length += len(value) - 1  # the separators
            for part in value:
                if not isinstance(part, Mapping):
                    stack.append(part)
                    continue
                kind = part.get("type")
                if (type(kind) is str and kind in _MEDIA_TYPES) or not _MEDIA_KEYS.isdisjoint(
                        part):
                    length += media * CHARS_PER_TOKEN
                    if kind == "document":
                        stack.append(_document_text(part))
                    continue
                text = _part_text(part)
                if text is None:
                    length += _json_length(part)
                else:
                    stack.append(text)
    return length


def _document_text(part: Mapping[str, Any]) -> list[Any]:
    """The text an Anthropic document block carries besides its file: its ``title`` and
    ``context``, and a ``text`` source's ``data`` or a ``content`` source's ``content``."""
    found = [part.get("title"), part.get("context")]
    source = part.get("source")
    if isinstance(source, Mapping):
        kind = source.get("type")
        found.append(source.get("data") if kind == "text" else
                     source.get("content") if kind == "content" else None)
    return [text for text in found if text is not None]


def _json_length(value: Any) -> int:
    """The length of ``value``'s compact JSON text, strings unescaped (what a definition, a
    schema or a tool call gives the model to read), walked without recursion. Values JSON
    cannot hold count nothing."""
    length = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            length += len(item) + 2
        elif isinstance(item, Mapping):
            length += len(item) + 1 if item else 2  # braces and commas
            for name, member in item.items():
                length += (len(name) if isinstance(name, str) else 0) + 3  # "name":
                stack.append(member)
        elif isinstance(item, (list, tuple)):
            length += len(item) + 1 if item else 2  # brackets and commas
            stack.extend(item)
        elif item is None or item is True:
            length += 4
        elif item is False:
            length += 5
        elif isinstance(item, float):
            length += len(repr(item))
        elif isinstance(item, int):
            try:
                length += len(str(item))
            except ValueError:  # more digits than Python prints: at least its digits
                length += item.bit_length() // 3 + 2
    return length


def estimate_prompt_tokens(body: Mapping[str, Any] | None, media: int = MEDIA_TOKENS) -> int:
    """A request's prompt size in tokens: what a provider bills as input, as far as the
    body tells.

    The length of the text ``" ".join`` of the messages' contents, 12 characters of framing
    per message and the JSON of a message's other members (an assistant's tool calls, a
    name: :func:`_message_extras`), then the members of :data:`_PROMPT_NAMES` and
    :data:`_DEFINITION_NAMES` (:func:`_other_text_length`), at :data:`CHARS_PER_TOKEN`;
    only the length is computed. An object part's text is its first member of
    :data:`_PART_TEXT` (a tool result's or a Responses item's content, a Gemini content's
    parts); an image, audio, video or file counts ``media`` tokens (see
    :func:`_text_length`).
    """
    if type(body) is not dict and not isinstance(body, Mapping):
        return 0
    length = _messages_length(body.get("messages"), media) + _other_text_length(body, media)
    return math.ceil(length / CHARS_PER_TOKEN) if length else 0


def _messages_length(messages: Any, media: int = MEDIA_TOKENS) -> int:
    if type(messages) is not list and not isinstance(messages, list):
        return 0
    length = joined = 0  # joined: messages that take part in the join (mappings)
    for message in messages:
        if type(message) is dict or isinstance(message, Mapping):
            content = message.get("content")
            length += len(content) if type(content) is str else _text_length(content, media)
            joined += 1
            if not _MESSAGE_NAMES.issuperset(message):  # more than role and content
                length += _message_extras(message, media)
    return length + max(joined - 1, 0) + 12 * len(messages)  # separators, framing


#: A message's members that :func:`_message_extras` does not count.
_MESSAGE_NAMES = frozenset(("role", "content"))


def _message_extras(message: Mapping[str, Any], media: int) -> int:
    """The members of a message besides ``role`` and ``content``, which the model reads
    too: an assistant's ``tool_calls`` (their arguments) or ``function_call``, a ``name``,
    a ``tool_call_id``..., the length of their JSON; an assistant's ``audio`` (a reference
    to an earlier answer's audio, billed as audio input) counts ``media`` tokens more."""
    length = 0
    for name, value in message.items():
        if name != "role" and name != "content":
            length += (len(name) if isinstance(name, str) else 0) + 4 + _json_length(value)
            if name == "audio" and value is not None:
                length += media * CHARS_PER_TOKEN
    return length


#: The top-level members besides ``messages`` that hold prompt text: completions'
#: ``prompt``, embeddings' and Responses' ``input``, Anthropic's ``system`` (a string or
#: text blocks), Responses' ``instructions``, Gemini's ``contents`` and system
#: instruction (a content object: its parts).
_PROMPT_NAMES = ("prompt", "input", "system", "instructions", "contents", "systemInstruction",
                 "system_instruction")
#: The top-level members that define what the model reads beside the prompt, counted at the
#: length of their JSON: tool and function definitions (OpenAI, Anthropic, Gemini),
#: the JSON schema of a structured answer (OpenAI chat's ``response_format``, Responses'
#: ``text.format``, Anthropic's ``output_format``).
_DEFINITION_NAMES = ("tools", "functions", "response_format", "text", "output_format")
#: The schema of a structured answer in Gemini's generation config (either spelling).
_CONFIG_SCHEMAS = ("responseSchema", "response_schema", "responseJsonSchema",
                   "response_json_schema")
#: Prompt tokens a request with tool definitions counts beyond their JSON: the system
#: prompt a provider adds for tool use (Anthropic documents up to 530 tokens, Claude 3 Opus).
TOOLS_TOKENS = 530


def _other_text_length(body: Mapping[str, Any], media: int = MEDIA_TOKENS) -> int:
    length = 0
    for name in _PROMPT_NAMES:
        value = body.get(name)
        if isinstance(value, str):
            length += len(value)
        elif isinstance(value, list):
            length += _text_length(value, media) if any(
                [isinstance(item, Mapping) for item in value]) else _items_length(value)
        elif isinstance(value, Mapping):  # one content object (a Gemini system instruction)
            length += _text_length([value], media)
    for name in _DEFINITION_NAMES:
        value = body.get(name)
        if value is not None:
            length += _json_length(value)
            if (name == "tools" or name == "functions") and value:
                length += TOOLS_TOKENS * CHARS_PER_TOKEN
    for name in _CONFIG_NAMES:
        config = body.get(name)
        if isinstance(config, Mapping):
            for schema in _CONFIG_SCHEMAS:
                value = config.get(schema)
                if value is not None:
                    length += _json_length(value)
    return length


#: :func:`body_sizes` reads the members other than ``messages`` and the completion caps
#: only for a body that has one of these (one check in C for the plain chat body).
_OTHER_NAMES = frozenset(_PROMPT_NAMES + _DEFINITION_NAMES + ("generationConfig",
                                                              "generation_config"))


def _items_length(items: list[Any]) -> int:
    """Token ids — a list of integers, or a list of such lists (a prompt or a batch of
    inputs given as tokens) — count :data:`CHARS_PER_TOKEN` characters each: each is one
    token (printed, ``0 1 2`` held two characters per token: half the prompt was
    reserved). Other items: the length of ``" ".join(str(item) for item in items)``; for
    items nested too deep to print, their text's length (:func:`_text_length`)."""
    if all([type(item) is int for item in items]):
        return CHARS_PER_TOKEN * len(items)
    if all([type(item) is list and all([type(t) is int for t in item]) for item in items]):
        return CHARS_PER_TOKEN * sum([len(item) for item in items])
    try:
        return len(" ".join([str(item) for item in items]))
    except RecursionError:
        return _text_length(items)


_CAP_NAMES = ("max_completion_tokens", "max_tokens", "max_output_tokens")
#: :func:`body_sizes`' cap for a completion cap that is not a non-negative integer (a
#: float, a string, a boolean, a negative number): the guards that reserve tokens or money
#: refuse the request (:func:`refuse_unreadable_cap`) instead of guessing what an upstream
#: would make of it (some read ``"8000"`` or ``8000.0`` as 8000, some read -1 as no cap).
UNREADABLE_CAP = -1
#: Gemini's generation config (its JSON takes either spelling) and the completion cap in it.
_CONFIG_NAMES = ("generationConfig", "generation_config")
_CONFIG_CAPS = ("maxOutputTokens", "max_output_tokens")


def requested_max_tokens(body: Mapping[str, Any] | None) -> int | None:
    """The completion cap a request asks for: the largest of :data:`_CAP_NAMES` and
    Gemini's ``generationConfig.maxOutputTokens`` it sets (which one an upstream obeys when
    a body names several is the upstream's business: a translating gateway may map any of
    them to its provider's); ``None`` when none is set to other than 0 or null;
    :data:`UNREADABLE_CAP` when one is not a non-negative integer."""
    if type(body) is not dict and not isinstance(body, Mapping):
        return None
    cap = 0
    for _name, value in _caps(body):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return UNREADABLE_CAP
        if value > cap:
            cap = value
    return cap or None


def _caps(body: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The completion caps a body sets (not null), named as in a refusal: those of
    :data:`_CAP_NAMES`, then Gemini's ``maxOutputTokens`` in its generation config."""
    found = [(name, body.get(name)) for name in _CAP_NAMES if body.get(name) is not None]
    for config_name in _CONFIG_NAMES:
        config = body.get(config_name)
        if type(config) is dict or isinstance(config, Mapping):
            found += [(f"{config_name}.{name}", config.get(name)) for name in _CONFIG_CAPS
                      if config.get(name) is not None]
    return found


def body_sizes(body: Any, media: int = MEDIA_TOKENS) -> tuple[int, int]:
    """``(estimate_prompt_tokens(body, media), requested_max_tokens(body) or 0)``, in one
    pass that reads only the fields a JSON object has (a request's guards all need both)."""
    if type(body) is not dict:
        return estimate_prompt_tokens(body, media), requested_max_tokens(body) or 0
    messages = body.get("messages")
    length = 0
    if type(messages) is list:  # _messages_length(messages, media), inline
        joined = 0  # messages that take part in the join (mappings)
        for message in messages:
            if type(message) is dict or isinstance(message, Mapping):
                content = message.get("content")
                length += len(content) if type(content) is str else _text_length(content,
                                                                                 media)
                joined += 1
                if not _MESSAGE_NAMES.issuperset(message):  # more than role, content
                    length += _message_extras(message, media)
        length += (joined - 1 if joined else 0) + 12 * len(messages)  # separators, framing
    elif messages is not None:
        length = _messages_length(messages, media)
    if not _OTHER_NAMES.isdisjoint(body):
        length += _other_text_length(body, media)
        if "generationConfig" in body or "generation_config" in body:  # Gemini's cap too
            return -(-length // CHARS_PER_TOKEN), requested_max_tokens(body) or 0
    cap = 0  # the largest cap set, as requested_max_tokens
    for name in _CAP_NAMES:
        value = body.get(name)
        if value is not None:
            if type(value) is not int and (isinstance(value, bool)
                                           or not isinstance(value, int)):
                cap = UNREADABLE_CAP
                break
            if value < 0:
                cap = UNREADABLE_CAP
                break
            if value > cap:
                cap = value
    return -(-length // CHARS_PER_TOKEN), cap  # the ceiling, as estimate_prompt_tokens


def refuse_unreadable_cap(body: Any) -> NoReturn:
    """The 400 for a body whose completion cap :func:`body_sizes` read as
    :data:`UNREADABLE_CAP`, naming the (first) field that is not a count."""
    name = next((name for name, value in (_caps(body) if isinstance(body, Mapping) else ())
                 if requested_max_tokens({"max_tokens": value}) == UNREADABLE_CAP),
                _CAP_NAMES[1])
    raise BadRequest(f"Invalid value for '{name}': must be a non-negative integer (the "
                     "most tokens the answer may use, reserved before the call).", param=name,
                     reason="invalid_max_tokens")


def usage_from_body(body: Any, model: str | None = None) -> Usage | None:
    """Usage reported in a JSON response body (OpenAI, Anthropic or Gemini shape), if any."""
    if type(body) is not dict and not isinstance(body, Mapping):
        return None
    usage = body.get("usage")
    if usage is None and "usageMetadata" in body:
        return _gemini_usage(body["usageMetadata"], model)
    return _usage_of(usage, body.get("model"), model)


def _gemini_usage(meta: Any, model: str | None) -> Usage | None:
    """Gemini's ``usageMetadata`` (``generateContent`` and each ``streamGenerateContent``
    chunk, counted so far): the prompt with its cached part and tool-use prompt, the
    candidates with the model's thinking (billed as output). The model stays the one the
    request named (the body's ``modelVersion`` is a version name no price table lists)."""
    if not isinstance(meta, Mapping):
        return None
    prompt = _int(meta.get("promptTokenCount")) + _int(meta.get("toolUsePromptTokenCount"))
    completion = _int(meta.get("candidatesTokenCount")) + _int(meta.get("thoughtsTokenCount"))
    if not completion:
        total = _int(meta.get("totalTokenCount"))
        if total > prompt:
            completion = total - prompt
    return _usage((prompt, completion, model, False))


def _usage_of(usage: Any, reported: Any, model: str | None) -> Usage | None:
    """A body's ``usage`` block read; the body's ``model``, when a string, names the model."""
    if type(usage) is not dict and not isinstance(usage, Mapping):
        return None
    if type(reported) is str or isinstance(reported, str):
        model = reported
    if "input_tokens" in usage or "output_tokens" in usage:  # Anthropic, OpenAI Responses
        prompt = (_int(usage.get("input_tokens")) + _int(usage.get("cache_creation_input_tokens"))
                  + _int(usage.get("cache_read_input_tokens")))
        return _usage((prompt, _int(usage.get("output_tokens")), model, False))
    # _int of each, without a call for a plain int
    found: Any = usage.get("prompt_tokens")
    prompt = found if type(found) is int and found >= 0 else _int(found)
    found = usage.get("completion_tokens")
    completion = found if type(found) is int and found >= 0 else _int(found)
    if not completion:
        total = _int(usage.get("total_tokens"))
        if total > prompt:
            completion = total - prompt
    return _usage((prompt, completion, model, False))


#: The scanner ``json.loads`` ends up in (the default decoder's settings); set by
#: ``JSONDecoder.__init__``, which the type stubs do not declare.
_scan_once: Callable[[str, int], tuple[Any, int]] = (
    json.JSONDecoder().scan_once)  # type: ignore[attr-defined]
_skip_space = re.compile(r"[ \t\n\r]*").match
_SPACE = " \t\n\r"
_SPACE_BYTES = b" \t\n\r"
#: Bodies this long or longer are read from their end first (:func:`usage_from_json`):
#: below it, parsing the whole body costs no more than reading its end does.
TAIL_READ_MIN_BYTES = 1024
#: How far before ``usage`` the tail read looks for a ``model`` member after the choices.
_MODEL_NEAR_USAGE = 512
#: What :func:`_usage_from_tail` and :func:`usage_from_object` answer when they cannot tell.
UNDECIDED: Any = object()


def usage_from_json(data: bytes, model: str | None = None) -> Usage | None:
    """``usage_from_body(json.loads(data), model)`` for a response body, ``None`` when the
    body is not JSON (or has no usage). A body without the bytes ``"usage"`` is not parsed.

    A body that starts with ``{`` followed by a non-zero byte is read as UTF-8, as
    ``json.loads`` reads it. One of :data:`TAIL_READ_MIN_BYTES` or more is first read from
    its end (:func:`_usage_from_tail`): the completion before the ``usage`` member is not
    parsed, so reading the usage of a long answer costs what a short one's does. Otherwise
    it goes straight to the scanner ``json.loads`` uses, without its encoding detection and
    whitespace matches; trailing data other than JSON whitespace is refused as
    ``json.loads`` refuses it. Anything else goes through ``json.loads``.
    """
    at = data.rfind(b'"usage"')
    if at < 0:
        if b'"usageMetadata"' not in data:
            return None
        try:  # Gemini: parsed whole (no tail read)
            return usage_from_body(json.loads(data), model)
        except ValueError:
            return None
    try:
        if data[:1] == b"{" and data[1:2] != b"\x00":
            if len(data) >= TAIL_READ_MIN_BYTES:
                if not data.isascii():
                    data.decode("utf-8", "surrogatepass")  # not UTF-8: not JSON
                usage = _usage_from_tail(data, at, model)
                if usage is not UNDECIDED:
                    return usage
            text = data.decode("utf-8", "surrogatepass")
            body, end = _scan_once(text, 0)
            if end != len(text) and text[end:].strip(_SPACE):
                return None  # json.loads: "Extra data"
        else:
            body = json.loads(data)
    except (ValueError, StopIteration):
        return None
    if type(body) is dict:  # usage_from_body(body, model), inline
        return _usage_of(body.get("usage"), body.get("model"), model)
    return usage_from_body(body, model)


#: ``{str}``: a dict whose keys' types it is a superset of has only exact ``str`` keys.
_ONLY_STR = frozenset((str,))
#: The Anthropic-shaped usage block's members :func:`_usage_of` reads.
_ANTHROPIC_NAMES = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                    "cache_read_input_tokens")


def usage_from_object(obj: Any, model: str | None = None) -> Any:
    """What :func:`usage_from_json` answers for the JSON text Python's :mod:`json` writes
    for ``obj`` (any options, any ``default``), read from ``obj`` itself when that can be
    told without writing it; otherwise :data:`UNDECIDED`.

    Told: a list (a JSON array has no usage); a dict whose keys are all ``str`` (no two
    members can then share a name: a ``str`` subclass could write a second ``usage``) and
    whose ``usage`` is absent or ``None``, or a dict with ``str`` keys whose counts read
    are ``int`` or ``None`` (written and read back as they are), and whose ``model`` is a
    ``str`` or ``None``. Anything ``default`` would convert (a ``Decimal``, a mapping that
    is not a dict...) is left to the written text. (:func:`_usage_of`, with those checks.)
    """
    if type(obj) is not dict:
        return None if type(obj) is list else UNDECIDED
    if not _ONLY_STR.issuperset(map(type, obj)):  # a key not exactly ``str`` (a C loop)
        return UNDECIDED
    usage = obj.get("usage")
    if usage is None:
        return UNDECIDED if "usageMetadata" in obj else None  # Gemini: read from the text
    if type(usage) is not dict or not _ONLY_STR.issuperset(map(type, usage)):
        return UNDECIDED
    reported = obj.get("model")
    if reported is not None:
        if type(reported) is not str:
            return UNDECIDED
        model = reported
    if "input_tokens" in usage or "output_tokens" in usage:  # Anthropic, OpenAI Responses
        for name in _ANTHROPIC_NAMES:
            found = usage.get(name)
            if found is not None and type(found) is not int:
                return UNDECIDED
        return _usage_of(usage, reported, model)
    prompt = usage.get("prompt_tokens")
    if type(prompt) is not int:
        if prompt is not None:
            return UNDECIDED
        prompt = 0
    elif prompt < 0:
        prompt = 0
    completion = usage.get("completion_tokens")
    if type(completion) is not int:
        if completion is not None:
            return UNDECIDED
        completion = 0
    elif completion < 0:
        completion = 0
    if not completion:
        total = usage.get("total_tokens")
        if type(total) is not int:
            if total is not None:
                return UNDECIDED
        elif total > prompt:
            completion = total - prompt
    return _usage((prompt, completion, model, False))


def _usage_from_tail(data: bytes, at: int, model: str | None) -> Any:
    """The usage of the UTF-8 JSON object ``data`` when the bytes ``"usage"`` at ``at``
    (their last occurrence) name one of its top-level members, read without parsing the
    members before that one; :data:`UNDECIDED` when this cannot be told from the tail.

    Why that is what ``json.loads`` answers for a JSON text: an unescaped ``"`` cannot occur
    inside a string, so ``"usage"`` after ``{`` or ``,`` and before ``:`` starts a member;
    its value and what follows it, read as the members of one more object (or a lone
    ``}``), close exactly one level: the top one. No later member is called ``usage``
    (these are the last such bytes); a later ``model`` member is in what follows, an
    earlier one is read from the last one on when it is close before ``usage``
    (:func:`_last_top_level_model`), else from the text before the first one
    (:func:`_top_level_model`). Not checked: the syntax of the members between the choices
    (or content) and the text those read — a body malformed only there yields the usage
    it reports where ``json.loads`` would refuse it —, and in the second case a repeated
    top-level ``model`` member: the first one's value names the model where ``json.loads``
    keeps the last (RFC 8259 leaves repeated names to the reader; finding out would mean
    scanning the whole completion).
    """
    try:
        before = at - 1
        while data[before] in _SPACE_BYTES:
            before -= 1
        if data[before] != 44 and data[before] != 123:  # "," or "{"
            return UNDECIDED
        tail = data[at + 7:].decode("utf-8", "surrogatepass")
        colon = tail.find(":")
        if colon < 0 or colon and tail[:colon].strip(_SPACE):
            return UNDECIDED
        start = colon + 1
        if tail[start] in _SPACE:
            start = _skip_space(tail, start).end()  # type: ignore[union-attr]  # ``*`` matches
        usage, end = _scan_once(tail, start)
        after = tail[end:].lstrip(_SPACE)
        if after[:1] == "}":
            if after[1:].strip(_SPACE):
                return UNDECIDED  # a nested "usage", or extra data: parse it all
            rest: dict[str, Any] = {}
        elif after[:1] == ",":
            more = "{" + after[1:].lstrip(_SPACE)
            if more[1:2] != '"':
                return UNDECIDED
            rest, close = _scan_once(more, 0)
            if close != len(more) and more[close:].strip(_SPACE):
                return UNDECIDED
        else:
            return UNDECIDED
        if "model" in rest:
            return _usage_of(usage, rest["model"], model)
        if type(usage) is not dict:
            return None
        named = data.rfind(b'"model"', max(1, at - _MODEL_NEAR_USAGE), at)
        if named >= 0:  # the last one, after the choices (as Flask's jsonify sorts keys)
            reported = _last_top_level_model(data, named)
        else:  # before the choices, as providers send it
            named = data.find(b'"model"', 1, at)
            if named < 0:
                return _usage_of(usage, None, model)
            reported = _top_level_model(data, named)
    except (ValueError, StopIteration, IndexError):
        return UNDECIDED
    return reported if reported is UNDECIDED else _usage_of(usage, reported, model)


def _last_top_level_model(data: bytes, named: int) -> Any:
    """The value of the member named by the last bytes ``"model"`` before ``usage`` (at
    ``named``) when it is a top-level member: the text from there to the end, opened by a
    ``{``, reads as one whole object only then. Otherwise :data:`UNDECIDED`."""
    text = "{" + data[named:].decode("utf-8", "surrogatepass")
    members, end = _scan_once(text, 0)
    if end != len(text) and text[end:].strip(_SPACE):
        return UNDECIDED
    return members.get("model", UNDECIDED)


def _top_level_model(data: bytes, named: int) -> Any:
    """The value of the member named by the first bytes ``"model"`` (at ``named``) when it
    is a string without escapes and the text before it is the top-level object's first
    members; otherwise :data:`UNDECIDED`.

    The text up to that string, closed by a ``}``, reads as one whole object only when the
    member is a top-level one."""
    value = data.find(b":", named + 7) + 1
    while data[value] in _SPACE_BYTES:
        value += 1
    if data[value] != 34:  # '"'
        return UNDECIDED
    close = data.index(b'"', value + 1) + 1
    if data.find(b"\\", value, close) >= 0:
        return UNDECIDED
    head = data[:close].decode("utf-8", "surrogatepass") + "}"
    members, end = _scan_once(head, 0)
    if end != len(head) or "model" not in members:
        return UNDECIDED
    return members["model"]


class StreamUsage:
    """Reads server-sent events as they pass and keeps the usage they report.

    Most events of a stream are text deltas: an event that cannot report usage (every
    ``"usage"`` in it followed by ``null``, no Anthropic ``message_delta``) is kept as it
    came and parsed only if the stream's result needs it — for the text it adds when the
    stream reports no usage, or for the model it names when it is the last to name one. A
    stream that reports its usage (OpenAI's ``stream_options.include_usage``, Anthropic,
    Gemini, the Responses API's ``response.completed``)
    thus parses the events that carry usage, not the text's. Kept events are parsed at
    once when they pass :data:`_MAX_KEPT_BYTES`.
    """

    def __init__(self, model: str | None, prompt_estimate: int) -> None:
        self.model = model
        self.prompt_estimate = prompt_estimate
        self._buffer = b""
        self._prompt = 0
        self._completion = 0
        self._reported = False
        self._text_chars = 0
        #: Events not parsed yet (they can only add text or name the model), in order.
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        #: Kept events before this index are older than the last parsed event that named
        #: the model: their model no longer counts.
        self._model_from = 0

    def feed(self, chunk: bytes | str) -> None:
        if type(chunk) is not bytes:
            chunk = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
        if not self._buffer and len(chunk) > 1 and chunk.find(b"\n\n") == len(chunk) - 2:
            self._take(chunk[:-2])  # one whole event, as most servers send them
            return
        self._buffer += chunk
        while True:
            end = self._find_event_end()
            if end is None:
                if len(self._buffer) > _MAX_EVENT_BYTES:  # not SSE, or a runaway event
                    self._buffer = b""
                return
            event, self._buffer = self._buffer[:end[0]], self._buffer[end[1]:]
            self._take(event)

    def _take(self, event: bytes) -> None:
        """Keep an event that can only add text or name the model; parse any other now."""
        if _adds_text_or_model_only(event):
            if self._reported and b'"model"' not in event:
                return  # its text no longer counts, and it names no model
            self._kept.append(event)
            self._kept_bytes += len(event)
            if self._kept_bytes > _MAX_KEPT_BYTES:
                self._parse_kept()
        elif self._event(event):
            self._model_from = len(self._kept)

    def _find_event_end(self) -> tuple[int, int] | None:
        for separator in (b"\n\n", b"\r\n\r\n"):
            index = self._buffer.find(separator)
            if index >= 0:
                return index, index + len(separator)
        return None

    def _parse_kept(self) -> None:
        """Parse the kept events in order (a model they name counts only where no later
        parsed event named one)."""
        kept, model_from = self._kept, self._model_from
        self._kept, self._kept_bytes, self._model_from = [], 0, 0
        for index, event in enumerate(kept):
            model = self.model
            if self._event(event) and index < model_from:
                self.model = model

    def _event(self, raw: bytes) -> bool:
        """Apply one event; whether it named the model."""
        data = b"\n".join(line[5:].strip() for line in raw.splitlines()
                          if line.startswith(b"data:"))
        if not data or data == b"[DONE]":
            return False
        try:
            payload = json.loads(data)
        except ValueError:
            return False
        if not isinstance(payload, Mapping):
            return False
        kind = payload.get("type")
        if kind == "message_start":  # Anthropic
            message = payload.get("message") or {}
            usage = message.get("usage") or {}
            self._prompt = max(self._prompt, (
                _int(usage.get("input_tokens")) + _int(usage.get("cache_creation_input_tokens"))
                + _int(usage.get("cache_read_input_tokens"))))
            self._completion = max(self._completion, _int(usage.get("output_tokens")))
            self._reported = self._reported or bool(self._prompt)
            if isinstance(message.get("model"), str):
                self.model = message["model"]
                return True
            return False
        if kind == "message_delta":
            usage = payload.get("usage") or {}
            self._completion = max(self._completion, _int(usage.get("output_tokens")))
            self._reported = True
            return False
        if kind == "content_block_delta":
            self._text_chars += _text_length((payload.get("delta") or {}).get("text"))
            return False
        if type(kind) is str and kind.startswith("response."):  # OpenAI Responses API
            if kind == "response.output_text.delta":
                self._text_chars += _text_length(payload.get("delta"))
                return False
            inner = payload.get("response")  # created, completed, incomplete, failed
            if not isinstance(inner, Mapping):
                return False
            reported = usage_from_body(inner, self.model)
            if reported is not None:
                self._prompt = reported.prompt_tokens
                self._completion = reported.completion_tokens
                self._reported = True
            if isinstance(inner.get("model"), str):
                self.model = inner["model"]
                return True
            return False
        reported = usage_from_body(payload, self.model)
        if reported is not None:
            self._prompt, self._completion = reported.prompt_tokens, reported.completion_tokens
            self._reported = True
        for choice in payload.get("choices") or ():
            if isinstance(choice, Mapping):
                delta = choice.get("delta") or {}
                self._text_chars += (_text_length(delta.get("content")) if isinstance(
                    delta, Mapping) else 0) + _text_length(choice.get("text"))
        candidates = payload.get("candidates")  # Gemini: each chunk's new text
        if type(candidates) is list:
            for candidate in candidates:
                content = candidate.get("content") if isinstance(candidate, Mapping) else None
                if isinstance(content, Mapping):
                    self._text_chars += _text_length(content.get("parts"))
        if isinstance(payload.get("model"), str):
            self.model = payload["model"]
            return True
        return False

    def result(self) -> Usage:
        """What the stream reported, or an estimate of what it delivered so far."""
        if self._reported:  # only the model of the kept events may still count
            kept = self._kept[self._model_from:]
            self._kept, self._kept_bytes, self._model_from = [], 0, 0
            for event in reversed(kept):  # one without the bytes "model" names none
                if b'"model"' in event and self._event(event):
                    break
            return Usage(self._prompt or self.prompt_estimate, self._completion, self.model)
        self._parse_kept()
        return Usage(self.prompt_estimate, math.ceil(self._text_chars / CHARS_PER_TOKEN),
                     self.model, estimated=True)


#: Kept stream events are parsed once they hold this many bytes (a stream's memory bound).
_MAX_KEPT_BYTES = 1 << 20


def _adds_text_or_model_only(event: bytes) -> bool:
    """Whether an event can only add text or name the model: it is no Anthropic
    ``message_delta`` (which marks the usage reported), has no Gemini ``usageMetadata``
    and every ``"usage"`` in it is
    followed by ``null`` (an unescaped ``"`` cannot occur inside a JSON string, so these
    bytes are the only way to write a member called ``usage``)."""
    if b'"message_delta"' in event or b'"usageMetadata"' in event:  # Anthropic, Gemini
        return False
    at = event.find(b'"usage"')
    while at >= 0:
        if not event[at + 7:at + 24].lstrip(b" \t:").startswith(b"null"):
            return False
        at = event.find(b'"usage"', at + 7)
    return True

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
from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

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


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text(part.get("text")) if isinstance(part, Mapping) else _text(part)
                        for part in content)
    return ""


def estimate_prompt_tokens(body: Mapping[str, Any] | None) -> int:
    """A request's prompt size in tokens (messages, prompt, input or system text).

    The estimate is the length of the text ``" ".join`` of the messages' contents, 12
    characters of framing per message, then ``prompt``, ``input`` and ``system``, at
    :data:`CHARS_PER_TOKEN`; only the length is computed.
    """
    if type(body) is not dict and not isinstance(body, Mapping):
        return 0
    length = _messages_length(body.get("messages")) + _other_text_length(body)
    return math.ceil(length / CHARS_PER_TOKEN) if length else 0


def _messages_length(messages: Any) -> int:
    if type(messages) is not list and not isinstance(messages, list):
        return 0
    length = joined = 0  # joined: messages that take part in the join (mappings)
    for message in messages:
        if type(message) is dict or isinstance(message, Mapping):
            content = message.get("content")
            length += len(content) if type(content) is str else len(_text(content))
            joined += 1
    return length + max(joined - 1, 0) + 12 * len(messages)  # separators, framing


def _other_text_length(body: Mapping[str, Any]) -> int:
    length = 0
    for name in ("prompt", "input", "system"):
        value = body.get(name)
        if isinstance(value, str):
            length += len(value)
        elif isinstance(value, list):
            length += len(_text(value) if value and isinstance(value[0], Mapping) else " ".join(
                str(v) for v in value))
    return length


_CAP_NAMES = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def requested_max_tokens(body: Mapping[str, Any] | None) -> int | None:
    """The completion cap a request asks for (``max_tokens``/``max_completion_tokens``)."""
    if type(body) is not dict and not isinstance(body, Mapping):
        return None
    for name in _CAP_NAMES:
        value = _int(body.get(name))
        if value:
            return value
    return None


def body_sizes(body: Any) -> tuple[int, int]:
    """``(estimate_prompt_tokens(body), requested_max_tokens(body) or 0)``, in one pass
    that reads only the fields a JSON object has (a request's guards all need both)."""
    if type(body) is not dict:
        return estimate_prompt_tokens(body), requested_max_tokens(body) or 0
    messages = body.get("messages")
    length = 0 if messages is None else _messages_length(messages)
    if "prompt" in body or "input" in body or "system" in body:
        length += _other_text_length(body)
    cap = 0
    for name in _CAP_NAMES:
        value = body.get(name)
        if value is not None:
            value = value if type(value) is int else _int(value)
            if value > 0:
                cap = value
                break
    return -(-length // CHARS_PER_TOKEN), cap  # the ceiling, as estimate_prompt_tokens


def usage_from_body(body: Any, model: str | None = None) -> Usage | None:
    """Usage reported in a JSON response body (OpenAI or Anthropic shape), if any."""
    if type(body) is not dict and not isinstance(body, Mapping):
        return None
    usage = body.get("usage")
    if type(usage) is not dict and not isinstance(usage, Mapping):
        return None
    reported = body.get("model")
    if type(reported) is str or isinstance(reported, str):
        model = reported
    if "input_tokens" in usage or "output_tokens" in usage:  # Anthropic, OpenAI Responses
        prompt = (_int(usage.get("input_tokens")) + _int(usage.get("cache_creation_input_tokens"))
                  + _int(usage.get("cache_read_input_tokens")))
        return _usage((prompt, _int(usage.get("output_tokens")), model, False))
    prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    if not completion:
        total = _int(usage.get("total_tokens"))
        if total > prompt:
            completion = total - prompt
    return _usage((prompt, completion, model, False))


#: The scanner ``json.loads`` ends up in (the default decoder's settings).
_scan_once = json.JSONDecoder().scan_once


def usage_from_json(data: bytes, model: str | None = None) -> Usage | None:
    """``usage_from_body(json.loads(data), model)`` for a response body, ``None`` when the
    body is not JSON (or has no usage). A body without the bytes ``"usage"`` is not parsed.

    A body that starts with ``{`` followed by a non-zero byte (which ``json.loads`` reads
    as UTF-8) goes straight to the scanner ``json.loads`` uses, without its encoding
    detection and whitespace matches; trailing data other than JSON whitespace is refused
    as ``json.loads`` refuses it. Anything else goes through ``json.loads``.
    """
    if b'"usage"' not in data:
        return None
    try:
        if data[:1] == b"{" and data[1:2] != b"\x00":
            text = data.decode("utf-8", "surrogatepass")
            body, end = _scan_once(text, 0)
            if end != len(text) and text[end:].strip(" \t\n\r"):
                return None  # json.loads: "Extra data"
        else:
            body = json.loads(data)
    except (ValueError, StopIteration):
        return None
    return usage_from_body(body, model)


class StreamUsage:
    """Reads server-sent events as they pass and keeps the usage they report."""

    def __init__(self, model: str | None, prompt_estimate: int) -> None:
        self.model = model
        self.prompt_estimate = prompt_estimate
        self._buffer = b""
        self._prompt = 0
        self._completion = 0
        self._reported = False
        self._text_chars = 0

    def feed(self, chunk: bytes | str) -> None:
        if isinstance(chunk, str):
            chunk = chunk.encode()
        self._buffer += chunk
        while True:
            end = self._find_event_end()
            if end is None:
                if len(self._buffer) > _MAX_EVENT_BYTES:  # not SSE, or a runaway event
                    self._buffer = b""
                return
            event, self._buffer = self._buffer[:end[0]], self._buffer[end[1]:]
            self._event(event)

    def _find_event_end(self) -> tuple[int, int] | None:
        for separator in (b"\n\n", b"\r\n\r\n"):
            index = self._buffer.find(separator)
            if index >= 0:
                return index, index + len(separator)
        return None

    def _event(self, raw: bytes) -> None:
        data = b"\n".join(line[5:].strip() for line in raw.splitlines()
                          if line.startswith(b"data:"))
        if not data or data == b"[DONE]":
            return
        try:
            payload = json.loads(data)
        except ValueError:
            return
        if not isinstance(payload, Mapping):
            return
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
            return
        if kind == "message_delta":
            usage = payload.get("usage") or {}
            self._completion = max(self._completion, _int(usage.get("output_tokens")))
            self._reported = True
            return
        if kind == "content_block_delta":
            self._text_chars += len(_text((payload.get("delta") or {}).get("text")))
            return
        reported = usage_from_body(payload, self.model)
        if reported is not None:
            self._prompt, self._completion = reported.prompt_tokens, reported.completion_tokens
            self._reported = True
        for choice in payload.get("choices") or ():
            if isinstance(choice, Mapping):
                delta = choice.get("delta") or {}
                self._text_chars += len(_text(delta.get("content")) if isinstance(
                    delta, Mapping) else "") + len(_text(choice.get("text")))
        if isinstance(payload.get("model"), str):
            self.model = payload["model"]

    def result(self) -> Usage:
        """What the stream reported, or an estimate of what it delivered so far."""
        if self._reported:
            return Usage(self._prompt or self.prompt_estimate, self._completion, self.model)
        return Usage(self.prompt_estimate, math.ceil(self._text_chars / CHARS_PER_TOKEN),
                     self.model, estimated=True)

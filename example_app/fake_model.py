"""A deterministic stand-in for an LLM: same input, same output, realistic ``usage``.

Token counts are estimated as ``ceil(characters / 4)`` (at least one per message), the
rule of thumb OpenAI documents, so usage grows with the prompt like a real model's.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

EMBEDDING_DIMENSIONS = 16


def count_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _utf8(text: str) -> bytes:
    """``text`` as bytes, lone surrogates included (JSON's ``"\\ud800"`` brings one)."""
    return text.encode("utf-8", "surrogatepass")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return ""


def prompt_tokens(messages: list[Any]) -> int:
    return sum(count_tokens(_text_of(m.get("content"))) + 3 for m in messages
               if isinstance(m, Mapping)) + 3


def reply_text(model: str, prompt: str, max_tokens: int | None) -> str:
    digest = hashlib.sha256(_utf8(f"{model}\n{prompt}")).hexdigest()[:8]
    text = f"Hello from {model}. You said: {prompt[:200]} [{digest}]"
    if max_tokens is not None:
        text = text[: max(4, max_tokens * 4)]
    return text


def _request_id(kind: str, body: Mapping[str, Any]) -> str:
    return f"{kind}-" + hashlib.sha256(repr(sorted(body.items())).encode()).hexdigest()[:24]


def chat_completion(body: Mapping[str, Any]) -> dict[str, Any]:
    messages = body.get("messages") or []
    prompt = _text_of(messages[-1].get("content")) if messages else ""
    text = reply_text(body["model"], prompt, body.get("max_tokens"))
    usage_in, usage_out = prompt_tokens(messages), count_tokens(text)
    return {
        "id": _request_id("chatcmpl", body),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": usage_in, "completion_tokens": usage_out,
                  "total_tokens": usage_in + usage_out},
    }


def chat_completion_chunks(body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The same answer as :func:`chat_completion`, as streaming chunks."""
    full = chat_completion(body)
    base = {"id": full["id"], "object": "chat.completion.chunk", "created": full["created"],
            "model": full["model"]}
    text = full["choices"][0]["message"]["content"]
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None}]}
    for start in range(0, len(text), 16):
        yield {**base, "choices": [{"index": 0, "delta": {"content": text[start:start + 16]},
                                    "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    if (body.get("stream_options") or {}).get("include_usage"):
        yield {**base, "choices": [], "usage": full["usage"]}


def completion(body: Mapping[str, Any]) -> dict[str, Any]:
    prompt = body.get("prompt") or ""
    prompt = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    text = reply_text(body["model"], prompt, body.get("max_tokens"))
    usage_in, usage_out = count_tokens(prompt), count_tokens(text)
    return {
        "id": _request_id("cmpl", body), "object": "text_completion",
        "created": int(time.time()), "model": body["model"],
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": usage_in, "completion_tokens": usage_out,
                  "total_tokens": usage_in + usage_out},
    }


def embeddings(body: Mapping[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    data, tokens = [], 0
    for index, item in enumerate(items):
        text = str(item)
        tokens += count_tokens(text)
        digest = hashlib.sha256(_utf8(text)).digest()
        vector = [round((b - 128) / 128, 6) for b in digest[:EMBEDDING_DIMENSIONS]]
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {"object": "list", "data": data, "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def anthropic_message(body: Mapping[str, Any]) -> dict[str, Any]:
    messages = body.get("messages") or []
    prompt = _text_of(messages[-1].get("content")) if messages else ""
    text = reply_text(body["model"], prompt, body.get("max_tokens"))
    return {
        "id": _request_id("msg", body), "type": "message", "role": "assistant",
        "model": body["model"], "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens(messages), "output_tokens": count_tokens(text)},
    }


def anthropic_events(body: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The same answer as :func:`anthropic_message`, as Anthropic SSE events."""
    full = anthropic_message(body)
    text = full["content"][0]["text"]
    start = {**full, "content": [], "stop_reason": None,
             "usage": {"input_tokens": full["usage"]["input_tokens"], "output_tokens": 1}}
    yield "message_start", {"type": "message_start", "message": start}
    yield "content_block_start", {"type": "content_block_start", "index": 0,
                                  "content_block": {"type": "text", "text": ""}}
    for offset in range(0, len(text), 16):
        yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta",
                                                "text": text[offset:offset + 16]}}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield "message_delta", {"type": "message_delta",
                            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                            "usage": {"output_tokens": full["usage"]["output_tokens"]}}
    yield "message_stop", {"type": "message_stop"}

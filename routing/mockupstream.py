"""A fake OpenAI-compatible upstream provider over real HTTP (`manage.py mockupstream`).

The gateway's tests, its demo and its benchmarks point their provider base URLs at this
server. It is an aiohttp application on one asyncio loop (no threads), light enough to
hold hundreds of slow SSE streams, and fully deterministic: the same request always gets
the same content and usage (only `id` and `created` change).

Routes (PREFIX is "" or one of /openai, /deepseek, /qwen, /kimi, /glm, which picks the
provider style; "" uses the `--style` default):

    POST PREFIX/v1/chat/completions
    GET  PREFIX/v1/models
    GET  /_mock/stats          counters, see `Stats`
    POST /_mock/stats/reset
    POST /_mock/faults         a JSON object of `mock` knobs applied to every chat request
                               from now on (a request's own knobs win); {} clears them.
                               Lets a test make one mock process slow or failing.

Run it with `manage.py mockupstream --port N` (options: --host, --port, --latency-ms,
--chunks, --interval-ms, --style, --api-key; see `add_arguments`) or, without Django,
`python -m routing.mockupstream`. It prints one line `mockupstream listening on
http://HOST:PORT` once bound (port 0 picks a free one) and stops on SIGTERM or SIGINT.
Every completion and every `status` answer carries an `x-request-id: req-mock-<n>` header.

Both API routes need `Authorization: Bearer <token>`: exactly `--api-key` when it is set,
otherwise any non-empty token. A failure is a 401 in the OpenAI error shape.

Per-request knobs: an optional object field `"mock"` in the request body. It is removed
before anything else and is never echoed back. Unknown keys are a 400. All keys optional:

    latency_ms    delay before a plain (or error) response; in a stream, between the
                  headers (and keep-alive comment) and the first chunk. CLI --latency-ms.
    chunks        number of content chunks in a stream (>= 1). CLI --chunks.
    interval_ms   delay before every reasoning and content chunk. CLI --interval-ms.
    style         openai | deepseek | qwen | kimi | glm; wins over the URL prefix.
    status        answer with this HTTP status (400-599) and an OpenAI-shaped error instead
                  of a completion. deepseek + 402 says "Insufficient Balance"; glm + 429
                  carries code "1113" (balance exhausted). The latency applies first.
    retry_after   seconds; adds a Retry-After header to the `status` answer.
    error_code    the `code` of the `status` answer's error (e.g. "insufficient_quota"),
                  instead of the status's own.
    error_param   the `param` of the `status` answer's error (e.g. "messages").
    cut_after     stream: after that many content chunks, abort the TCP connection (no
                  finishing chunk, no usage, no [DONE]); 0 cuts right after the role and
                  reasoning chunks, a value >= the content chunks cuts before the
                  finishing chunk. Plain request: any value closes the connection without
                  a response.
    error_after   stream: after that many content chunks, send `data: {"error": {...}}`
                  and end the stream (no [DONE]); a value >= the content chunks sends it
                  before the finishing chunk. `cut_after` wins when both trigger.
    end_after     stream: after that many content chunks, end the response cleanly (the
                  HTTP body complete) with no finishing chunk, no usage and no [DONE]:
                  a provider that stops early without saying so. A value above the
                  content chunks ends after the finishing (and usage) chunk, before
                  [DONE]. `cut_after` and `error_after` win at the same point.
    usage         object overriding any of prompt_tokens, completion_tokens,
                  cached_tokens, reasoning_tokens (total is always prompt + completion).
    reasoning     number of reasoning chunks (`delta.reasoning_content`) before the
                  content; plain answers get `message.reasoning_content`.
    echo_request  add top-level "mock_request" (the body minus "mock") to the plain answer
                  or to the first chunk of a stream.
    keepalive     stream: send a `: keep-alive` comment before the first chunk.

Content: "Mock reply: " followed by the words of the last user message (list content: its
text parts joined by a space; ASCII whitespace is normalised to single spaces). The words are
grouped into exactly `chunks` non-empty pieces; when there are fewer words than chunks,
words from `PAD_WORDS` are appended in turn. A plain answer's content is the concatenation
of the pieces a stream would send. `max_tokens` / `max_completion_tokens` smaller than
`chunks` keeps only that many pieces and finishes with "length" instead of "stop".
Reasoning pieces are "Thinking step 1. ", "Thinking step 2. ", ...

Usage (`compute_usage`), before `mock.usage` overrides:

    prompt_tokens     = max(1, sum over messages of (ASCII-whitespace words in its text + 3))
    completion_tokens = content pieces sent + reasoning chunks
    cached_tokens     = 0
    reasoning_tokens  = reasoning chunks
    total_tokens      = prompt_tokens + completion_tokens

Reasoning chunks = `mock.reasoning`; when it is absent and the style is qwen with
`"enable_thinking": true` in the body, `QWEN_THINKING_CHUNKS`; otherwise 0.

Where each style puts the usage (see `usage_payload` for the fields):

    openai, qwen   plain: top level. stream: only with stream_options.include_usage, as one
                   extra last chunk with "choices": [] after the finishing chunk; every
                   other chunk then carries "usage": null.
    deepseek       stream: top-level "usage" on the finishing chunk, always.
    kimi           stream: inside choices[0].usage of the finishing chunk, always.
    glm            stream: top-level "usage" on the finishing chunk, always. glm answers
                   lack "object" (and "logprobs"; plain messages lack "refusal").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

STYLES: tuple[str, ...] = ("openai", "deepseek", "qwen", "kimi", "glm")
PAD_WORDS: tuple[str, ...] = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")
QWEN_THINKING_CHUNKS = 3
MODELS: dict[str, tuple[str, ...]] = {
    "openai": ("gpt-4o-mini", "gpt-4o"),
    "deepseek": ("deepseek-chat", "deepseek-reasoner"),
    "qwen": ("qwen-plus", "qwen-max"),
    "kimi": ("kimi-k2-0905-preview", "moonshot-v1-8k"),
    "glm": ("glm-4.5", "glm-4-flash"),
}
MODELS_CREATED = 1_700_000_000  # fixed, so that /v1/models is deterministic
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")
KNOBS = frozenset(
    {
        "latency_ms",
        "chunks",
        "interval_ms",
        "style",
        "status",
        "retry_after",
        "error_code",
        "error_param",
        "cut_after",
        "error_after",
        "end_after",
        "usage",
        "reasoning",
        "echo_request",
        "keepalive",
    }
)

ERROR_TYPES: dict[int, tuple[str, str | None, str]] = {
    # status: (type, code, message)
    400: ("invalid_request_error", None, "Mock bad request."),
    401: ("authentication_error", "invalid_api_key", "Incorrect API key provided."),
    402: ("invalid_request_error", "insufficient_quota", "Payment required."),
    403: ("permission_error", None, "You are not allowed to use this model."),
    404: ("not_found_error", "model_not_found", "The model does not exist."),
    408: ("timeout_error", None, "Request timed out."),
    409: ("conflict_error", None, "Conflict."),
    422: ("invalid_request_error", None, "Unprocessable request."),
    429: ("rate_limit_error", "rate_limit_exceeded", "Rate limit reached, slow down."),
    500: ("server_error", None, "The server had an error processing your request."),
    503: ("server_error", "overloaded", "The server is overloaded, try again later."),
}

SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"


@dataclass(frozen=True)
class MockDefaults:
    """Server-wide defaults (the CLI options); `mock` knobs override them per request."""

    latency_ms: float = 0
    chunks: int = 5
    interval_ms: float = 0
    style: str = "openai"
    api_key: str | None = None


@dataclass
class Stats:
    """Counters served by /_mock/stats.

    Every started stream ends as exactly one of completed, aborted (the client closed the
    connection first), cut (`cut_after`), errored (`error_after`) or ended early
    (`end_after`), or is still open.
    """

    requests: int = 0  # API requests received (chat completions and models)
    streams_started: int = 0
    streams_completed: int = 0
    streams_aborted: int = 0
    streams_cut: int = 0
    streams_errored: int = 0
    streams_ended: int = 0
    streams_open: int = 0
    plain_cut: int = 0  # plain requests closed without an answer (`cut_after`)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class KnobError(ValueError):
    """A bad request (mock knob or body); becomes a 400 naming `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# --- Deterministic content and usage ---------------------------------------------------


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


# Words are split at ASCII whitespace only: Unicode separators (U+2028, U+0085, ...) stay
# inside a word, so a test can have the reply carry them.
_ASCII_SPACE = re.compile(r"[ \t\n\r\f\v]+")


def _words(text: str) -> list[str]:
    return [word for word in _ASCII_SPACE.split(text) if word]


def reply_pieces(messages: list[dict[str, Any]], chunks: int) -> list[str]:
    """The reply content split into exactly `chunks` non-empty pieces."""
    last_user = next(
        (m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
        None,
    )
    words = ["Mock", "reply:"]
    if last_user is not None:
        words += _words(message_text(last_user.get("content")))
    pad = itertools.cycle(PAD_WORDS)
    while len(words) < chunks:
        words.append(next(pad))
    # Spread the words evenly; the first `extra` pieces take one word more.
    base, extra = divmod(len(words), chunks)
    pieces: list[str] = []
    start = 0
    for index in range(chunks):
        size = base + (1 if index < extra else 0)
        piece = " ".join(words[start : start + size])
        pieces.append(piece if index == 0 else " " + piece)
        start += size
    return pieces


def reasoning_pieces(count: int) -> list[str]:
    return [f"Thinking step {n}. " for n in range(1, count + 1)]


def compute_usage(
    messages: list[dict[str, Any]],
    content_chunks: int,
    reasoning_chunks: int = 0,
    overrides: Mapping[str, int] | None = None,
) -> Usage:
    """The usage of an answer; the formula is in the module docstring."""
    prompt = sum(
        len(_words(message_text(m.get("content")))) + 3 for m in messages if isinstance(m, dict)
    )
    values = {
        "prompt_tokens": max(1, prompt),
        "completion_tokens": content_chunks + reasoning_chunks,
        "cached_tokens": 0,
        "reasoning_tokens": reasoning_chunks,
    }
    values.update(overrides or {})
    return Usage(**values)


def usage_payload(usage: Usage, style: str) -> dict[str, Any]:
    """The usage object in the shape one provider style sends."""
    payload: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if style == "kimi":
        payload["cached_tokens"] = usage.cached_tokens
    payload["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    # OpenAI and DeepSeek always send the reasoning count; the others only when thinking.
    if style in ("openai", "deepseek") or usage.reasoning_tokens:
        payload["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    if style == "deepseek":
        payload["prompt_cache_hit_tokens"] = usage.cached_tokens
        payload["prompt_cache_miss_tokens"] = max(0, usage.prompt_tokens - usage.cached_tokens)
    return payload


# --- Errors ----------------------------------------------------------------------------


def error_body(
    status: int,
    style: str = "openai",
    message: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """An OpenAI-shaped error object for one status, with the provider quirks; `code`
    replaces the status's own."""
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    if status > 500 and status != 503:
        default_type = "api_error"
    error_type, own_code, default_message = ERROR_TYPES.get(
        status, (default_type, None, f"Mock upstream error {status}.")
    )
    if style == "deepseek" and status == 402:
        error_type, own_code = "unknown_error", "invalid_request_error"
        default_message = "Insufficient Balance"
    elif style == "glm" and status == 429:
        # Zhipu's "balance exhausted": a 429 that waiting does not fix.
        error_type, own_code = "rate_limit_error", "1113"
        default_message = "Insufficient account balance or no resource package; please recharge."
    return {
        "error": {
            "message": message or default_message,
            "type": error_type,
            "param": param,
            "code": own_code if code is None else code,
        }
    }


def error_response(
    status: int,
    style: str = "openai",
    message: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
    code: str | None = None,
) -> web.Response:
    return web.json_response(
        error_body(status, style, message, param, code),
        status=status,
        headers=headers,
        dumps=_dumps,
    )


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# --- Request parsing -------------------------------------------------------------------


@dataclass
class Plan:
    """Everything one chat completion request asks for, validated."""

    body: dict[str, Any]  # the request body without "mock"
    model: str
    messages: list[dict[str, Any]]
    style: str
    stream: bool
    include_usage: bool
    latency_s: float
    interval_s: float
    content_pieces: list[str]
    reasoning_pieces: list[str]
    finish_reason: str
    usage: Usage
    status: int | None = None
    retry_after: float | None = None
    error_code: str | None = None
    error_param: str | None = None
    cut_after: int | None = None
    error_after: int | None = None
    end_after: int | None = None
    echo_request: bool = False
    keepalive: bool = False


def _int_knob(
    knobs: Mapping[str, Any], key: str, minimum: int = 0, where: str = "mock."
) -> int | None:
    value = knobs.get(key)
    if value is None:
        return None
    # bool is an int in Python; true/false is never a valid count.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise KnobError(f"{where}{key} must be an integer >= {minimum}", f"{where}{key}")
    return value


def _number_knob(knobs: Mapping[str, Any], key: str) -> float | None:
    value = knobs.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise KnobError(f"mock.{key} must be a number >= 0", f"mock.{key}")
    return float(value)


def _str_knob(knobs: Mapping[str, Any], key: str) -> str | None:
    value = knobs.get(key)
    if value is not None and not isinstance(value, str):
        raise KnobError(f"mock.{key} must be a string", f"mock.{key}")
    return value


def _bool_knob(knobs: Mapping[str, Any], key: str) -> bool:
    value = knobs.get(key, False)
    if not isinstance(value, bool):
        raise KnobError(f"mock.{key} must be a boolean", f"mock.{key}")
    return value


def _usage_knob(knobs: Mapping[str, Any]) -> dict[str, int]:
    value = knobs.get("usage")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise KnobError("mock.usage must be an object", "mock.usage")
    unknown = sorted(set(value) - set(USAGE_KEYS))
    if unknown:
        raise KnobError(f"unknown mock.usage keys: {', '.join(unknown)}", "mock.usage")
    return {
        key: n for key in value if (n := _int_knob(value, key, where="mock.usage.")) is not None
    }


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    """The smaller of max_tokens and max_completion_tokens, when either is given."""
    limits = [
        n
        for key in ("max_tokens", "max_completion_tokens")
        if (n := _int_knob(body, key, minimum=1, where="")) is not None
    ]
    return min(limits) if limits else None


def build_plan(body: dict[str, Any], prefix_style: str | None, defaults: MockDefaults) -> Plan:
    """Validate the body and its knobs; raises KnobError for a 400."""
    knobs = body.pop("mock", None)
    if knobs is None:
        knobs = {}
    if not isinstance(knobs, dict):
        raise KnobError("mock must be an object", "mock")
    unknown = sorted(set(knobs) - KNOBS)
    if unknown:
        raise KnobError(f"unknown mock knobs: {', '.join(unknown)}", "mock")

    style = knobs.get("style", prefix_style or defaults.style)
    if style not in STYLES:
        raise KnobError(f"mock.style must be one of {', '.join(STYLES)}", "mock.style")

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise KnobError("you must provide a model parameter", "model")
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        raise KnobError("messages must be a non-empty array of objects", "messages")

    chunks = _int_knob(knobs, "chunks", minimum=1) or defaults.chunks
    reasoning = _int_knob(knobs, "reasoning")
    if reasoning is None:
        thinking = style == "qwen" and body.get("enable_thinking") is True
        reasoning = QWEN_THINKING_CHUNKS if thinking else 0
    pieces = reply_pieces(messages, chunks)
    finish_reason = "stop"
    limit = _max_tokens(body)
    if limit is not None and limit < len(pieces):
        pieces = pieces[:limit]
        finish_reason = "length"

    status = _int_knob(knobs, "status", minimum=400)
    if status is not None and status > 599:
        raise KnobError("mock.status must be an HTTP error status (400-599)", "mock.status")
    latency = _number_knob(knobs, "latency_ms")
    interval = _number_knob(knobs, "interval_ms")
    stream_options = body.get("stream_options")
    return Plan(
        body=body,
        model=model,
        messages=messages,
        style=style,
        stream=body.get("stream") is True,
        include_usage=isinstance(stream_options, dict)
        and stream_options.get("include_usage") is True,
        latency_s=(defaults.latency_ms if latency is None else latency) / 1000,
        interval_s=(defaults.interval_ms if interval is None else interval) / 1000,
        content_pieces=pieces,
        reasoning_pieces=reasoning_pieces(reasoning),
        finish_reason=finish_reason,
        usage=compute_usage(messages, len(pieces), reasoning, _usage_knob(knobs)),
        status=status,
        retry_after=_number_knob(knobs, "retry_after"),
        error_code=_str_knob(knobs, "error_code"),
        error_param=_str_knob(knobs, "error_param"),
        cut_after=_int_knob(knobs, "cut_after"),
        error_after=_int_knob(knobs, "error_after"),
        end_after=_int_knob(knobs, "end_after"),
        echo_request=_bool_knob(knobs, "echo_request"),
        keepalive=_bool_knob(knobs, "keepalive"),
    )


# --- Responses -------------------------------------------------------------------------


def plain_completion(plan: Plan, completion_id: str, created: int) -> dict[str, Any]:
    glm = plan.style == "glm"
    message: dict[str, Any] = {"role": "assistant", "content": "".join(plan.content_pieces)}
    if not glm:
        message["refusal"] = None
    if plan.reasoning_pieces:
        message["reasoning_content"] = "".join(plan.reasoning_pieces)
    choice: dict[str, Any] = {"index": 0, "message": message}
    if not glm:
        choice["logprobs"] = None
    choice["finish_reason"] = plan.finish_reason
    answer: dict[str, Any] = {"id": completion_id}
    if not glm:
        answer["object"] = "chat.completion"
    answer.update(
        created=created,
        model=plan.model,
        choices=[choice],
        usage=usage_payload(plan.usage, plan.style),
    )
    if plan.echo_request:
        answer["mock_request"] = plan.body
    return answer


class ChunkWriter:
    """Builds the SSE events of one stream in the plan's style."""

    def __init__(self, plan: Plan, completion_id: str, created: int) -> None:
        self.plan = plan
        self.head: dict[str, Any] = {"id": completion_id}
        if plan.style != "glm":
            self.head["object"] = "chat.completion.chunk"
        self.head.update(created=created, model=plan.model)
        # OpenAI-like styles mark every chunk "usage": null when the client asked for usage.
        self.null_usage = plan.include_usage and plan.style in ("openai", "qwen")

    def event(self, payload: Mapping[str, Any]) -> bytes:
        return b"data: " + _dumps(payload).encode() + b"\n\n"

    def chunk(self, delta: dict[str, Any], extra: Mapping[str, Any] | None = None) -> bytes:
        """A chunk before the finishing one (GLM sends only index and delta in it)."""
        choice: dict[str, Any] = {"index": 0, "delta": delta}
        if self.plan.style != "glm":
            choice["logprobs"] = None
            choice["finish_reason"] = None
        payload: dict[str, Any] = {**self.head, "choices": [choice]}
        if self.null_usage:
            payload["usage"] = None
        if extra:
            payload.update(extra)
        return self.event(payload)

    def first(self) -> bytes:
        extra = {"mock_request": self.plan.body} if self.plan.echo_request else None
        return self.chunk({"role": "assistant", "content": ""}, extra=extra)

    def finish(self) -> bytes:
        """The finishing chunk, carrying the usage where the style puts it."""
        plan = self.plan
        usage = usage_payload(plan.usage, plan.style)
        choice: dict[str, Any] = {"index": 0, "delta": {}}
        if plan.style != "glm":
            choice["logprobs"] = None
        choice["finish_reason"] = plan.finish_reason
        payload: dict[str, Any] = {**self.head, "choices": [choice]}
        if self.null_usage:
            payload["usage"] = None
        if plan.style in ("deepseek", "glm"):
            payload["usage"] = usage
        elif plan.style == "kimi":
            choice["usage"] = usage
        return self.event(payload)

    def usage_chunk(self) -> bytes | None:
        """The separate last usage chunk of openai/qwen, when asked for."""
        if not (self.plan.include_usage and self.plan.style in ("openai", "qwen")):
            return None
        usage = usage_payload(self.plan.usage, self.plan.style)
        return self.event({**self.head, "choices": [], "usage": usage})

    def error(self, sent: int) -> bytes:
        body = error_body(500, self.plan.style, f"Mock upstream failed after {sent} chunks.")
        body["error"]["code"] = "mock_stream_error"
        return self.event(body)


# --- The application -------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DEFAULTS_KEY = web.AppKey("defaults", MockDefaults)
STATS_KEY = web.AppKey("stats", Stats)
FAULTS_KEY = web.AppKey("faults", dict)
_ids = itertools.count(1)


def _authorized(request: web.Request, api_key: str | None) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    return api_key is None or token == api_key


def _next_id() -> tuple[str, str]:
    n = next(_ids)
    return f"chatcmpl-mock-{n}", f"req-mock-{n}"


async def _abort(request: web.Request) -> None:
    """Drop the connection abruptly, once the chunks already written have left.

    transport.abort() discards asyncio's own write buffer, so wait (briefly) for it to
    drain first: the client must see exactly the chunks sent before the cut.
    """
    transport = request.transport
    if transport is None:
        return
    for _ in range(100):
        if transport.is_closing() or not transport.get_write_buffer_size():
            break
        await asyncio.sleep(0.01)
    transport.abort()


async def _stream(
    request: web.Request, response: web.StreamResponse, plan: Plan, writer: ChunkWriter
) -> str:
    """Write one SSE stream; returns how it ended: completed, cut, errored or ended."""
    await response.prepare(request)
    if plan.keepalive:
        await response.write(SSE_KEEPALIVE)
    if plan.latency_s:
        await asyncio.sleep(plan.latency_s)
    await response.write(writer.first())
    for piece in plan.reasoning_pieces:
        if plan.interval_s:
            await asyncio.sleep(plan.interval_s)
        await response.write(writer.chunk({"reasoning_content": piece}))
    pieces = plan.content_pieces
    # `sent` runs one past the last piece so that a cut or error can also come after all
    # the content, before the finishing chunk; a cut or error beyond the content acts
    # there (end_after beyond it acts after the usage chunk, below).
    cut_after, error_after = (
        None if knob is None else min(knob, len(pieces))
        for knob in (plan.cut_after, plan.error_after)
    )
    for sent in range(len(pieces) + 1):
        if cut_after == sent:
            await _abort(request)
            return "cut"
        if error_after == sent:
            await response.write(writer.error(sent))
            await response.write_eof()
            return "errored"
        if plan.end_after == sent:
            await response.write_eof()
            return "ended"
        if sent == len(pieces):
            break
        if plan.interval_s:
            await asyncio.sleep(plan.interval_s)
        await response.write(writer.chunk({"content": pieces[sent]}))
    await response.write(writer.finish())
    usage_chunk = writer.usage_chunk()
    if usage_chunk is not None:
        await response.write(usage_chunk)
    if plan.end_after is not None and plan.end_after > len(pieces):
        await response.write_eof()
        return "ended"
    await response.write(SSE_DONE)
    await response.write_eof()
    return "completed"


def _chat_handler(prefix_style: str | None) -> Handler:
    async def chat_completions(request: web.Request) -> web.StreamResponse:
        defaults = request.app[DEFAULTS_KEY]
        stats = request.app[STATS_KEY]
        stats.requests += 1
        style = prefix_style or defaults.style
        if not _authorized(request, defaults.api_key):
            return error_response(401, style)
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return error_response(400, style, "The request body is not valid JSON.")
        if not isinstance(body, dict):
            return error_response(400, style, "The request body must be a JSON object.")
        faults = request.app[FAULTS_KEY]
        if faults and isinstance(body.get("mock", {}), dict):
            body["mock"] = {**faults, **body.get("mock", {})}
        try:
            plan = build_plan(body, prefix_style, defaults)
        except KnobError as exc:
            return error_response(400, style, str(exc), exc.param)

        completion_id, request_id = _next_id()
        if plan.status is not None:
            if plan.latency_s:
                await asyncio.sleep(plan.latency_s)
            headers = {"x-request-id": request_id}
            if plan.retry_after is not None:
                seconds = plan.retry_after
                headers["Retry-After"] = str(int(seconds)) if seconds.is_integer() else str(seconds)
            return error_response(
                plan.status,
                plan.style,
                param=plan.error_param,
                headers=headers,
                code=plan.error_code,
            )

        if not plan.stream:
            if plan.latency_s:
                await asyncio.sleep(plan.latency_s)
            if plan.cut_after is not None:
                stats.plain_cut += 1
                await _abort(request)
                return web.Response()  # never sent: the connection is gone
            answer = plain_completion(plan, completion_id, int(time.time()))
            return web.json_response(answer, headers={"x-request-id": request_id}, dumps=_dumps)

        writer = ChunkWriter(plan, completion_id, int(time.time()))
        response = web.StreamResponse(
            headers={"Cache-Control": "no-cache", "x-request-id": request_id}
        )
        response.content_type = "text/event-stream"
        stats.streams_started += 1
        stats.streams_open += 1
        outcome = "aborted"
        try:
            outcome = await _stream(request, response, plan, writer)
        except ConnectionError:
            # The client went away mid-stream; aiohttp stays quiet about a returned response.
            pass
        finally:
            # Runs on cancellation too (the handler is cancelled when the peer disconnects).
            stats.streams_open -= 1
            counter = f"streams_{outcome}"
            setattr(stats, counter, getattr(stats, counter) + 1)
        return response

    return chat_completions


def _models_handler(prefix_style: str | None) -> Handler:
    async def models(request: web.Request) -> web.Response:
        defaults = request.app[DEFAULTS_KEY]
        request.app[STATS_KEY].requests += 1
        style = prefix_style or defaults.style
        if not _authorized(request, defaults.api_key):
            return error_response(401, style)
        data = [
            {"id": model, "object": "model", "created": MODELS_CREATED, "owned_by": style}
            for model in MODELS[style]
        ]
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    return models


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[STATS_KEY]))


async def _stats_reset(request: web.Request) -> web.Response:
    stats = request.app[STATS_KEY]
    still_open = stats.streams_open  # open streams still end, and must balance their count
    fresh = Stats(streams_open=still_open)
    for name, value in asdict(fresh).items():
        setattr(stats, name, value)
    return web.json_response(asdict(stats))


async def _faults_set(request: web.Request) -> web.Response:
    try:
        faults = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        faults = None
    if not isinstance(faults, dict):
        return error_response(400, "openai", "Send a JSON object of mock knobs.")
    unknown = sorted(set(faults) - KNOBS)
    if unknown:
        return error_response(400, "openai", f"unknown mock knobs: {', '.join(unknown)}", "mock")
    request.app[FAULTS_KEY].clear()
    request.app[FAULTS_KEY].update(faults)
    return web.json_response(faults)


def create_app(defaults: MockDefaults | None = None) -> web.Application:
    """The mock upstream as an aiohttp application."""
    defaults = defaults or MockDefaults()
    if defaults.style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}")
    if defaults.chunks < 1:
        raise ValueError("chunks must be >= 1")
    # Long prompts from benchmarks must not hit aiohttp's 1 MiB default.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[DEFAULTS_KEY] = defaults
    app[STATS_KEY] = Stats()
    app[FAULTS_KEY] = {}
    for prefix_style in (None, *STYLES):
        prefix = f"/{prefix_style}" if prefix_style else ""
        app.router.add_post(f"{prefix}/v1/chat/completions", _chat_handler(prefix_style))
        app.router.add_get(f"{prefix}/v1/models", _models_handler(prefix_style))
    app.router.add_get("/_mock/stats", _stats)
    app.router.add_post("/_mock/stats/reset", _stats_reset)
    app.router.add_post("/_mock/faults", _faults_set)
    return app


async def run(host: str, port: int, defaults: MockDefaults) -> None:
    """Serve until SIGTERM or SIGINT."""
    runner = web.AppRunner(
        create_app(defaults),
        access_log=None,  # a log line per request costs too much under benchmarks
        handler_cancellation=True,  # a client disconnect cancels its stream at once
        shutdown_timeout=0.2,  # stop at once: open streams are cut, not awaited for 60 s
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048)
    await site.start()
    bound_port = runner.addresses[0][1]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"mockupstream listening on http://{shown_host}:{bound_port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()


class ListenError(Exception):
    """The mock cannot listen where it was asked to (the port taken, an unknown host)."""


def serve(host: str = "127.0.0.1", port: int = 8001, defaults: MockDefaults | None = None) -> None:
    """Run the mock upstream in the foreground (blocking). Raises ListenError when it
    cannot listen on host:port."""
    try:
        asyncio.run(run(host, port, defaults or MockDefaults()))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ListenError(f"The mock upstream cannot listen on {host}:{port}: {reason}.") from exc


# --- Command line (shared by the management command and `python -m`) ------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0, help="delay before answering")
    parser.add_argument("--chunks", type=int, default=5, help="content chunks per stream")
    parser.add_argument("--interval-ms", type=float, default=0, help="delay between chunks")
    parser.add_argument(
        "--style", choices=STYLES, default="openai", help="usage style without a URL prefix"
    )
    parser.add_argument(
        "--api-key", default=None, help="required bearer token (default: any non-empty one)"
    )


def defaults_from_options(options: Mapping[str, Any]) -> MockDefaults:
    if not 0 <= options["port"] <= 65535:
        raise ValueError("--port must be from 0 to 65535 (0 picks a free port)")
    if options["chunks"] < 1:
        raise ValueError("--chunks must be >= 1")
    if not all(
        math.isfinite(options[name]) and options[name] >= 0
        for name in ("latency_ms", "interval_ms")
    ):
        raise ValueError("--latency-ms and --interval-ms must be numbers >= 0")
    return MockDefaults(
        latency_ms=options["latency_ms"],
        chunks=options["chunks"],
        interval_ms=options["interval_ms"],
        style=options["style"],
        api_key=options["api_key"] or None,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mockupstream", description=__doc__.split("\n")[0])
    add_arguments(parser)
    options = vars(parser.parse_args(argv))
    try:
        defaults = defaults_from_options(options)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        serve(options["host"], options["port"], defaults)
    except ListenError as exc:
        parser.exit(1, f"mockupstream: {exc}\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])

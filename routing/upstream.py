"""The one upstream client: the official `openai` SDK, one pooled client per provider.

The gateway forwards bytes it understands only as much as it must: it asks the SDK for
the raw HTTP response (plain) or the raw event stream, so unknown fields pass through both
ways. The SDK still does what it is good at: auth headers, base URLs, timeouts, pooled
keep-alive connections, and mapping error statuses to exceptions. Retries are off here:
the client's own SDK retries, and a retry must not be hidden inside one metered call.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import socket
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import httpx2
import openai
from django.conf import settings
from django.db.models import Q

from config import lifecycle

from .errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    UnprocessableRequest,
    UpstreamFailed,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from .models import MAX_TIMEOUT_SECONDS, Provider

logger = logging.getLogger(__name__)

_clients: dict[int, tuple[tuple, openai.OpenAI]] = {}
_clients_lock = threading.Lock()


def upstream_client(provider: Provider) -> openai.OpenAI:
    """The process-wide SDK client for a provider, rebuilt when its settings change."""
    api_key = provider.api_key()
    if api_key is None:
        logger.error(
            "Provider %s has no API key: environment variable %s is not set.",
            provider.name,
            provider.api_key_env,
        )
        raise UpstreamFailed(
            "The upstream provider for this model is not configured.",
            code="upstream_not_configured",
        )
    config = (provider.base_url, api_key, provider.timeout_seconds)
    cached = _clients.get(provider.pk)
    if cached is not None and cached[0] == config:
        return cached[1]
    with _clients_lock:
        cached = _clients.get(provider.pk)
        if cached is not None and cached[0] == config:
            return cached[1]
        limit = settings.TOLLGATE_UPSTREAM_MAX_CONNECTIONS
        timeout = _timeout(provider.timeout_seconds)
        client = openai.OpenAI(
            api_key=api_key,
            base_url=provider.base_url,
            max_retries=0,
            timeout=timeout,
            default_headers=_sdk_telemetry_omitted(),
            http_client=openai.DefaultHttpx2Client(
                timeout=timeout,
                limits=httpx2.Limits(max_connections=limit, max_keepalive_connections=limit),
            ),
        )
        # The old client is not closed: streams still running on it finish undisturbed.
        _clients[provider.pk] = (config, client)
        return client


# The SDK's telemetry headers (X-Stainless-*: its version, the OS, CPU architecture and
# Python version, a retry count, the read timeout) are left out of upstream requests: they
# tell providers about the gateway's machine and nothing providers use, and each one costs
# header processing on every call. Omit() is the SDK's documented way to drop a header.
@functools.cache
def _sdk_telemetry_omitted() -> dict[str, openai.Omit]:
    with openai.OpenAI(api_key="-", base_url="http://127.0.0.1:9/v1") as probe:
        names = [name for name in probe.default_headers if name.lower().startswith("x-stainless-")]
    return {name: openai.Omit() for name in names}


# Added per request unless the request's own headers name them.
_PER_CALL_OPTIONS = {
    "headers": {"X-Stainless-Retry-Count": openai.Omit(), "X-Stainless-Read-Timeout": openai.Omit()}
}


def upstream_warm_up() -> None:
    """Import what the SDK and httpx load lazily on a client's first request, so a worker
    can load it all before serving (see platform/gunicorn.conf.py) instead of in its
    first requests: one request the way the gateway sends them, to the discard port,
    where nothing listens."""
    client = openai.OpenAI(api_key="warm-up", base_url="http://127.0.0.1:9/v1", max_retries=0)
    with client, contextlib.suppress(openai.APIError):
        chat_completion(client, {"model": "warm-up", "messages": []}, timeout=1.0)


@dataclass
class UpstreamFailure:
    """What a failed upstream call tells the ledger."""

    error: GatewayError
    upstream_status: int | None

    @property
    def provider_at_fault(self) -> bool:
        return provider_at_fault(self.upstream_status)


def provider_at_fault(upstream_status: int | None) -> bool:
    """Whether a failed upstream call is the provider's doing: no answer (timeout,
    unreachable, not configured), a 429, a 5xx, or an unusable 200. Another 4xx is the
    request's own fault, which the next provider would refuse too. Routes fall through
    and breakers count on this; health's availability is the same rule over the ledger
    (PROVIDER_AT_FAULT)."""
    return upstream_status is None or upstream_status == 429 or not 400 <= upstream_status < 500


# Failures of the gateway's own, recorded with no upstream status like a provider that did
# not answer: a process stopping (gateway_restarting), the relay's own fault.
GATEWAY_FAULT_CODES = ("gateway_restarting", "gateway_error")

# provider_at_fault as a filter on usage events' upstream_status.
PROVIDER_AT_FAULT = (
    (Q(upstream_status__isnull=True) & ~Q(error_code__in=GATEWAY_FAULT_CODES))
    | Q(upstream_status=429)
    | Q(upstream_status__lt=400)
    | Q(upstream_status__gte=500)
)


def upstream_failure(
    exc: Exception, provider: Provider, timeout: float | None = None
) -> UpstreamFailure:
    """Map an SDK or transport exception to the gateway's error for the client."""
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        seconds = timeout if timeout is not None else provider.timeout_seconds
        return UpstreamFailure(
            UpstreamTimeout(f"The upstream provider did not answer within {seconds:g} s."),
            None,
        )
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        error = _error_object(exc.body)
        code = _provider_words(error.get("code"), provider, 200)
        if status in _REJECTIONS:
            # The provider rejected the request itself (e.g. context too long): the
            # client's to fix, so it gets the provider's status, words and param.
            return UpstreamFailure(
                _REJECTIONS[status](
                    _provider_words(error.get("message"), provider, 2000)
                    or "The upstream provider rejected the request.",
                    code=code,
                    param=_provider_words(error.get("param"), provider, 200),
                ),
                status,
            )
        if status == 429 and code not in _QUOTA_CODES:
            return UpstreamFailure(
                UpstreamRateLimited(
                    "The upstream provider is rate limiting; retry shortly.",
                    headers=_retry_after(exc.response)
                    or {"Retry-After": RETRY_AFTER_DEFAULT_SECONDS},
                ),
                status,
            )
        if status in (401, 402, 403, 429):
            # An empty balance (DeepSeek 402, GLM 429 code 1113, OpenAI-style 429
            # insufficient_quota) or refused credentials: an operator must act; a client
            # retry cannot help.
            logger.error("Upstream %s refused the gateway: HTTP %s %s", provider.name, status, code)
            return UpstreamFailure(
                UpstreamFailed(
                    "The upstream provider refused the gateway's account.",
                    code="upstream_account_error",
                    headers={"x-should-retry": "false"},
                ),
                status,
            )
        logger.warning("Upstream %s failed: HTTP %s", provider.name, status)
        return UpstreamFailure(
            # A 503's Retry-After tells the client's SDK how long to back off.
            UpstreamFailed(
                f"The upstream provider failed (HTTP {status}).",
                headers=_retry_after(exc.response),
            ),
            status,
        )
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        logger.warning("Upstream %s unreachable: %s", provider.name, type(exc).__name__)
        return UpstreamFailure(
            UpstreamFailed(
                "The upstream provider could not be reached.", code="upstream_unavailable"
            ),
            None,
        )
    raise exc


def upstream_error_failure(
    error: object, provider: Provider, *, mid_stream: bool = True
) -> UpstreamFailure:
    """Map an error a provider sent in a 200 (`{"error": {...}}`: an event of its stream,
    or its whole answer) to the gateway's error: the provider's message and code, less
    the gateway's own key should they quote it."""
    message = code = None
    if isinstance(error, Mapping):
        inner = _error_object(error)
        message = _provider_words(inner.get("message"), provider, 2000)
        code = _provider_words(inner.get("code"), provider, 200)
    elif isinstance(error, str):
        message = _provider_words(error, provider, 2000)
    failed = (
        "The upstream provider failed mid-stream" if mid_stream else "The upstream provider failed"
    )
    return UpstreamFailure(
        UpstreamFailed(
            f"{failed}: {message}" if message else f"{failed}.",
            code=code or "upstream_error",
        ),
        None,
    )


# A provider's refusal of the request itself, passed on with its status: the SDK raises
# BadRequestError, APIStatusError (413) or UnprocessableEntityError, as from the provider.
_REJECTIONS = {400: InvalidRequest, 413: PayloadTooLarge, 422: UnprocessableRequest}

# A 429 whose code says the account's balance or quota is spent: waiting cannot help.
_QUOTA_CODES = frozenset({"1113", "insufficient_quota"})

# What an upstream rate limit tells the client to wait when the provider did not say.
RETRY_AFTER_DEFAULT_SECONDS = "1"


def _retry_after(response: httpx2.Response) -> dict[str, str]:
    """The provider's Retry-After and retry-after-ms (the openai SDK reads both)."""
    hints = {}
    for name in ("Retry-After", "retry-after-ms"):
        value = response.headers.get(name)
        if value:
            hints[name] = value
    return hints


def _provider_words(value: object, provider: Provider, limit: int) -> str | None:
    """A provider's message, code or param as the client and the ledger may get it: the
    gateway's own key taken out (should the provider quote it), then cut to `limit`
    characters (in that order: a key cut in two would no longer be found); None for
    none."""
    if value is None or value == "":
        return None
    text = str(value)
    secret = provider.api_key()
    if secret:
        text = text.replace(secret, "[redacted]")
    return text[:limit]


def _error_object(body: object) -> Mapping:
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            return inner
    return {}


def _timeout(seconds: float) -> httpx2.Timeout:
    # Bounded as the models validate it: a row saved before that check, or by hand, with
    # a huge value would make the socket layer raise OverflowError on every call.
    seconds = min(seconds, MAX_TIMEOUT_SECONDS)
    return httpx2.Timeout(seconds, connect=min(seconds, 10.0))


def chat_completion(client: openai.OpenAI, body: Mapping, timeout: float | None = None) -> bytes:
    """Send a non-streaming chat completion; return the provider's JSON bytes.

    The SDK's generic `post` with `cast_to=httpx2.Response` (its documented way to call
    any endpoint) sends the body as it is and skips the typed parameter transformation,
    which costs more CPU than the rest of the request path.
    """
    options = _PER_CALL_OPTIONS
    if timeout is not None:
        options = {**options, "timeout": _timeout(timeout)}
    response = client.post(_chat_url(client), body=body, cast_to=httpx2.Response, options=options)
    return response.content


_chat_urls: weakref.WeakKeyDictionary[openai.OpenAI, str] = weakref.WeakKeyDictionary()


def _chat_url(client: openai.OpenAI) -> str:
    """The client's absolute chat completions URL, built once per client: the SDK takes
    an absolute URL as it is, where it would join a relative one to its base URL (and
    parse both) on every call."""
    url = _chat_urls.get(client)
    if url is None:
        url = _chat_urls[client] = f"{client.base_url}chat/completions"
    return url


class UpstreamStream:
    """An open SSE response from the provider; iterate `events()`, then `close()`."""

    def __init__(self, response):
        self._response = response
        # interrupt() and close() one at a time: once closed, the connection may be back
        # in the pool, another call's, and is never shut down from here.
        self._lock = threading.Lock()
        lifecycle.interrupt_on_stop(self)

    def interrupt(self) -> None:
        """End a read waiting on the provider, from another thread: the stream's socket
        is shut down, and the read returns at once (as the provider hanging up)."""
        with self._lock:
            # Closed by close(), or by httpx itself once the body is read whole, which
            # hands the connection back to the pool.
            if self._response.is_closed:
                return
            stream = self._response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    @property
    def content_type(self) -> str:
        return self._response.headers.get("content-type", "")

    def read(self) -> bytes:
        return self._response.read()

    def events(self) -> Iterator[str]:
        """The data of each SSE event, in order; comment lines, and events without data,
        come through as ':'. An event named `error` comes through as `{"error": ...}`,
        however its data is shaped (`{"type": "error", "message": ...}`, plain text), so
        that the relay reads it as the provider's failure with its message, not as a
        chunk."""
        data: list[str] = []
        event = ""
        commented = False  # a comment came since the last blank line (and was yielded)
        for line in sse_lines(self._response.iter_bytes()):
            if not line:
                if data:
                    joined = "\n".join(data)
                    yield _error_event(joined) if event == "error" else joined
                    data = []
                elif not commented:
                    # An event without data (`event: ping`, a bare blank line): a
                    # keep-alive too, so that waiting for data can look at the clock.
                    yield ":"
                event = ""
                commented = False
                continue
            if line.startswith("data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(" ") else value)
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith(":"):
                commented = True
                yield ":"
            # id: and retry: carry nothing chat completions use.
        if data:
            joined = "\n".join(data)
            yield _error_event(joined) if event == "error" else joined

    def close(self) -> None:
        lifecycle.forget(self)
        with self._lock:
            self._response.close()


# SSE lines end at CRLF, LF or CR, and nowhere else: not at the Unicode line separators
# (U+2028, U+2029, U+0085, ...) that str.splitlines() and httpx's line decoder also
# break at, which a provider's JSON may carry raw inside a string.
_LINE_END = re.compile(rb"\r\n|\r|\n")


def sse_lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """The lines of an SSE body arriving in `chunks`, decoded as UTF-8 (line by line: no
    line end falls inside a UTF-8 sequence), without their line ends; a CRLF split
    between two chunks ends one line."""
    parts: list[bytes] = []  # the line so far
    after_cr = False  # the last chunk ended with CR: an LF first in the next is its pair
    for chunk in chunks:
        if after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
            after_cr = False
        if not chunk:
            continue
        after_cr = chunk.endswith(b"\r")
        pieces = _LINE_END.split(chunk) if b"\r" in chunk else chunk.split(b"\n")
        if len(pieces) == 1:
            parts.append(chunk)
            continue
        parts.append(pieces[0])
        yield b"".join(parts).decode("utf-8", "replace")
        for piece in pieces[1:-1]:
            yield piece.decode("utf-8", "replace")
        parts = [pieces[-1]] if pieces[-1] else []
    if parts:
        yield b"".join(parts).decode("utf-8", "replace")


def _error_event(data: str) -> str:
    """The data of an SSE event named `error`, as an object with an `error` member."""
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("error"):
        return data
    error = parsed if isinstance(parsed, dict) else {"message": data or None}
    return json.dumps({"error": error})


def chat_completion_stream(
    client: openai.OpenAI, body: Mapping, timeout: float | None = None
) -> UpstreamStream:
    """Open a streaming chat completion. Errors before the first byte raise here.
    `timeout` (seconds) bounds the connection, the headers and each gap between reads.

    As `chat_completion`, through the SDK's generic `post` with `cast_to=httpx2.Response`;
    `stream=True` has the SDK hand back the response with its body unread."""
    options = _PER_CALL_OPTIONS
    if timeout is not None:
        options = {**options, "timeout": _timeout(timeout)}
    response = client.post(
        _chat_url(client), body=body, cast_to=httpx2.Response, options=options, stream=True
    )
    return UpstreamStream(response)

"""One chat completion through the gateway: resolve, forward, relay, meter.

The views call `chat_target_resolve`, then `chat_complete` or `chat_stream`. Every call
that reached for an upstream leaves exactly one usage event, written before the client
gets its last byte (plain: before the response; stream: before `data: [DONE]`).

Client disconnect policy (streams): when the client goes away mid-stream, the gateway
keeps reading the upstream, without relaying, for up to TOLLGATE_DISCONNECT_DRAIN_SECONDS
so that the ledger gets the usage the provider reports and bills. If the provider has not
finished by then, the gateway closes the upstream and records an estimate: the prompt
estimated from its characters plus one token per chunk already relayed, marked
`estimated`. Either way the event has status `client_cancelled`.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

import httpx2
import openai
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from billing.metering import (
    TokenBuckets,
    tokens_estimate,
    usage_normalize,
    usage_openai_shape,
)
from billing.models import UsageEvent
from billing.pricing import UnitPrices, unit_prices_for_call
from billing.services import UsageFacts, usage_record
from tenants.budgets import BudgetExceeded, budget_reserve
from tenants.limits import (
    LEASE_TTL,
    RateLimited,
    RateState,
    key_lease_renew,
    rate_limit_admit,
    rate_limit_release,
)
from tenants.models import ApiKey
from tenants.selectors import model_for_key

from .errors import (
    BudgetExhausted,
    GatewayError,
    ModelNotAllowed,
    ModelNotFound,
    ModelNotPriced,
    RateLimitExceeded,
    UpstreamFailed,
)
from .models import CatalogModel
from .upstream import (
    UpstreamFailure,
    UpstreamStream,
    chat_completion,
    chat_completion_stream,
    upstream_client,
    upstream_failure,
)

logger = logging.getLogger(__name__)

# What can go wrong between the gateway and a provider once a call is under way.
UPSTREAM_ERRORS = (openai.APIError, httpx2.HTTPError)


@dataclass
class ChatCall:
    """One client request, resolved to the catalog model and price that will serve it."""

    request_id: str
    received_at: datetime
    started: float  # time.monotonic() when the request arrived
    key: ApiKey
    body: dict
    model: CatalogModel
    units: UnitPrices  # what the call is billed at: list price, or the tenant's own
    rate: RateState | None = None
    budget_holds: dict[int, int] = field(default_factory=dict)  # period id -> picodollars

    @property
    def tz_name(self) -> str:
        return self.key.tenant_timezone

    @property
    def include_usage(self) -> bool:
        options = self.body.get("stream_options") or {}
        return bool(options.get("include_usage"))

    def elapsed_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)


def chat_target_resolve(*, key: ApiKey, name: str, at: datetime) -> tuple[CatalogModel, UnitPrices]:
    """The catalog model a key's request for `name` is served by, and its unit prices."""
    entry, allowed = model_for_key(key=key, public_id=name)
    if entry is None:
        raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
    if not allowed:
        raise ModelNotAllowed(
            f"This API key is not allowed to use the model '{name}'.", param="model"
        )
    price = entry.price_at(at)
    units = (
        unit_prices_for_call(tenant_id=key.tenant_id, model_id=entry.model.pk, price=price, at=at)
        if price is not None
        else None
    )
    if units is None or units.output is None:
        raise ModelNotPriced(
            f"The model '{name}' has no price yet; an administrator must price it before it "
            "can be called.",
            param="model",
        )
    return entry.model, units


def chat_cost_bound(call: ChatCall) -> tuple[Decimal, int]:
    """(worst-case cost, output tokens it assumes) of a call, for budget reservations.

    Input: the UTF-8 size of the messages, since a token is at least one byte, at the
    dearer of the input and cached input prices. Output: the client's max_tokens (or
    max_completion_tokens), else the model's output cap, times n, at the output price.
    """
    body = call.body
    prompt_bound = len(json.dumps(body["messages"], ensure_ascii=False).encode())
    output_bound = (
        body.get("max_completion_tokens") or body.get("max_tokens") or call.model.max_output_tokens
    ) * (body.get("n") or 1)
    units = call.units
    input_unit = max(
        (p for p in (units.input, units.cached_input) if p is not None), default=Decimal(0)
    )
    cost = (prompt_bound * input_unit + output_bound * units.output).scaleb(-6)
    return cost, output_bound


def chat_admit(call: ChatCall) -> None:
    """Rate limits, then the budget, in one transaction: refuse with a 429 before anything
    reaches a provider, and leave nothing counted or held for a refused call."""
    cost, _ = chat_cost_bound(call)
    try:
        with transaction.atomic():
            call.rate = rate_limit_admit(
                key=call.key, request_id=call.request_id, at=call.received_at
            )
            call.budget_holds = budget_reserve(
                key=call.key,
                tz_name=call.tz_name,
                request_id=call.request_id,
                at=call.received_at,
                amount=cost,
            )
    except RateLimited as exc:
        headers = exc.state.headers(timezone.now()) if exc.state else {}
        headers["Retry-After"] = str(exc.retry_after)
        raise RateLimitExceeded(exc.message, headers=headers) from None
    except BudgetExceeded as exc:
        raise BudgetExhausted(exc.message) from None


def db_connection_release() -> None:
    """Give a pooled database connection back while waiting on the upstream, so that a few
    connections serve hundreds of slow calls. The next query takes one again."""
    if getattr(connection, "pool", None) is not None and not connection.in_atomic_block:
        connection.close()


def _upstream_body(call: ChatCall, *, stream: bool) -> dict:
    body = dict(call.body)
    body["model"] = call.model.upstream_model_id
    if call.budget_holds and not (body.get("max_tokens") or body.get("max_completion_tokens")):
        # The reservation assumed the model's output cap: make the provider keep to it.
        body["max_tokens"] = call.model.max_output_tokens
    if stream:
        # Always ask for usage, whatever the client asked: the ledger needs it.
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return body


def _meter(
    call: ChatCall,
    *,
    buckets: TokenBuckets,
    source: str,
    status: str,
    streamed: bool,
    raw_usage: dict | None = None,
    ttft_ms: int | None = None,
    failure: UpstreamFailure | None = None,
) -> UsageEvent:
    facts = UsageFacts(
        request_id=call.request_id,
        tenant_id=call.key.tenant_id,
        api_key_id=call.key.pk,
        requested_model=call.body["model"],
        served_model=call.model,
        price=call.units.price,
        tenant_price=call.units.tenant_price,
        buckets=buckets,
        usage_source=source,
        status=status,
        streamed=streamed,
        latency_ms=call.elapsed_ms(),
        ttft_ms=ttft_ms,
        raw_usage=raw_usage,
        occurred_at=call.received_at,
        tenant_timezone=call.tz_name,
        budget_version=call.key.tenant_budget_version,
        budget_holds=call.budget_holds,
        upstream_status=failure.upstream_status if failure else None,
        error_code=(failure.error.code or "") if failure else "",
    )
    try:
        return usage_record(facts)
    except Exception:
        # The ledger is the product: leave everything needed to replay the row.
        logger.exception("Could not record usage: %r", facts)
        raise
    finally:
        rate_limit_release(
            key=call.key,
            request_id=call.request_id,
            at=call.received_at,
            tokens=buckets.prompt + buckets.completion,
        )


def _failure(exc: Exception, provider) -> UpstreamFailure:
    if isinstance(exc, GatewayError):  # e.g. the provider has no key configured
        return UpstreamFailure(exc, None)
    return upstream_failure(exc, provider)


def _meter_failure(call: ChatCall, failure: UpstreamFailure, *, streamed: bool) -> None:
    _meter(
        call,
        buckets=TokenBuckets(),
        source=UsageEvent.Source.PROVIDER,
        status=UsageEvent.Status.UPSTREAM_ERROR,
        streamed=streamed,
        failure=failure,
    )


# --- plain ---------------------------------------------------------------------------


def chat_complete(call: ChatCall) -> bytes:
    """Forward a non-streaming call; return the JSON the client gets."""
    provider = call.model.provider
    try:
        client = upstream_client(provider)
        db_connection_release()
        content = chat_completion(client, _upstream_body(call, stream=False))
    except (*UPSTREAM_ERRORS, GatewayError) as exc:
        failure = _failure(exc, provider)
        _meter_failure(call, failure, streamed=False)
        raise failure.error from None
    completion = _json_object(content)
    if completion is None or not isinstance(completion.get("choices"), list):
        failure = UpstreamFailure(
            UpstreamFailed(
                "The upstream provider answered with something other than a chat completion."
            ),
            200,
        )
        _meter_failure(call, failure, streamed=False)
        raise failure.error

    completion.setdefault("object", "chat.completion")
    completion["model"] = call.model.public_id
    for choice in completion["choices"]:
        if isinstance(choice, dict):
            choice.setdefault("logprobs", None)
            message = choice.get("message")
            if isinstance(message, dict):
                message.setdefault("refusal", None)

    usage = completion.get("usage")
    if isinstance(usage, dict):
        buckets = usage_normalize(usage)
        source = UsageEvent.Source.PROVIDER
        raw_usage = usage
    else:
        buckets = TokenBuckets(
            input_uncached=tokens_estimate(call.body["messages"]),
            output=tokens_estimate(
                [c.get("message") for c in completion["choices"] if isinstance(c, dict)]
            ),
        )
        source = UsageEvent.Source.ESTIMATED
        raw_usage = None
    completion["usage"] = usage_openai_shape(usage if isinstance(usage, dict) else {}, buckets)
    _meter(
        call,
        buckets=buckets,
        source=source,
        status=UsageEvent.Status.OK,
        streamed=False,
        raw_usage=raw_usage,
    )
    return json.dumps(completion, ensure_ascii=False, separators=(",", ":")).encode()


# --- streaming -----------------------------------------------------------------------


def _sse(payload: dict) -> bytes:
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )


_DONE = b"data: [DONE]\n\n"
_KEEPALIVE = b": keep-alive\n\n"
_DELTA_OUTPUT_FIELDS = ("content", "reasoning_content", "tool_calls", "refusal", "function_call")


@dataclass
class _StreamState:
    """What the relay has learned so far: ids, the last usage seen, output relayed."""

    call: ChatCall
    id: str | None = None
    created: int | None = None
    usage: dict | None = None
    pieces: int = 0  # chunks that carried output
    ttft_ms: int | None = None

    def absorb(self, chunk: dict) -> dict | None:
        """Normalise one upstream chunk; return what the client gets, or None to drop it.

        Usage may ride on any chunk, top level or inside a choice (Kimi): the last one
        seen wins. The client gets usage only in one final chunk, and only if it asked.
        """
        if self.id is None:
            self.id = str(chunk.get("id") or f"chatcmpl-{self.call.request_id}")
            created = chunk.get("created")
            self.created = created if isinstance(created, int) else int(time.time())
        chunk["id"] = self.id
        chunk["created"] = self.created
        chunk["model"] = self.call.model.public_id
        chunk.setdefault("object", "chat.completion.chunk")

        usage = chunk.pop("usage", None)
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            choices = chunk["choices"] = []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            inner = choice.pop("usage", None)
            if isinstance(inner, dict):
                usage = inner
            delta = choice.get("delta")
            if isinstance(delta, dict) and any(delta.get(f) for f in _DELTA_OUTPUT_FIELDS):
                self.pieces += 1
                if self.ttft_ms is None:
                    self.ttft_ms = self.call.elapsed_ms()
        if isinstance(usage, dict):
            self.usage = usage
            if not choices:
                return None  # the provider's own usage chunk; the gateway sends its own
        if self.call.include_usage:
            chunk["usage"] = None
        return chunk

    def buckets(self) -> tuple[TokenBuckets, str]:
        if self.usage is not None:
            return usage_normalize(self.usage), UsageEvent.Source.PROVIDER
        estimate = TokenBuckets(
            input_uncached=tokens_estimate(self.call.body["messages"]),
            output=self.pieces,
        )
        return estimate, UsageEvent.Source.ESTIMATED

    def usage_chunk(self, buckets: TokenBuckets) -> dict:
        return {
            "id": self.id or f"chatcmpl-{self.call.request_id}",
            "object": "chat.completion.chunk",
            "created": self.created or int(time.time()),
            "model": self.call.model.public_id,
            "choices": [],
            "usage": usage_openai_shape(self.usage or {}, buckets),
        }


def chat_stream(call: ChatCall) -> Iterator[bytes]:
    """Open the upstream stream, wait for its first event, and return the relay.

    Failures before the first event (refusals, timeouts, cuts, an error event) raise
    GatewayError here, so the client gets a proper status code and its SDK the matching
    exception; later ones travel inside the stream as an error event.
    """
    provider = call.model.provider
    try:
        client = upstream_client(provider)
        db_connection_release()
        upstream = chat_completion_stream(client, _upstream_body(call, stream=True))
    except (*UPSTREAM_ERRORS, GatewayError) as exc:
        failure = _failure(exc, provider)
        _meter_failure(call, failure, streamed=True)
        raise failure.error from None

    first: str | None = None
    failure: UpstreamFailure | None = None
    if "text/event-stream" not in upstream.content_type:
        failure = UpstreamFailure(
            UpstreamFailed("The upstream provider answered a stream request without a stream."),
            200,
        )
    else:
        events = upstream.events()
        try:
            first = next((data for data in events if data != ":"), None)
        except UPSTREAM_ERRORS as exc:
            failure = upstream_failure(exc, provider)
        else:
            chunk = _json_object(first) if first is not None else None
            if chunk is not None and chunk.get("error"):
                failure = _stream_upstream_error(chunk["error"])
    if failure is not None:
        upstream.close()
        _meter_failure(call, failure, streamed=True)
        raise failure.error
    head = [] if first is None else [first]
    return _relay(call, upstream, itertools.chain(head, events))


def _relay(call: ChatCall, upstream: UpstreamStream, events: Iterator[str]) -> Iterator[bytes]:
    state = _StreamState(call=call)
    recorded = False

    def meter(status: str, failure: UpstreamFailure | None = None) -> TokenBuckets:
        nonlocal recorded
        buckets, source = state.buckets()
        _meter(
            call,
            buckets=buckets,
            source=source,
            status=status,
            streamed=True,
            raw_usage=state.usage,
            ttft_ms=state.ttft_ms,
            failure=failure,
        )
        recorded = True
        return buckets

    renew_every = LEASE_TTL / 4
    renewed = time.monotonic()
    try:
        failure: UpstreamFailure | None = None
        try:
            for data in events:
                if call.key.concurrency_limit is not None and (
                    time.monotonic() - renewed > renew_every.total_seconds()
                ):
                    # A long stream keeps its concurrency lease alive.
                    key_lease_renew(request_id=call.request_id, now=timezone.now())
                    renewed = time.monotonic()
                if data == ":":
                    yield _KEEPALIVE
                    continue
                if data.strip() == "[DONE]":
                    break
                chunk = _json_object(data)
                if chunk is None:
                    failure = UpstreamFailure(
                        UpstreamFailed("The upstream provider sent a malformed stream event."), 200
                    )
                    break
                if chunk.get("error"):
                    failure = _stream_upstream_error(chunk["error"])
                    break
                out = state.absorb(chunk)
                if out is not None:
                    yield _sse(out)
        except UPSTREAM_ERRORS as exc:
            failure = upstream_failure(exc, call.model.provider)

        if failure is not None:
            # The status line is long gone: the error travels inside the stream.
            meter(UsageEvent.Status.UPSTREAM_ERROR, failure)
            yield _sse(failure.error.body())
            return
        buckets = meter(UsageEvent.Status.OK)
        if call.include_usage:
            yield _sse(state.usage_chunk(buckets))
        yield _DONE
    except GeneratorExit:
        if not recorded:
            _drain(state, events)
            meter(UsageEvent.Status.CLIENT_CANCELLED)
        raise
    except Exception:
        if not recorded:
            meter(
                UsageEvent.Status.UPSTREAM_ERROR,
                UpstreamFailure(UpstreamFailed("The relay failed.", code="gateway_error"), None),
            )
        raise
    finally:
        upstream.close()


def _json_object(data: str | bytes) -> dict | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _stream_upstream_error(error: object) -> UpstreamFailure:
    message = None
    code = None
    if isinstance(error, dict):
        message = error.get("message")
        code = error.get("code")
    return UpstreamFailure(
        UpstreamFailed(
            f"The upstream provider failed mid-stream: {message}"
            if message
            else "The upstream provider failed mid-stream.",
            code=str(code) if code else "upstream_error",
        ),
        None,
    )


def _drain(state: _StreamState, events: Iterator[str]) -> None:
    """After a client disconnect, read on (without relaying) for the provider's usage."""
    deadline = time.monotonic() + settings.TOLLGATE_DISCONNECT_DRAIN_SECONDS
    try:
        for data in events:
            if data == ":":
                continue
            if data.strip() == "[DONE]" or time.monotonic() > deadline:
                break
            chunk = _json_object(data)
            if chunk is None or chunk.get("error"):
                break
            state.absorb(chunk)
    except UPSTREAM_ERRORS:
        pass

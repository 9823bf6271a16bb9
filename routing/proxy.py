"""One chat completion through the gateway: resolve, forward, relay, meter.

The views call `chat_targets` (a model, or a route's plan), `chat_admit`, then
`chat_complete` or `chat_stream`. Every attempt that reached for an upstream leaves
exactly one usage event (a direct call has one attempt; a route may fall back to
more), written before the client gets its last byte (plain: before the response; stream:
before `data: [DONE]`). The budget hold and the concurrency lease of a call are released
with its last attempt's event; a stream's lease earlier, when its client hangs up.

Client disconnect policy (streams): when the client goes away mid-stream, the gateway
keeps reading the upstream, without relaying, for up to TOLLGATE_DISCONNECT_DRAIN_SECONDS
so that the ledger gets the usage the provider reports and bills. If the provider has not
finished by then, the gateway closes the upstream and records an estimate: the prompt
estimated from its characters plus one token per chunk already relayed, marked
`estimated`. Either way the event has status `client_cancelled`. The call's concurrency
lease is given back before the drain (the client's request is over, so it no longer
counts against the key's limit); its tokens and its budget hold (the provider bills what
it goes on generating) still settle with the event.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal

import httpx2
import openai
from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from billing.metering import (
    TokenBuckets,
    tokens_estimate,
    usage_normalize,
    usage_openai_shape,
    usage_reported,
)
from billing.models import UsageEvent
from billing.pricing import UnitPrices, unit_prices, unit_prices_for_call
from billing.services import UsageFacts, usage_write
from config.db import run_together
from config.lifecycle import stop_due
from tenants.budgets import (
    BudgetExceeded,
    BudgetHold,
    budget_holds_renew,
    budget_release,
    budget_reserve,
    hard_budgets,
)
from tenants.limits import (
    LEASE_TTL,
    RateAdmission,
    RateLimited,
    RateState,
    key_lease_renew,
    rate_limit_admit,
    rate_limit_release,
    rate_limit_release_statements,
    rate_limited,
)
from tenants.models import ApiKey
from tenants.selectors import model_for_key

from . import breaker
from .errors import (
    BudgetExhausted,
    GatewayError,
    GatewayRestarting,
    ModelNotAllowed,
    ModelNotFound,
    ModelNotPriced,
    NoTargetAvailable,
    RateLimitExceeded,
    UpstreamFailed,
)
from .models import CatalogModel, CircuitBreaker
from .routes import (
    Plan,
    RouteSpec,
    request_features,
    route_models,
    route_plan,
    routes_all,
)
from .selectors import catalog_entry
from .upstream import (
    UpstreamFailure,
    UpstreamStream,
    chat_completion,
    chat_completion_stream,
    upstream_client,
    upstream_error_failure,
    upstream_failure,
)

logger = logging.getLogger(__name__)

# What can go wrong between the gateway and a provider once a call is under way.
UPSTREAM_ERRORS = (openai.APIError, httpx2.HTTPError)


@dataclass(frozen=True)
class Target:
    """A catalog model a call may be served by, its prices, its attempt's timeout."""

    model: CatalogModel
    units: UnitPrices
    timeout: float | None = None  # seconds; None: the provider's
    breaker: CircuitBreaker | None = None  # as the plan read it, when not plainly closed


@dataclass
class ChatCall:
    """One client request, resolved to the catalog model and price that will serve it.

    A call to a route holds the targets still to try; `model`, `units` and `timeout` are
    those of the current attempt (`attempt`, from 1).
    """

    request_id: str
    received_at: datetime
    started: float  # time.monotonic() when the request arrived
    key: ApiKey
    body: dict
    model: CatalogModel
    units: UnitPrices  # what the call is billed at: list price, or the tenant's own
    rate: RateState | None = None
    budget_holds: dict[int, int] = field(default_factory=dict)  # period id -> picodollars
    route: str | None = None  # the route the client called, if it called one
    targets: list[Target] = field(default_factory=list)  # still to try (routes)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (model, why not tried)
    timeout: float | None = None
    attempt: int = 0
    attempt_started: float = 0.0
    released: bool = False  # the budget hold and the lease are given back
    lease_released: bool = False  # the lease alone, early: the client hung up mid-stream
    breaker: CircuitBreaker | None = None  # the current target's, if not plainly closed

    def use(self, target: Target) -> None:
        """Make `target` the current attempt."""
        self.model, self.units, self.timeout = target.model, target.units, target.timeout
        self.breaker = target.breaker
        self.attempt += 1
        self.attempt_started = self.started if self.attempt == 1 else time.monotonic()

    def headers(self) -> dict[str, str]:
        """x-route and x-attempts, for a call to a route."""
        if self.route is None:
            return {}
        return {"x-route": self.route, "x-attempts": str(self.attempt)}

    @property
    def tz_name(self) -> str:
        return self.key.tenant_timezone

    @property
    def include_usage(self) -> bool:
        options = self.body.get("stream_options") or {}
        return bool(options.get("include_usage"))

    def elapsed_ms(self) -> int:
        """Since this attempt started (the request's arrival, for the first)."""
        return int((time.monotonic() - (self.attempt_started or self.started)) * 1000)


def _target_prices(tenant_id: int | None, entry, at: datetime) -> UnitPrices | None:
    """The unit prices a tenant's call to a catalog entry is billed at (the list price
    when no tenant is given), or None when the model has no output price at `at`."""
    price = entry.price_at(at)
    if price is None:
        return None
    if tenant_id is None:
        units = unit_prices(price, None)
    else:
        units = unit_prices_for_call(
            tenant_id=tenant_id, model_id=entry.model.pk, price=price, at=at
        )
    return units if units.output is not None else None


def chat_target_resolve(*, key: ApiKey, name: str, at: datetime) -> tuple[CatalogModel, UnitPrices]:
    """The catalog model a key's request for `name` (a model id) is served by, and its
    unit prices."""
    entry, allowed = model_for_key(key=key, public_id=name)
    if entry is None:
        raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
    if not allowed:
        raise ModelNotAllowed(
            f"This API key is not allowed to use the model '{name}'.", param="model"
        )
    units = _target_prices(key.tenant_id, entry, at)
    if units is None:
        raise ModelNotPriced(
            f"The model '{name}' has no price yet; an administrator must price it before it "
            "can be called.",
            param="model",
        )
    return entry.model, units


def chat_targets(
    *, key: ApiKey, name: str, body: dict, at: datetime, split_key: str
) -> tuple[str | None, list[Target]]:
    """(route name or None, targets in order) for a request to `name`: a catalog model
    (one target) or a route. Raises the error the client gets when nothing can serve it."""
    routes = routes_all()
    if name not in routes or catalog_entry(name) is not None:
        model, units = chat_target_resolve(key=key, name=name, at=at)
        return None, [Target(model, units)]
    plan, targets = route_plan_for(
        spec=routes[name],
        routes=routes,
        body=body,
        at=at,
        split_key=split_key,
        tenant_id=key.tenant_id,
        allows=lambda public_id: model_for_key(key=key, public_id=public_id)[1],
    )
    if not targets:
        raise no_target_error(name, plan.skipped)
    return name, targets


def route_plan_for(
    *,
    spec: RouteSpec,
    routes: Mapping[str, RouteSpec],
    body: dict,
    at: datetime,
    split_key: str,
    tenant_id: int | None,
    allows: Callable[[str], bool],
) -> tuple[Plan, list[Target]]:
    """The plan of a route for one request, and its targets: the models it may use now
    (`allows(public id)`: the allowlists), priced for the tenant, breakers considered."""
    now = timezone.now()
    entries = {m: catalog_entry(m) for m in route_models(spec, routes)}
    breakers = breaker.breakers_dirty([e.model.pk for e in entries.values() if e is not None])
    prices: dict[str, UnitPrices] = {}

    def usable(public_id: str) -> str | None:
        entry = entries.get(public_id)
        if entry is None:
            return "not in the catalog, or disabled"
        if not allows(public_id):
            return "not in this key's model allowlist"
        units = _target_prices(tenant_id, entry, at)
        if units is None:
            return "no price yet"
        prices[public_id] = units
        return breaker.breaker_skip_reason(breakers.get(entry.model.pk), now)

    plan = route_plan(
        spec, features=request_features(body), split_key=split_key, usable=usable, routes=routes
    )
    targets = [
        Target(
            model=entries[c.model].model,
            units=prices[c.model],
            timeout=c.timeout,
            breaker=breakers.get(entries[c.model].model.pk),
        )
        for c in plan.candidates
    ]
    return plan, targets


def no_target_error(route: str, skipped: list[tuple[str, str]]) -> GatewayError:
    reasons = "; ".join(f"{model}: {why}" for model, why in skipped) or "it has no targets"
    message = f"No target of the route '{route}' can serve this request ({reasons})."
    if any(why.startswith("circuit") for _, why in skipped):
        return NoTargetAvailable(
            message, headers={"Retry-After": str(int(settings.TOLLGATE_BREAKER_COOLDOWN_SECONDS))}
        )
    if any("budget" in why for _, why in skipped):
        return BudgetExhausted(message)
    if skipped and all(why == "no price yet" for _, why in skipped):
        return ModelNotPriced(message, param="model")
    return ModelNotAllowed(message, param="model")


_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens")


def output_limit(body: dict, model: CatalogModel) -> int:
    """The most output tokens one choice of a call served by `model` may cost: the larger
    of the client's max_tokens and max_completion_tokens (a provider may read either),
    at most the model's output cap; the cap when the client sets neither. A call under
    a budget is held to it: the provider is sent it (_upstream_body)."""
    asked = [body[name] for name in _OUTPUT_LIMITS if body.get(name)]
    return min(max(asked), model.max_output_tokens) if asked else model.max_output_tokens


# Content parts a provider reads as text; any other part (an image, audio, a video, a
# file) costs tokens that no byte count bounds.
_TEXT_PARTS = frozenset({"text", "input_text", "refusal"})


def request_size(body: dict) -> int:
    """The UTF-8 size of a request body, as compact JSON."""
    return len(json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass"))


def prompt_token_bound(body: dict, model: CatalogModel, size: int | None = None) -> int:
    """The most input tokens a call served by `model` may be billed. `size`: the body's
    `request_size`, when the caller has it.

    A token is at least one byte of what the provider reads, and it reads the whole
    request: the messages, but also tool and function definitions and response_format
    schemas, which providers put into the prompt. So the request's UTF-8 size bounds
    its text. A part that is not text (an image, audio, video, a file) may cost thousands
    of tokens in a few bytes of URL: then the model's context window (as the catalog
    gives it) bounds the input, if it is larger.
    """
    size = request_size(body) if size is None else size
    for message in body["messages"]:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS for part in content
        ):
            return max(size, model.context_window)
    return size


def target_cost_bound(
    body: dict, model: CatalogModel, units: UnitPrices, size: int | None = None
) -> Decimal:
    """Worst-case cost of a call served by `model` at `units`, for budget reservations.

    Input: `prompt_token_bound`, at the dearer of the input and cached input prices.
    Output: `output_limit` times n, at the output price. `size`: the body's
    `request_size`, when the caller has it.
    """
    prompt_bound = prompt_token_bound(body, model, size)
    output_bound = output_limit(body, model) * (body.get("n") or 1)
    input_unit = max(
        (p for p in (units.input, units.cached_input) if p is not None), default=Decimal(0)
    )
    return (prompt_bound * input_unit + output_bound * units.output).scaleb(-6)


def chat_cost_bound(call: ChatCall, size: int) -> Decimal:
    """The worst-case cost of a call (its body `size` bytes): of its dearest target still
    to try."""
    targets = call.targets or [Target(call.model, call.units)]
    return max(target_cost_bound(call.body, t.model, t.units, size) for t in targets)


def chat_admit(call: ChatCall) -> None:
    """Rate limits, then the budget, in one transaction: refuse with a 429 before anything
    reaches a provider, and leave nothing counted or held for a refused call.

    A route's targets whose worst-case cost does not fit the budget are skipped (the call
    holds the worst case of the dearest target left); a direct call is refused.
    """
    if not rate_limited(call.key) and not hard_budgets(call.key):
        return  # nothing to count or hold: no transaction, no cost bound
    size = request_size(call.body)
    while True:
        cost = chat_cost_bound(call, size)
        if _admit_at_once(call, cost):
            return
        # Something said no (or the minute's rate window is still to open): step by step,
        # which tells what refused the call.
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
            return
        except RateLimited as exc:
            headers = exc.state.headers(timezone.now()) if exc.state else {}
            headers["Retry-After"] = str(exc.retry_after)
            raise RateLimitExceeded(exc.message, headers=headers) from None
        except BudgetExceeded as exc:
            if call.route is None:
                raise BudgetExhausted(exc.message) from None
            fits = []
            for target in call.targets:
                bound = target_cost_bound(call.body, target.model, target.units, size)
                if bound <= exc.remaining:
                    fits.append(target)
                else:
                    call.skipped.append((target.model.public_id, exc.skip_reason(bound)))
            if not fits:
                raise no_target_error(call.route, call.skipped) from None
            if len(fits) == len(call.targets):  # it fitted a moment ago: spent since
                raise BudgetExhausted(exc.message) from None
            call.targets = fits


class _NotAtOnce(Exception):
    pass


def _admit_at_once(call: ChatCall, cost: Decimal) -> bool:
    """Count and hold everything the call needs with every statement sent at once (one
    round trip on PostgreSQL: the key's and the budgets' rows, which every call of the
    key or tenant takes, stay locked for that and the commit). False, with nothing
    counted or held, when any of them says no."""
    rate = RateAdmission(key=call.key, request_id=call.request_id, at=call.received_at)
    hold = BudgetHold(
        key=call.key,
        tz_name=call.tz_name,
        request_id=call.request_id,
        at=call.received_at,
        amount=cost,
    )
    try:
        with transaction.atomic():
            run_together([*rate.statements, *hold.statements])
            if not (rate.admitted() and hold.held()):
                raise _NotAtOnce
    except _NotAtOnce:
        return False
    call.rate, call.budget_holds = rate.state, hold.holds
    return True


def db_connection_release() -> None:
    """Give a pooled database connection back while waiting on the upstream, so that a few
    connections serve hundreds of slow calls. The next query takes one again."""
    if getattr(connection, "pool", None) is not None and not connection.in_atomic_block:
        connection.close()


def _upstream_body(call: ChatCall, *, stream: bool) -> dict:
    body = dict(call.body)
    body["model"] = call.model.upstream_model_id
    if call.budget_holds:
        # The reservation assumed output_limit per choice: make the provider keep to it,
        # whichever of the two fields it reads (DeepSeek, Qwen, Kimi and GLM document
        # max_tokens alone), and never above the model's cap.
        limit = output_limit(body, call.model)
        for name in _OUTPUT_LIMITS:
            if body.get(name):
                body[name] = min(body[name], limit)
        body["max_tokens"] = body.get("max_tokens") or limit
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
    final: bool = True,
) -> None:
    """Record the current attempt. `final`: no other attempt follows, so the call's
    budget holds and concurrency lease are released with it."""
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
        attempt=max(call.attempt, 1),
        settles=final,
    )
    release = {
        "key": call.key,
        "request_id": call.request_id,
        "at": call.received_at,
        "tokens": buckets.prompt + buckets.completion,
        "lease": not call.lease_released,
    }
    try:
        writes = rate_limit_release_statements(**release) if final else []
        if writes:
            # The event and the key's release (its tokens, its lease) commit together,
            # sent in one round trip with the budget settlement: one commit (a WAL flush)
            # instead of three. The release goes first: admission locks the key's rate
            # window before its budgets, and so must this, or the two could deadlock.
            with transaction.atomic():
                # Request ids are the gateway's own: no duplicate to recover from.
                usage_write(facts, savepoint=False, with_statements=writes)
            call.released = True
        else:
            usage_write(facts)
        if final and call.rate is not None:
            # A plain answer's x-ratelimit-remaining-tokens then counts its own tokens
            # (a stream's headers went out at admission).
            call.rate = replace(call.rate, tokens=call.rate.tokens + release["tokens"])
    except Exception:
        # The ledger is the product: leave everything needed to replay the row.
        logger.exception("Could not record usage: %r", facts)
        raise
    finally:
        if final and not call.released:
            # Also when recording failed: the lease must not wait for its expiry.
            call.released = True
            rate_limit_release(**release)


def _failure(exc: Exception, call: ChatCall) -> UpstreamFailure:
    if isinstance(exc, GatewayError):  # e.g. the provider has no key configured
        return UpstreamFailure(exc, None)
    return upstream_failure(exc, call.model.provider, call.timeout)


def _breaker(action: Callable, *args, **kwargs):
    """Run a breaker update. Breakers are advisory: a database error there is logged and
    must not fail a call that has its answer, nor leave its hold and lease behind."""
    try:
        return action(*args, **kwargs)
    except DatabaseError:
        logger.exception("Circuit breaker update failed")
        return None


def _next_target(call: ChatCall) -> Target | None:
    """The next target still worth trying, taken off the list; None when none is left.
    A routed target whose breaker is open or already being probed is skipped here."""
    while call.targets:
        target = call.targets.pop(0)
        if (
            target.breaker is not None
            and target.breaker.open_until is not None
            and _breaker(
                breaker.breaker_probe_claim,
                target.model.pk,
                now=timezone.now(),
                timeout=_attempt_timeout(target),
            )
            is False
        ):
            call.skipped.append((target.model.public_id, "circuit open"))
            continue
        return target
    return None


def _attempt_timeout(target: Target | ChatCall) -> float:
    return target.timeout if target.timeout is not None else target.model.provider.timeout_seconds


def _release(call: ChatCall) -> None:
    """Give back the call's budget hold and concurrency lease when no attempt's event
    settles them: every target was skipped, or something failed between attempts."""
    if call.released:
        return
    call.released = True
    budget_release(request_id=call.request_id)
    rate_limit_release(
        key=call.key,
        request_id=call.request_id,
        at=call.received_at,
        tokens=0,
        lease=not call.lease_released,
    )


def _lease_release(call: ChatCall) -> None:
    """Give back the concurrency lease of a call whose client hung up, ahead of its event:
    its request is over for the client, even while the gateway drains the provider. The
    event still settles the budget hold and counts the tokens, without the lease. If this
    fails, the lease goes back with the event, as it would have."""
    if call.released or call.lease_released or call.key.concurrency_limit is None:
        return
    try:
        rate_limit_release(key=call.key, request_id=call.request_id, at=call.received_at, tokens=0)
    except DatabaseError:
        logger.exception("Could not give back the lease of %s early", call.request_id)
        return
    call.lease_released = True
    db_connection_release()  # the drain waits on the provider


def _attempt_first(call: ChatCall) -> None:
    """Start the call's first attempt, or raise when every target was skipped."""
    target = _next_target(call)
    if target is None:
        # Breakers opened since the plan: nothing was tried, so nothing stays held.
        _release(call)
        raise no_target_error(call.route or call.model.public_id, call.skipped)
    call.use(target)


def _attempt_failed(call: ChatCall, failure: UpstreamFailure, *, streamed: bool) -> None:
    """Record a failed attempt. Returns when the call goes on with its next target (now
    the current one); raises the error for the client when it does not."""
    stopping = stop_due()
    if stopping:
        # The process is stopping (a stream's first event interrupted at the deadline):
        # no next target, no breaker, and a 503 the SDK retries on another process.
        failure = _stopping(streaming=False)
    retry = call.route is not None and failure.provider_at_fault and not stopping
    if call.route is not None and not stopping:
        if retry:  # the provider's side failed: its breaker counts it
            _breaker(breaker.breaker_failure, call.model.pk, error=failure.error.message)
        elif call.breaker is not None:  # the provider answered (a 4xx): it is up
            _breaker(breaker.breaker_success, call.model.pk)
    going_on = retry and bool(call.targets)
    _meter(
        call,
        buckets=TokenBuckets(),
        source=UsageEvent.Source.PROVIDER,
        status=UsageEvent.Status.UPSTREAM_ERROR,
        streamed=streamed,
        failure=failure,
        final=not going_on,
    )
    following = _next_target(call) if going_on else None
    if following is None:
        _release(call)  # when the targets left were all skipped by their breakers
        failure.error.headers = {**failure.error.headers, **call.headers()}
        raise failure.error
    logger.info(
        "Route %s: %s failed (%s); trying %s",
        call.route,
        call.model.public_id,
        failure.error.code,
        following.model.public_id,
    )
    call.use(following)


def _attempt_succeeded(call: ChatCall) -> None:
    if call.route is not None and call.breaker is not None:
        _breaker(breaker.breaker_success, call.model.pk)


def _attempts(call: ChatCall, attempt: Callable[[ChatCall], object | None]):
    """Run `attempt` on the call's targets in turn until one returns something. Whatever
    goes wrong on the way, the call's hold and lease are not left behind."""
    try:
        _attempt_first(call)
        while True:
            result = attempt(call)
            if result is not None:
                break
    except BaseException:
        if not call.released:
            try:
                _release(call)
            except DatabaseError:
                logger.exception("Could not release the holds of %s", call.request_id)
        raise
    _attempt_succeeded(call)
    return result


# --- plain ---------------------------------------------------------------------------


def _complete_attempt(call: ChatCall) -> dict | None:
    """One attempt: the provider's completion, or None when the call moved on to its
    next target (the failure recorded). Raises the client's error on the last failure."""
    provider = call.model.provider
    try:
        client = upstream_client(provider)
        db_connection_release()
        content = chat_completion(client, _upstream_body(call, stream=False), call.timeout)
    except (*UPSTREAM_ERRORS, GatewayError) as exc:
        _attempt_failed(call, _failure(exc, call), streamed=False)
        return None
    completion = _json_object(content)
    if completion is not None and completion.get("error"):
        # An error in a 200 (some providers answer a failure so): its words, not a shrug.
        failure = upstream_error_failure(completion["error"], provider, mid_stream=False)
        _attempt_failed(call, UpstreamFailure(failure.error, 200), streamed=False)
        return None
    if completion is None or not isinstance(completion.get("choices"), list):
        failure = UpstreamFailure(
            UpstreamFailed(
                "The upstream provider answered with something other than a chat completion."
            ),
            200,
        )
        _attempt_failed(call, failure, streamed=False)
        return None
    return completion


def _completion_identity(completion: dict, call: ChatCall) -> tuple[str, int]:
    """The id and creation time the client gets: the provider's, or, where it sent none
    (or an empty string, or 0), the gateway's own."""
    given_id, created = completion.get("id"), completion.get("created")
    if isinstance(given_id, bool) or not isinstance(given_id, str | int) or given_id == "":
        given_id = f"chatcmpl-{call.request_id}"
    return (
        str(given_id),
        created
        if isinstance(created, int) and not isinstance(created, bool) and created > 0
        else int(time.time()),
    )


def chat_complete(call: ChatCall) -> bytes:
    """Forward a non-streaming call; return the JSON the client gets. A route tries its
    targets in turn until one answers (see `_attempt_failed`)."""
    completion = _attempts(call, _complete_attempt)
    completion["id"], completion["created"] = _completion_identity(completion, call)
    completion["object"] = "chat.completion"
    completion["model"] = call.model.public_id
    for choice in completion["choices"]:
        if isinstance(choice, dict):
            choice.setdefault("logprobs", None)
            message = choice.get("message")
            if isinstance(message, dict):
                message.setdefault("refusal", None)

    usage = completion.get("usage")
    if usage_reported(usage):
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
        raw_usage = usage if isinstance(usage, dict) else None  # kept, unreadable as it was
    completion["usage"] = usage_openai_shape(usage if isinstance(usage, dict) else {}, buckets)
    _meter(
        call,
        buckets=buckets,
        source=source,
        status=UsageEvent.Status.OK,
        streamed=False,
        raw_usage=raw_usage,
    )
    return _json_bytes(completion)


# --- streaming -----------------------------------------------------------------------


def _json_bytes(payload: dict) -> bytes:
    """Compact JSON in UTF-8, non-ASCII text as it is. A provider may send a lone surrogate
    escape ("\\ud83d": valid JSON, but no UTF-8 encodes it): such a payload goes out
    with every non-ASCII character escaped, which clients read back as the provider sent
    it."""
    try:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(payload, separators=(",", ":")).encode()


def _sse(payload: dict) -> bytes:
    return b"data: " + _json_bytes(payload) + b"\n\n"


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
    choices_seen: set = field(default_factory=set)  # choice indexes
    choices_done: set = field(default_factory=set)  # those that said why they stopped

    @property
    def finished(self) -> bool:
        """Every choice seen said why it stopped (finish_reason): with n > 1, one choice
        finished and another cut short is not a whole answer."""
        return bool(self.choices_done) and self.choices_seen <= self.choices_done

    def absorb(self, chunk: dict) -> dict | None:
        """Normalise one upstream chunk; return what the client gets, or None to drop it.

        Usage may ride on any chunk, top level or inside a choice (Kimi): the last one
        seen wins. The client gets usage only in one final chunk, and only if it asked.
        """
        if self.id is None:
            self.id, self.created = _completion_identity(chunk, self.call)
        chunk["id"] = self.id
        chunk["created"] = self.created
        chunk["model"] = self.call.model.public_id
        chunk["object"] = "chat.completion.chunk"

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
            index = choice.get("index")
            if not isinstance(index, int | str | None):
                index = repr(index)  # hashable, and still told apart from the others
            self.choices_seen.add(index)
            if choice.get("finish_reason"):
                self.choices_done.add(index)
            # OpenAI's chunk choice has both, null until set (GLM leaves them out).
            choice.setdefault("finish_reason", None)
            choice.setdefault("logprobs", None)
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
        if usage_reported(self.usage):
            return usage_normalize(self.usage), UsageEvent.Source.PROVIDER
        estimate = TokenBuckets(
            input_uncached=tokens_estimate(self.call.body["messages"]),
            output=self.pieces,
        )
        return estimate, UsageEvent.Source.ESTIMATED

    def usage_chunk(self, buckets: TokenBuckets) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.call.model.public_id,
            "choices": [],
            "usage": usage_openai_shape(self.usage or {}, buckets),
        }


def chat_stream(call: ChatCall) -> Iterator[bytes]:
    """Open the upstream stream, wait for its first event, and return the relay.

    Failures before the first event (refusals, timeouts, cuts, an error event) raise
    GatewayError here, so the client gets a proper status code and its SDK the matching
    exception, or, for a route, move on to its next target: nothing has reached the client
    yet. Later ones travel inside the stream as an error event and are never retried.
    """
    upstream, events = _attempts(call, _stream_attempt)
    relay = _relay(call, upstream, events)
    next(relay)  # into its try block: from here on, closing it meters the call
    return relay


def _stream_attempt(call: ChatCall) -> tuple[UpstreamStream, Iterator[str]] | None:
    """One attempt: the open stream and its events (the first one read), or None when the
    call moved on to its next target. Raises the client's error on the last failure."""
    provider = call.model.provider
    try:
        client = upstream_client(provider)
        db_connection_release()
        upstream = chat_completion_stream(client, _upstream_body(call, stream=True), call.timeout)
    except (*UPSTREAM_ERRORS, GatewayError) as exc:
        _attempt_failed(call, _failure(exc, call), streamed=True)
        return None

    first: str | None = None
    failure: UpstreamFailure | None = None
    events: Iterator[str] = iter(())
    if "text/event-stream" not in upstream.content_type:
        failure = UpstreamFailure(
            UpstreamFailed("The upstream provider answered a stream request without a stream."),
            200,
        )
    else:
        events = upstream.events()
        try:
            first = _first_event(events, call)
        except UPSTREAM_ERRORS as exc:
            failure = upstream_failure(exc, provider, call.timeout)
        else:
            chunk = _json_object(first) if first is not None else None
            if first is None or first.strip() == "[DONE]":
                failure = UpstreamFailure(
                    UpstreamFailed("The upstream provider ended the stream without an answer."),
                    200,
                )
            elif chunk is None:
                failure = UpstreamFailure(
                    UpstreamFailed("The upstream provider sent a malformed stream event."), 200
                )
            elif chunk.get("error"):
                failure = upstream_error_failure(chunk["error"], call.model.provider)
    if failure is not None:
        upstream.close()
        _attempt_failed(call, failure, streamed=True)
        return None
    return upstream, itertools.chain([first], events)


def _first_event(events: Iterator[str], call: ChatCall) -> str | None:
    """The first event with data. Keep-alive comments do not count: a provider that only
    ever sends them times out all the same, at the attempt's timeout (a route target's,
    else the provider's), which each comment would otherwise restart as a read."""
    deadline = call.attempt_started + _attempt_timeout(call)
    for data in events:
        if data != ":":
            return data
        if time.monotonic() > deadline:
            raise httpx2.ReadTimeout("no event before the attempt's timeout")
    return None


def _stopping(*, streaming: bool) -> UpstreamFailure:
    """A call ended because its gateway process is stopping (config.lifecycle): metered
    with what it relayed, and the client told to send the request again (another process
    answers it; the SDK retries a 503 by itself)."""
    what = "this stream ended before the answer did" if streaming else "the call was stopped"
    return UpstreamFailure(
        GatewayRestarting(
            f"The gateway is restarting: {what}. Retry the request.",
            headers={"Retry-After": "1"},
        ),
        None,
    )


def _renew(call: ChatCall) -> None:
    """Keep a long stream's lease and holds alive. Advisory: a database that cannot be
    reached now is logged, and the stream goes on (a lease or hold not renewed for long
    is released as a dead process's, which its settlement then allows for)."""
    try:
        if call.key.concurrency_limit is not None:
            key_lease_renew(request_id=call.request_id, now=timezone.now())
        if call.budget_holds:
            budget_holds_renew(request_id=call.request_id, now=timezone.now())
    except DatabaseError:
        logger.warning("Could not renew the lease and holds of %s", call.request_id, exc_info=True)


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
        # Primed by chat_stream: a response closed before it sent anything (the client
        # gone already) still drains, meters and releases the call.
        yield b""
        failure: UpstreamFailure | None = None
        ended = False  # the provider said the stream is over: [DONE]
        try:
            for data in events:
                if (call.key.concurrency_limit is not None or call.budget_holds) and (
                    time.monotonic() - renewed > renew_every.total_seconds()
                ):
                    # A long stream keeps its concurrency lease alive, and its budget
                    # holds: those of a call silent for an hour are released as a dead
                    # process's (budget_holds_expire).
                    _renew(call)
                    renewed = time.monotonic()
                if stop_due() and not state.finished:  # a finished answer gets its [DONE]
                    failure = _stopping(streaming=True)
                    break
                if data == ":":
                    yield _KEEPALIVE
                    continue
                if data.strip() == "[DONE]":
                    ended = True
                    break
                chunk = _json_object(data)
                if chunk is None:
                    failure = UpstreamFailure(
                        UpstreamFailed("The upstream provider sent a malformed stream event."), 200
                    )
                    break
                if chunk.get("error"):
                    failure = upstream_error_failure(chunk["error"], call.model.provider)
                    break
                out = state.absorb(chunk)
                if out is not None:
                    yield _sse(out)
        except UPSTREAM_ERRORS as exc:
            if stop_due() and state.finished:
                ended = True  # interrupted after the answer was whole: it gets its [DONE]
            else:
                failure = upstream_failure(exc, call.model.provider, call.timeout)
        if stop_due() and not ended and not state.finished:
            failure = _stopping(streaming=True)  # its read interrupted at the deadline
        if failure is None and not ended and not state.finished:
            # The body ended cleanly, but neither [DONE] nor a finish_reason came: an
            # answer cut short, which the client must not take for a whole one.
            failure = UpstreamFailure(
                UpstreamFailed("The upstream provider ended the stream before it finished."),
                200,
            )

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
            _lease_release(call)
            _drain(state, events)
            meter(UsageEvent.Status.CLIENT_CANCELLED)
        raise
    except Exception:
        # A fault of the gateway's own (the provider's are handled above). The stream has
        # begun: the client gets an error event, as for any failure from here on, not a
        # cut connection its SDK cannot tell from a network fault.
        logger.exception("The relay of %s failed", call.request_id)
        failure = UpstreamFailure(UpstreamFailed("The relay failed.", code="gateway_error"), None)
        if not recorded:
            meter(UsageEvent.Status.UPSTREAM_ERROR, failure)
        yield _sse(failure.error.body())
    finally:
        upstream.close()


def _null(_constant: str) -> None:
    return None


# Built once: json.loads with a hook builds a decoder per call, 2 µs a relayed chunk.
_PROVIDER_JSON = json.JSONDecoder(parse_constant=_null)


def _json_object(data: str | bytes) -> dict | None:
    """A provider's JSON object, or None. NaN and Infinity (Python's extensions, which
    some providers' logprobs carry) become null: what the client gets must be JSON."""
    try:
        value = _PROVIDER_JSON.decode(data.decode() if isinstance(data, bytes) else data)
    except ValueError:  # UnicodeDecodeError included
        return None
    return value if isinstance(value, dict) else None


def _drain(state: _StreamState, events: Iterator[str]) -> None:
    """After a client disconnect, read on (without relaying) for the provider's usage."""
    deadline = time.monotonic() + settings.TOLLGATE_DISCONNECT_DRAIN_SECONDS
    try:
        for data in events:
            if data == ":":
                continue
            if data.strip() == "[DONE]" or time.monotonic() > deadline or stop_due():
                break
            chunk = _json_object(data)
            if chunk is None or chunk.get("error"):
                break
            state.absorb(chunk)
    except UPSTREAM_ERRORS:
        pass

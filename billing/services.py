"""Writes to the usage ledger."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache

from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, connections, transaction

from config.db import Statement, fetch_one, run_together, sql_names
from routing.models import CatalogModel, ModelPrice
from tenants.budgets import BudgetSettlement, budgets_for_key

from .metering import TokenBuckets, usage_charge
from .models import TenantPrice, UsageEvent
from .pricing import unit_prices

logger = logging.getLogger(__name__)

# The facts that make two posts of one request id "the same event".
_IDENTITY_FIELDS = (
    "api_key_id",
    "served_model_id",
    "price_id",
    "tenant_price_id",
    "input_uncached_tokens",
    "input_cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "status",
)


class UsageConflictError(Exception):
    """The request id is already in the ledger with different facts."""


@dataclass(frozen=True)
class UsageFacts:
    request_id: str
    tenant_id: int
    api_key_id: int
    requested_model: str
    served_model: CatalogModel
    price: ModelPrice
    buckets: TokenBuckets
    usage_source: str
    status: str
    streamed: bool
    latency_ms: int
    occurred_at: datetime
    tenant_price: TenantPrice | None = None  # the tenant's own price that won, if any
    tenant_timezone: str = "UTC"  # whose calendar month the budgets count in
    budget_version: int | None = None  # the tenant's, as read with the key (None: look it up)
    budget_holds: dict[int, int] | None = None  # as budget_reserve returned them (None: look up)
    ttft_ms: int | None = None
    raw_usage: dict | None = None
    upstream_status: int | None = None
    error_code: str = ""
    attempt: int = 1  # the request's upstream attempt (routes fall back to a next one)
    settles: bool = True  # False for an attempt a fallback follows: holds stay for the next


@cache
def _usage_insert_plan() -> tuple[str, list]:
    table, c = sql_names(UsageEvent)
    fields = [f for f in UsageEvent._meta.concrete_fields if not f.primary_key]
    columns = ", ".join(c[f.name] for f in fields)
    values = ", ".join(["%s"] * len(fields))
    # Built from model metadata only; every value travels as a parameter.
    sql = (
        f"INSERT INTO {table} ({columns}) VALUES ({values}) RETURNING {c[UsageEvent._meta.pk.name]}"  # noqa: S608
    )
    return sql, fields


def _usage_insert_statement(event: UsageEvent) -> Statement:
    """INSERT one event, as `event.save(force_insert=True)` would, as a prepared statement
    (config.db): on the path of every call, where the ORM's statement building cost
    more than the database's work. Safe to retry: the request id and attempt are unique."""
    sql, fields = _usage_insert_plan()
    db = connections[DEFAULT_DB_ALIAS]  # once: each `connection.x` is a lookup
    return Statement(sql, [f.get_db_prep_save(f.pre_save(event, True), db) for f in fields])


def _usage_inserted(event: UsageEvent, pk: int) -> None:
    event.pk = pk
    event._state.adding = False
    event._state.db = DEFAULT_DB_ALIAS


def usage_record(
    facts: UsageFacts, *, savepoint: bool = True, with_statements: Sequence[Statement] = ()
) -> UsageEvent:
    """Write one usage event, priced with its price version; committed when this returns
    (or with the caller's transaction).

    When budgets cover the call, the same transaction settles them (tenants.budgets), so
    their counters always equal the ledger. The same request id again with the same
    facts returns the existing row (and settles nothing twice); with other facts it
    raises UsageConflictError. Inside a caller's transaction that is the job of a
    savepoint; `savepoint=False` spares its two round trips where a request id cannot
    come twice (the proxy's own calls): a duplicate then raises IntegrityError and
    fails the caller's transaction. `with_statements`: the caller's writes, run in the
    event's transaction ahead of its INSERT and in the same round trip (the proxy's
    release of the call's rate limits).
    """
    units = unit_prices(facts.price, facts.tenant_price)
    charge = usage_charge(
        facts.buckets,
        input_per_mtok=units.input,
        cached_input_per_mtok=units.cached_input,
        output_per_mtok=units.output,
    )
    event = UsageEvent(
        request_id=facts.request_id,
        attempt=facts.attempt,
        tenant_id=facts.tenant_id,
        api_key_id=facts.api_key_id,
        requested_model=facts.requested_model,
        served_model=facts.served_model,
        provider_id=facts.served_model.provider_id,
        price=facts.price,
        tenant_price=facts.tenant_price,
        input_uncached_tokens=facts.buckets.input_uncached,
        input_cached_tokens=facts.buckets.input_cached,
        output_tokens=facts.buckets.output,
        reasoning_tokens=facts.buckets.reasoning,
        unpriced_tokens=charge.unpriced_tokens,
        cost=charge.cost,
        usage_source=facts.usage_source,
        status=facts.status,
        upstream_status=facts.upstream_status,
        error_code=facts.error_code[:64],
        streamed=facts.streamed,
        latency_ms=max(0, facts.latency_ms),
        ttft_ms=facts.ttft_ms,
        raw_usage=facts.raw_usage,
        occurred_at=facts.occurred_at,
    )
    budgets = budgets_for_key(
        tenant_id=facts.tenant_id, key_id=facts.api_key_id, version=facts.budget_version
    )
    insert = _usage_insert_statement(event)
    try:
        if budgets or with_statements or connection.in_atomic_block:
            # A transaction (or a savepoint inside the caller's) keeps the event, the
            # caller's statements and the budget counters together, and the connection
            # usable after a conflict. They go to the database in one round trip.
            settlement = (
                BudgetSettlement(
                    budgets=budgets,
                    tz_name=facts.tenant_timezone,
                    request_id=facts.request_id,
                    at=facts.occurred_at,
                    cost=event.cost,
                    # An attempt a fallback follows releases nothing: the hold covers
                    # the next attempt.
                    holds=facts.budget_holds if facts.settles else {},
                )
                if budgets
                else None
            )
            with transaction.atomic(savepoint=savepoint):
                run_together(
                    [*with_statements, insert, *(settlement.statements if settlement else ())]
                )
                _usage_inserted(event, insert.row[0])
                if settlement:
                    settlement.finish()
        else:
            # Autocommit: one INSERT, committed when it returns.
            _usage_inserted(event, fetch_one(insert.sql, insert.params)[0])
    except IntegrityError:
        if not savepoint and connection.in_atomic_block:
            raise  # the caller's transaction is broken: nothing more can be read in it
        existing = UsageEvent.objects.filter(
            tenant_id=facts.tenant_id, request_id=facts.request_id, attempt=facts.attempt
        ).first()
        if existing is None:
            raise
        if any(getattr(existing, f) != getattr(event, f) for f in _IDENTITY_FIELDS):
            raise UsageConflictError(
                f"Request {facts.request_id} is already metered with different usage."
            ) from None
        return existing
    return event

"""Writes to the usage ledger."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache

from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, connections, models, transaction
from django.utils import timezone

from config.db import Statement, fetch_one, run_together, sql_names
from routing.models import CatalogModel, ModelPrice
from tenants.budgets import BudgetSettlement, budgets_for_key

from .metering import TokenBuckets, usage_charge
from .models import TenantPrice, UsageEvent
from .pricing import unit_prices

logger = logging.getLogger(__name__)

# The facts that make two posts of one request id "the same event". Timings and the raw
# usage may differ between two posts of one event; what is billed, when, and why may not.
_IDENTITY_FIELDS = (
    "api_key_id",
    "requested_model",
    "served_model_id",
    "price_id",
    "tenant_price_id",
    "input_uncached_tokens",
    "input_cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "usage_source",
    "status",
    "upstream_status",
    "streamed",
    "occurred_at",
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


# Fields whose values the gateway passes already in the driver's terms (str, int, bool,
# None, foreign keys' ids): `get_db_prep_save` would hand them back unchanged.
_PLAIN_FIELDS = (
    models.CharField,
    models.IntegerField,
    models.BooleanField,
    models.ForeignKey,
)


@cache
def _usage_insert_plan() -> tuple[str, tuple]:
    """The INSERT of one event, and per column (its attname, how to prepare its value:
    None when it goes as it is), built once from the model's metadata."""
    table, c = sql_names(UsageEvent)
    fields = [f for f in UsageEvent._meta.concrete_fields if not f.primary_key]
    columns = ", ".join(c[f.name] for f in fields)
    values = ", ".join(["%s"] * len(fields))
    # Built from model metadata only; every value travels as a parameter.
    sql = (
        f"INSERT INTO {table} ({columns}) VALUES ({values}) RETURNING {c[UsageEvent._meta.pk.name]}"  # noqa: S608
    )
    plan = tuple(
        (f.attname, None if isinstance(f, _PLAIN_FIELDS) else f.get_db_prep_save) for f in fields
    )
    return sql, plan


def _usage_insert_statement(values: dict) -> Statement:
    """INSERT one event, with the parameters `event.save(force_insert=True)` would send,
    as a prepared statement (config.db): on the path of every call, where making a model
    instance and the ORM's statement building cost more than the database's work. Safe to
    retry: the request id and attempt are unique."""
    db = connections[DEFAULT_DB_ALIAS]  # once: each `connection.x` is a lookup
    sql, plan = _usage_insert_plan()
    params = [
        values[name] if prepare is None else prepare(values[name], db) for name, prepare in plan
    ]
    return Statement(sql, params)


def _usage_values(facts: UsageFacts) -> dict:
    """The event's column values (by attname), priced with its price version."""
    units = unit_prices(facts.price, facts.tenant_price)
    charge = usage_charge(
        facts.buckets,
        input_per_mtok=units.input,
        cached_input_per_mtok=units.cached_input,
        output_per_mtok=units.output,
    )
    return {
        "request_id": facts.request_id,
        "attempt": facts.attempt,
        "tenant_id": facts.tenant_id,
        "api_key_id": facts.api_key_id,
        "requested_model": facts.requested_model,
        "served_model_id": facts.served_model.pk,
        "provider_id": facts.served_model.provider_id,
        "price_id": facts.price.pk,
        "tenant_price_id": facts.tenant_price.pk if facts.tenant_price else None,
        "input_uncached_tokens": facts.buckets.input_uncached,
        "input_cached_tokens": facts.buckets.input_cached,
        "output_tokens": facts.buckets.output,
        "reasoning_tokens": facts.buckets.reasoning,
        "unpriced_tokens": charge.unpriced_tokens,
        "cost": charge.cost,
        "usage_source": facts.usage_source,
        "status": facts.status,
        "upstream_status": facts.upstream_status,
        "error_code": facts.error_code[:64],
        "streamed": facts.streamed,
        "latency_ms": max(0, facts.latency_ms),
        "ttft_ms": facts.ttft_ms,
        "raw_usage": facts.raw_usage,
        "occurred_at": facts.occurred_at,
        "recorded_at": timezone.now(),
    }


def usage_record(
    facts: UsageFacts, *, savepoint: bool = True, with_statements: Sequence[Statement] = ()
) -> UsageEvent:
    """Write one usage event, priced with its price version; committed when this returns
    (or with the caller's transaction). As `usage_write`, returning the event."""
    pk, values = usage_write(facts, savepoint=savepoint, with_statements=with_statements)
    if values is None:
        return UsageEvent.objects.get(pk=pk)
    ids = ("served_model_id", "price_id", "tenant_price_id")
    event = UsageEvent(
        pk=pk,
        served_model=facts.served_model,
        price=facts.price,
        tenant_price=facts.tenant_price,
        **{name: value for name, value in values.items() if name not in ids},
    )
    event._state.adding = False
    event._state.db = DEFAULT_DB_ALIAS
    return event


def usage_write(
    facts: UsageFacts, *, savepoint: bool = True, with_statements: Sequence[Statement] = ()
) -> tuple[int, dict | None]:
    """Write one usage event, priced with its price version; committed when this returns
    (or with the caller's transaction). Returns the event's id and the values written
    (None when the event was already there).

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
    values = _usage_values(facts)
    budgets = budgets_for_key(
        tenant_id=facts.tenant_id, key_id=facts.api_key_id, version=facts.budget_version
    )
    insert = _usage_insert_statement(values)
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
                    cost=values["cost"],
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
                pk = insert.row[0]
                if settlement:
                    settlement.finish()
        else:
            # Autocommit: one INSERT, committed when it returns.
            pk = fetch_one(insert.sql, insert.params)[0]
    except IntegrityError:
        if not savepoint and connection.in_atomic_block:
            raise  # the caller's transaction is broken: nothing more can be read in it
        existing = (
            UsageEvent.objects.filter(
                tenant_id=facts.tenant_id, request_id=facts.request_id, attempt=facts.attempt
            )
            .values("pk", *_IDENTITY_FIELDS)
            .first()
        )
        if existing is None:
            raise
        if any(existing[f] != values[f] for f in _IDENTITY_FIELDS):
            raise UsageConflictError(
                f"Request {facts.request_id} is already metered with different usage."
            ) from None
        return existing["pk"], None
    return pk, values

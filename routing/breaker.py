"""Circuit breakers of routed targets, one row per catalog model in the database, so
every gateway process sees the same state (see `routing.models.CircuitBreaker`).

Only calls through a route touch a breaker: a direct call to a model is the client's
choice and goes through whatever the breaker says, which keeps the direct path free of
the extra statements.

A routed call reads its targets' breakers once, with its plan (`breakers_dirty`: those
not plainly closed). Only those cost it more statements: claiming the half-open probe,
and resetting the count after a success. So a success resets a count that was above
zero when the call started; a failure of another process during the call is counted on.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import cache

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from config.db import fetch_all, model_from_row, sql_names

from .models import CircuitBreaker


def breakers_dirty(model_ids: list[int]) -> dict[int, CircuitBreaker]:
    """The breakers among these models that are not plainly closed (open, half-open, or
    counting failures), by model id. One prepared statement (config.db): every routed
    call runs it."""
    if not model_ids:
        return {}
    rows = fetch_all(_breakers_dirty_sql(len(model_ids)), model_ids)
    breakers = (model_from_row(CircuitBreaker, row) for row in rows)
    return {b.model_id: b for b in breakers}


@cache
def _breakers_dirty_sql(count: int) -> str:
    table, c = sql_names(CircuitBreaker)
    # Built from model metadata only; the ids travel as parameters.
    return (
        f"SELECT {', '.join(c.values())} FROM {table} "  # noqa: S608
        f"WHERE {c['model']} IN ({', '.join(['%s'] * count)}) "
        f"AND ({c['open_until']} IS NOT NULL OR {c['consecutive_failures']} > 0)"
    )


def breaker_skip_reason(breaker: CircuitBreaker | None, now: datetime) -> str | None:
    """Why a route must skip this model now, or None. A half-open breaker lets the
    request through to `breaker_probe_claim`, which lets exactly one of them try."""
    if breaker is None or breaker.open_until is None:
        return None
    if breaker.open_until > now:
        return (
            f"circuit open after {breaker.consecutive_failures} consecutive failures, "
            f"until {breaker.open_until:%H:%M:%S} UTC"
        )
    if breaker.probe_until is not None and breaker.probe_until > now:
        return "circuit half-open: another request is probing it"
    return None


def breaker_probe_claim(model_id: int, *, now: datetime, timeout: float) -> bool:
    """Before calling a model whose breaker is not closed: True when this request may try
    it (the breaker is closed, or this request won the one half-open probe)."""
    claimed = (
        CircuitBreaker.objects.filter(model_id=model_id, open_until__lte=now)
        .filter(Q(probe_until__isnull=True) | Q(probe_until__lte=now))
        .update(probe_until=now + timedelta(seconds=timeout + 5))
    )
    if claimed:
        return True
    return not CircuitBreaker.objects.filter(model_id=model_id, open_until__isnull=False).exists()


def breaker_success(model_id: int) -> None:
    """A routed call succeeded: the breaker closes and its count starts again."""
    CircuitBreaker.objects.filter(model_id=model_id).filter(
        Q(consecutive_failures__gt=0) | Q(open_until__isnull=False)
    ).update(consecutive_failures=0, open_until=None, probe_until=None)


def breaker_failure(model_id: int, *, error: str, now: datetime | None = None) -> CircuitBreaker:
    """A routed call failed on the provider's side: count it, and open the breaker at the
    threshold (or again at once when it was the half-open probe)."""
    now = now or timezone.now()
    threshold = settings.TOLLGATE_BREAKER_FAILURES
    cooldown = timedelta(seconds=settings.TOLLGATE_BREAKER_COOLDOWN_SECONDS)
    with transaction.atomic():
        CircuitBreaker.objects.get_or_create(model_id=model_id)
        breaker = CircuitBreaker.objects.select_for_update().get(model_id=model_id)
        breaker.consecutive_failures += 1
        breaker.last_failure_at = now
        breaker.last_error = error[:200]
        was_probe = breaker.open_until is not None and breaker.open_until <= now
        if was_probe or (breaker.open_until is None and breaker.consecutive_failures >= threshold):
            breaker.open_until = now + cooldown
            breaker.probe_until = None
            breaker.times_opened += 1
        breaker.save()
    return breaker

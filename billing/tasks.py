"""Celery tasks of the billing app: each fetches and calls a service."""

from __future__ import annotations

import logging
from datetime import datetime

from celery import shared_task
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from .invoicing import month_close, months_due

logger = logging.getLogger(__name__)


@shared_task
def invoices_close_due(now: str | None = None) -> list[str]:
    """Finalize every tenant's previous month once its grace period is over (beat).

    `now`: an ISO 8601 instant with its offset, to act as of for a catch-up run; default
    the present. One that cannot be read, or lies in the future (it would finalize months
    not over yet), fails the task with ValueError and closes nothing."""
    at = _as_of(now) if now else None
    closed = []
    for tenant, month in months_due(now=at):
        for result in month_close(month=month, tenants=[tenant], now=at):
            outcome = f"{result.tenant.slug} {month:%Y-%m}: {result.outcome}"
            closed.append(outcome)
            if result.outcome.startswith("not finalized"):
                # Every ten minutes until someone acts (a price, or accepting the usage
                # unbilled): a warning, where alerting looks, not the task's INFO result.
                logger.warning("Month not closed: %s", outcome)
    return closed


def _as_of(now: str) -> datetime:
    try:
        at = parse_datetime(now)
    except ValueError:
        at = None
    if at is None:
        raise ValueError(f"now={now!r} is not an ISO 8601 instant, e.g. 2026-11-02T00:00Z.")
    if timezone.is_naive(at):
        raise ValueError(f"now={now!r} has no UTC offset; add one, e.g. Z or +08:00.")
    if at > timezone.now():
        raise ValueError(f"now={now!r} is in the future; a catch-up run acts as of the past.")
    return at

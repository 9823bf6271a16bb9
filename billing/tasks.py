"""Celery tasks of the billing app: each fetches and calls a service."""

from __future__ import annotations

from celery import shared_task
from django.utils.dateparse import parse_datetime

from .invoicing import month_close, months_due


@shared_task
def invoices_close_due(now: str | None = None) -> list[str]:
    """Finalize every tenant's previous month once its grace period is over (beat).

    `now`: an ISO 8601 instant to act as of, for a catch-up run; default the present."""
    at = parse_datetime(now) if now else None
    closed = []
    for tenant, month in months_due(now=at):
        for result in month_close(month=month, tenants=[tenant], now=at):
            closed.append(f"{result.tenant.slug} {month:%Y-%m}: {result.outcome}")
    return closed

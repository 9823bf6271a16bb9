"""Celery tasks of the billing app: each fetches and calls a service."""

from __future__ import annotations

from celery import shared_task

from .invoicing import month_close, months_due


@shared_task
def invoices_close_due() -> list[str]:
    """Finalize every tenant's previous month once its grace period is over (beat)."""
    closed = []
    for tenant, month in months_due():
        for result in month_close(month=month, tenants=[tenant]):
            closed.append(f"{result.tenant.slug} {month:%Y-%m}: {result.outcome}")
    return closed

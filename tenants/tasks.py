"""Celery tasks of the tenants app: each fetches and calls a service."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task

from .alerts import WebhookFailed, budget_alert_email, budget_alert_webhook
from .budgets import budget_holds_expire
from .limits import key_leases_expire


@shared_task
def budget_alert_notify(alert_id: int) -> None:
    """Email an alert now; deliver its webhook in its own task, with retries."""
    budget_alert_email(alert_id=alert_id)
    budget_alert_webhook_task.delay(alert_id)


@shared_task(
    bind=True,
    autoretry_for=(WebhookFailed,),
    retry_backoff=2,
    retry_backoff_max=600,
    retry_jitter=False,
    max_retries=8,
)
def budget_alert_webhook_task(self, alert_id: int) -> None:
    budget_alert_webhook(alert_id=alert_id, attempt=self.request.retries + 1)


@shared_task
def budget_holds_expire_task() -> int:
    """Release holds of calls whose process died before settling (beat, every minute)."""
    return budget_holds_expire(older_than=timedelta(hours=1))


@shared_task
def key_leases_expire_task() -> int:
    """Delete expired concurrency leases (beat, every minute); they already count for nothing."""
    return key_leases_expire()

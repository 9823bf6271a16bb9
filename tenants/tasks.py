"""Celery tasks of the tenants app: each fetches and calls a service."""

from __future__ import annotations

import smtplib
from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from .alerts import WebhookFailed, budget_alert_email, budget_alert_webhook
from .budgets import budget_holds_expire
from .limits import key_leases_expire
from .models import BudgetAlert


def budget_alert_queue(alert_id: int) -> None:
    """Queue an alert's webhook and email, each its own task with retries (a mail server
    down does not hold up the webhook), and mark the alert queued once its webhook is:
    tasks run in-process (the embedded default) raise what failed in them, and an email
    that cannot be sent must not have beat send the webhook again. The email is sent
    once whatever queues it (`emailed_at`)."""
    budget_alert_webhook_task.delay(alert_id)
    BudgetAlert.objects.filter(pk=alert_id).update(queued_at=timezone.now())
    budget_alert_email_task.delay(alert_id)


@shared_task
def budget_alert_notify(alert_id: int) -> None:
    """What earlier versions queued for an alert: its email and webhook, queued now."""
    budget_alert_queue(alert_id)


@shared_task(
    autoretry_for=(OSError, smtplib.SMTPException),
    retry_backoff=5,
    retry_backoff_max=600,
    retry_jitter=False,
    max_retries=8,
)
def budget_alert_email_task(alert_id: int) -> None:
    budget_alert_email(alert_id=alert_id)


@shared_task
def budget_alerts_queue_due_task() -> int:
    """Queue the alerts whose tasks never reached the broker (it was down when their
    threshold was crossed); beat, every minute. Returns how many."""
    settled = timezone.now() - timedelta(minutes=1)  # leave the on-commit queueing be
    due = BudgetAlert.objects.filter(queued_at__isnull=True, created_at__lt=settled)
    queued = 0
    for alert_id in due.values_list("pk", flat=True):
        budget_alert_queue(alert_id)
        queued += 1
    return queued


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

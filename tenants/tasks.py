"""Celery tasks of the tenants app: each fetches and calls a service."""

from __future__ import annotations

import logging
import smtplib
from datetime import timedelta

import kombu.exceptions
from celery import shared_task
from django.utils import timezone

from .alerts import WebhookFailed, budget_alert_email, budget_alert_webhook
from .budgets import budget_holds_expire
from .limits import key_leases_expire
from .models import BudgetAlert

logger = logging.getLogger(__name__)


def budget_alert_queue(alert_id: int) -> bool:
    """Queue an alert's webhook and email, each its own task with retries (a mail server
    down does not hold up the webhook, nor a receiver down the email). The alert is
    claimed first (`queued_at`), so that two queuers (the on-commit hook and beat, or two
    beat runs) send it once; a broker that cannot be reached gives the claim back for
    beat to try again. Whether this call queued it."""
    if not BudgetAlert.objects.filter(pk=alert_id, queued_at__isnull=True).update(
        queued_at=timezone.now()
    ):
        return False
    queued = False
    for task in (budget_alert_webhook_task, budget_alert_email_task):
        try:
            task.delay(alert_id)
            queued = True
        except kombu.exceptions.OperationalError:
            if queued:
                # The webhook went, the email did not: claimed all the same, so that
                # the webhook is not sent twice.
                logger.exception("Budget alert %s: its email could not be queued", alert_id)
                continue
            BudgetAlert.objects.filter(pk=alert_id).update(queued_at=None)
            raise
        except Exception:
            # Tasks run in-process (the embedded default, no broker) raise what failed
            # in them: logged, and the other one still goes.
            logger.exception("Budget alert %s: %s failed", alert_id, task.name)
    return True


@shared_task
def budget_alert_notify(alert_id: int) -> None:
    """What earlier versions queued for an alert (still in a queue at an upgrade): its
    webhook and email, queued now. Not claimed: such an alert is marked queued already."""
    budget_alert_webhook_task.delay(alert_id)
    budget_alert_email_task.delay(alert_id)


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
    now = timezone.now()
    due = BudgetAlert.objects.filter(
        queued_at__isnull=True,
        created_at__lt=now - timedelta(minutes=1),  # leave the on-commit queueing be
        created_at__gte=now - timedelta(days=2),  # news, not history
        # Sent by a process of the version before this column (a rolling deploy).
        emailed_at__isnull=True,
        deliveries__isnull=True,
    )
    return sum(budget_alert_queue(pk) for pk in due.values_list("pk", flat=True).distinct())


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

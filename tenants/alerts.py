"""Budget alerts: an email to the tenant's contact and a signed webhook to its URL.

Webhooks are signed like Stripe's: the header
`Tollgate-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">` under the
tenant's signing secret, which is derived from the server's key pepper (never stored) and
shown to the tenant's admins in the admin and the management API.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request

from django.conf import settings
from django.core.mail import send_mail
from django.utils import timezone

from .budgets import pico_to_usd, usd_str
from .models import BudgetAlert, Tenant, WebhookDelivery

WEBHOOK_TIMEOUT_SECONDS = 10
SIGNATURE_HEADER = "Tollgate-Signature"


class WebhookFailed(Exception):
    """A delivery attempt that did not get a 2xx answer; the task retries it."""


def webhook_signing_secret(tenant: Tenant) -> str:
    digest = hmac.new(
        settings.TOLLGATE_KEY_PEPPER.encode(), f"webhook:{tenant.pk}".encode(), hashlib.sha256
    ).hexdigest()
    return f"whsec_{digest}"


def webhook_signature(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def budget_alert_payload(alert: BudgetAlert) -> dict:
    budget = alert.period.budget
    return {
        "id": f"alert_{alert.pk}",
        "type": "budget.threshold_crossed",
        "created": int(alert.created_at.timestamp()),
        "data": {
            "tenant": budget.tenant.slug,
            "scope": budget.scope,
            "api_key": f"{budget.api_key.prefix}…" if budget.api_key_id else None,
            "threshold_percent": alert.threshold,
            "limit_usd": usd_str(budget.limit_usd),
            "spent_usd": usd_str(pico_to_usd(alert.spent_pico)),
            "hard": budget.hard,
            "period_start": alert.period.starts_at.isoformat(),
            "period_end": alert.period.ends_at.isoformat(),
        },
    }


def _alert_load(alert_id: int) -> BudgetAlert:
    return BudgetAlert.objects.select_related(
        "period__budget__tenant", "period__budget__api_key"
    ).get(pk=alert_id)


def budget_alert_email(*, alert_id: int) -> bool:
    """Email the alert to the tenant's contact, once. Returns whether it sent one."""
    alert = _alert_load(alert_id)
    tenant = alert.period.budget.tenant
    if alert.emailed_at is not None or not tenant.contact_email:
        return False
    data = budget_alert_payload(alert)["data"]
    scope = f"API key {data['api_key']}" if data["api_key"] else f"tenant {tenant.slug}"
    send_mail(
        subject=f"[Tollgate] {scope} has used {alert.threshold}% of its monthly budget",
        message=(
            f"The monthly budget of {scope} is ${data['limit_usd']}.\n"
            f"Spent so far this month: ${data['spent_usd']} "
            f"(period {data['period_start']} to {data['period_end']}).\n"
            + (
                "It is a hard budget: calls that may not fit are refused.\n"
                if data["hard"]
                else "It is a soft budget: calls are not refused.\n"
            )
        ),
        from_email=None,
        recipient_list=[tenant.contact_email],
    )
    BudgetAlert.objects.filter(pk=alert.pk).update(emailed_at=timezone.now())
    return True


def budget_alert_webhook(*, alert_id: int, attempt: int) -> WebhookDelivery | None:
    """POST the alert to the tenant's webhook URL and log the attempt.

    Raises WebhookFailed when the receiver does not answer 2xx, so the task retries.
    """
    alert = _alert_load(alert_id)
    tenant = alert.period.budget.tenant
    if not tenant.alert_webhook_url:
        return None
    payload = budget_alert_payload(alert)
    body = json.dumps(payload, separators=(",", ":")).encode()
    timestamp = int(time.time())
    request = urllib.request.Request(  # noqa: S310  (an http(s) URL validated by URLField)
        tenant.alert_webhook_url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "Tollgate-Webhook/1",
            SIGNATURE_HEADER: webhook_signature(webhook_signing_secret(tenant), body, timestamp),
        },
    )
    delivery = WebhookDelivery(
        tenant=tenant,
        alert=alert,
        url=tenant.alert_webhook_url,
        event=payload["type"],
        payload=payload,
        attempt=attempt,
    )
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:  # noqa: S310
            delivery.status_code = response.status
    except urllib.error.HTTPError as exc:
        delivery.status_code = exc.code
        delivery.error = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        delivery.error = str(getattr(exc, "reason", exc))[:500]
    delivery.succeeded = delivery.status_code is not None and 200 <= delivery.status_code < 300
    delivery.save()
    if not delivery.succeeded:
        raise WebhookFailed(f"Webhook to tenant {tenant.slug} failed: {delivery.error}")
    return delivery

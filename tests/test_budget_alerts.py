"""Budget alerts end to end: the gateway enqueues on a real Redis broker, a real Celery
worker emails and POSTs the signed webhook, and a receiver that fails at first gets the
delivery on a retry."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from tenants.alerts import webhook_signing_secret
from tenants.budgets import budget_set
from tenants.models import BudgetAlert, WebhookDelivery

from . import conftest
from .conftest import model_create
from .upstream import free_port, gunicorn_gateway_start


class Receiver:
    """A webhook endpoint that answers 500 to the first `failures` deliveries."""

    def __init__(self, failures: int):
        self.failures = failures
        self.received: list[tuple[dict, bytes, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = 500 if len(receiver.received) < receiver.failures else 200
                receiver.received.append((dict(self.headers), body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/tollgate"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    receiver = Receiver(failures=1)
    yield receiver
    receiver.stop()


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_a_failing_webhook_receiver_gets_the_alert_after_a_retry(
    world, gateway_with_worker, receiver
):
    model = model_create(
        "m-alert", provider=world.providers["openai"], input_=None, cached=None, output=Decimal("1")
    )
    world.tenant.allowed_models.add(model)
    world.tenant.alert_webhook_url = receiver.url
    world.tenant.contact_email = "finance@acme.test"
    world.tenant.save()
    budget_set(tenant=world.tenant, limit_usd=Decimal("0.00002"), alert_thresholds=[50])
    client = openai.OpenAI(base_url=gateway_with_worker.url, api_key=world.secret, max_retries=0)

    client.chat.completions.create(  # $0.00001: half the budget
        model="m-alert",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=10,
        extra_body={"mock": {"chunks": 20}},
    )

    wait_until(lambda: WebhookDelivery.objects.filter(succeeded=True).exists())
    deliveries = list(WebhookDelivery.objects.order_by("attempt"))
    assert [(d.attempt, d.status_code, d.succeeded) for d in deliveries] == [
        (1, 500, False),
        (2, 200, True),
    ]
    alert = BudgetAlert.objects.get()
    assert alert.threshold == 50
    wait_until(lambda: BudgetAlert.objects.get().emailed_at is not None)

    headers, body, _ = receiver.received[-1]
    payload = json.loads(body)
    assert payload["type"] == "budget.threshold_crossed"
    assert payload["data"]["threshold_percent"] == 50
    assert payload["data"]["spent_usd"] == "0.000010000000"
    assert payload["data"]["tenant"] == "acme"
    # The signature verifies with the tenant's secret, as a receiver would check it.
    stamp, signature = (part.split("=", 1)[1] for part in headers["Tollgate-Signature"].split(","))
    expected = hmac.new(
        webhook_signing_secret(world.tenant).encode(), f"{stamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(signature, expected)
    assert len(receiver.received) == 2  # and nothing after the success


def _alerting(world, receiver_url: str) -> None:
    model = model_create(
        "m-alert", provider=world.providers["openai"], input_=None, cached=None, output=Decimal("1")
    )
    world.tenant.allowed_models.add(model)
    world.tenant.alert_webhook_url = receiver_url
    world.tenant.contact_email = "finance@acme.test"
    world.tenant.save()
    budget_set(tenant=world.tenant, limit_usd=Decimal("0.00002"), alert_thresholds=[50])


def _half_the_budget(client: openai.OpenAI) -> None:
    client.chat.completions.create(  # $0.00001
        model="m-alert",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=10,
        extra_body={"mock": {"chunks": 20}},
    )


def _half_the_budget_with_the_broker_down(world) -> None:
    """The call through a gateway whose broker (a port nothing listens on) is down."""
    gateway = gunicorn_gateway_start(
        conftest.test_database_url(), CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0"
    )
    try:
        _half_the_budget(openai.OpenAI(base_url=gateway.url, api_key=world.secret))
    finally:
        gateway.stop()


def test_a_broker_down_costs_neither_the_answer_nor_the_alert(world):
    """The call's usage is committed when its alert is queued: a broker that cannot be
    reached then turned the answer into a 500, which the SDK retries (billed twice),
    and the alert was never sent."""
    from django.core import mail
    from django.utils import timezone

    from billing.models import UsageEvent
    from tenants.tasks import budget_alerts_queue_due_task

    receiver = Receiver(failures=0)
    _alerting(world, receiver.url)
    _half_the_budget_with_the_broker_down(world)

    assert UsageEvent.objects.count() == 1
    alert = BudgetAlert.objects.get()
    assert alert.queued_at is None and not receiver.received and not mail.outbox
    # The broker back, beat queues what never reached it (the tests run tasks in-process).
    assert budget_alerts_queue_due_task() == 0  # a minute's grace for the on-commit queueing
    BudgetAlert.objects.update(created_at=timezone.now() - timedelta(minutes=2))
    assert budget_alerts_queue_due_task() == 1
    assert budget_alerts_queue_due_task() == 0
    receiver.stop()
    assert [json.loads(body)["data"]["threshold_percent"] for _, body, _ in receiver.received] == [
        50
    ]
    assert [m.to for m in mail.outbox] == [["finance@acme.test"]]


def test_a_mail_server_down_does_not_hold_up_the_webhook(world, monkeypatch):
    from tenants import alerts

    def refused(**_):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(alerts, "send_mail", refused)
    receiver = Receiver(failures=0)
    _alerting(world, receiver.url)

    _half_the_budget(world.client())

    receiver.stop()
    assert len(receiver.received) == 1
    alert = BudgetAlert.objects.get()
    assert alert.queued_at is not None and alert.emailed_at is None


def test_a_webhook_receiver_down_does_not_hold_up_the_email_in_process(world):
    """With tasks run in-process (no broker), the webhook task's failure was raised out
    of the queueing, and the email after it never went."""
    from django.core import mail

    _alerting(world, f"http://127.0.0.1:{free_port()}/hooks")  # a receiver not there

    _half_the_budget(world.client())

    assert [m.to for m in mail.outbox] == [["finance@acme.test"]]
    alert = BudgetAlert.objects.get()
    assert alert.queued_at is not None and alert.emailed_at is not None
    assert not WebhookDelivery.objects.filter(succeeded=True).exists()


def test_beat_queues_an_unsent_alert_once_and_leaves_old_or_sent_ones(world):
    from django.utils import timezone

    from tenants.tasks import budget_alert_queue, budget_alerts_queue_due_task

    receiver = Receiver(failures=0)
    _alerting(world, receiver.url)
    _half_the_budget_with_the_broker_down(world)
    alert = BudgetAlert.objects.get()
    BudgetAlert.objects.update(created_at=timezone.now() - timedelta(minutes=2))

    assert budget_alert_queue(alert.pk) is True  # beat's run, say
    assert budget_alert_queue(alert.pk) is False  # and another at the same time
    assert budget_alerts_queue_due_task() == 0
    receiver.stop()
    assert len(receiver.received) == 1
    # Older than two days and never queued (left from a laptop without a broker): news
    # no more, not sent.
    WebhookDelivery.objects.all().delete()
    BudgetAlert.objects.update(
        queued_at=None, emailed_at=None, created_at=timezone.now() - timedelta(days=3)
    )
    assert budget_alerts_queue_due_task() == 0
    # One sent already by a process of the version before queued_at: not sent again.
    BudgetAlert.objects.update(created_at=timezone.now() - timedelta(minutes=2))
    WebhookDelivery.objects.create(
        tenant=world.tenant,
        alert=alert,
        url=receiver.url,
        event="budget.threshold_crossed",
        payload={},
        attempt=1,
        status_code=200,
        succeeded=True,
    )
    assert budget_alerts_queue_due_task() == 0
    WebhookDelivery.objects.all().delete()
    assert budget_alerts_queue_due_task() == 1


def test_an_email_that_cannot_be_queued_after_its_webhook_leaves_the_alert_claimed(
    world, monkeypatch
):
    """The webhook was queued, the broker then failed on the email: the claim was given
    back, and beat sent the webhook a second time."""
    import kombu.exceptions

    from tenants import tasks

    def broker_gone(*args, **kwargs):
        raise kombu.exceptions.OperationalError("Error 111 connecting to the broker")

    receiver = Receiver(failures=0)
    _alerting(world, receiver.url)
    monkeypatch.setattr(tasks.budget_alert_email_task, "delay", broker_gone)

    _half_the_budget(world.client())

    receiver.stop()
    assert len(receiver.received) == 1
    assert BudgetAlert.objects.get().queued_at is not None  # beat will not send it again

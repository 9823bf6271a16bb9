"""Budgets, rate limits and key lifecycle hammered concurrently through the production
server: two gunicorn servers with two worker processes each, on the test database
(PostgreSQL in CI's second run). Requests alternate between the two servers."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import httpx2
import pytest
from django.db.models import Sum
from django.utils import timezone

from billing.models import UsageEvent
from tenants.budgets import budget_set, budget_status, reserved_total_pico
from tenants.models import PICO, ApiKey, BudgetReservation, KeyLease
from tenants.services import api_key_issue, api_key_rotate, key_revoke

from .conftest import model_create

CALL = Decimal("0.00001")  # 10 output tokens at $1 per 1M, no input price
MESSAGES = [{"role": "user", "content": "hello there world"}]


@pytest.fixture
def gateway(world, gunicorn_gateway, second_gunicorn_gateway):
    model = model_create(
        "m-load", provider=world.providers["openai"], input_=None, cached=None, output=Decimal("1")
    )
    world.tenant.allowed_models.add(model)
    world.extra["urls"] = [gunicorn_gateway.url, second_gunicorn_gateway.url]
    return world


def body(**mock) -> dict:
    return {
        "model": "m-load",
        "messages": MESSAGES,
        "max_tokens": 10,
        "mock": {"chunks": 20, **mock},
    }


def fire(urls: list[str], requests: list[tuple[str, dict]], *, hang_up_after: int | None = None):
    """Send all requests at once, alternating between the servers (one thread and
    connection each); return the responses as (status, json body or None, headers)."""
    barrier = threading.Barrier(len(requests))

    def send(numbered):
        number, (secret, payload) = numbered
        url = urls[number % len(urls)]
        with httpx2.Client(timeout=60) as http:
            barrier.wait()
            if payload.get("stream") and hang_up_after is not None:
                with http.stream(
                    "POST",
                    f"{url}/chat/completions",
                    json=payload,
                    headers={"Authorization": f"Bearer {secret}"},
                ) as response:
                    if response.status_code == 200:
                        for seen, _line in enumerate(response.iter_lines()):
                            if seen >= hang_up_after:
                                break
                    else:
                        response.read()
                    return response.status_code, None, response.headers
            response = http.post(
                f"{url}/chat/completions",
                json=payload,
                headers={"Authorization": f"Bearer {secret}"},
            )
            return response.status_code, response.json(), response.headers

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(send, enumerate(requests)))


def codes(results, status):
    return [r for r in results if r[0] == status]


def settled(timeout: float = 30.0) -> None:
    """Wait until no call is under way (streams cut by their client drain first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live_leases = KeyLease.objects.filter(expires_at__gt=timezone.now())
        if not BudgetReservation.objects.exists() and not live_leases.exists():
            return
        time.sleep(0.1)
    raise AssertionError("reservations or leases were left behind")


def assert_budget_holds(budget, limit: Decimal) -> None:
    status = budget_status(budget)
    ledger = UsageEvent.objects.aggregate(total=Sum("cost"))["total"] or Decimal(0)
    assert status.spent <= limit
    assert status.spent == ledger.quantize(Decimal("1e-12"))
    assert status.reserved == 0
    assert reserved_total_pico() == 0
    assert not BudgetReservation.objects.exists()


def test_hard_budget_holds_under_100_concurrent_requests(gateway):
    budget = budget_set(tenant=gateway.tenant, limit_usd=CALL * 7)

    results = fire(gateway.extra["urls"], [(gateway.secret, body())] * 100)

    assert len(codes(results, 200)) == 7
    refused = codes(results, 429)
    assert len(refused) == 93
    assert {r[1]["error"]["code"] for r in refused} == {"insufficient_quota"}
    assert {r[2]["x-should-retry"] for r in refused} == {"false"}
    settled()
    assert_budget_holds(budget, CALL * 7)
    assert budget_status(budget).spent == CALL * 7


def test_hard_budget_holds_when_the_upstream_fails_for_some(gateway):
    budget = budget_set(tenant=gateway.tenant, limit_usd=CALL * 7)
    # First only failures: the calls admitted fail, spend nothing and give their
    # reservations back.
    failures = fire(gateway.extra["urls"], [(gateway.secret, body(status=500))] * 20)
    assert len(codes(failures, 502)) >= 1
    assert len(codes(failures, 502)) + len(codes(failures, 429)) == 20
    settled()
    assert budget_status(budget).spent == 0 and budget_status(budget).reserved == 0
    # Then a third failing among the rest, all at once.
    requests = [(gateway.secret, body(status=500) if i % 3 == 0 else body()) for i in range(100)]

    results = fire(gateway.extra["urls"], requests)

    served = codes(results, 200)
    assert 1 <= len(served) <= 7
    assert len(served) + len(codes(results, 502)) + len(codes(results, 429)) == 100
    settled()
    assert_budget_holds(budget, CALL * 7)
    assert budget_status(budget).spent == CALL * len(served)


def test_hard_budget_holds_when_clients_hang_up_mid_stream(gateway):
    budget = budget_set(tenant=gateway.tenant, limit_usd=CALL * 7)
    # 1.2 s a stream, so that a client thread the loaded machine runs late still hangs
    # up before its stream ends (at 20 ms a chunk, one CI run saw every stream finish).
    stream = {**body(interval_ms=60), "stream": True}

    results = fire(gateway.extra["urls"], [(gateway.secret, stream)] * 60, hang_up_after=3)

    assert len(codes(results, 200)) <= 7
    settled()
    assert_budget_holds(budget, CALL * 7)
    cancelled = UsageEvent.objects.filter(status=UsageEvent.Status.CLIENT_CANCELLED)
    assert cancelled.exists()
    # Drained to the end: the provider's own figures, all ten tokens.
    assert set(cancelled.values_list("output_tokens", flat=True)) == {10}


def test_key_budget_inside_tenant_budget_across_two_processes(gateway):
    tenant_budget = budget_set(tenant=gateway.tenant, limit_usd=CALL * 5)
    small_secret = api_key_issue(tenant=gateway.tenant, name="small").secret
    small = ApiKey.objects.get(name="small")
    key_budget = budget_set(tenant=gateway.tenant, key=small, limit_usd=CALL * 3)

    requests = [(small_secret, body())] * 20 + [(gateway.secret, body())] * 20
    results = fire(gateway.extra["urls"], requests)

    small_served = len(codes(results[:20], 200))
    assert small_served <= 3
    assert small_served + len(codes(results[20:], 200)) == 5
    settled()
    assert budget_status(tenant_budget).spent == CALL * 5
    assert budget_status(key_budget).spent == CALL * small_served
    assert_budget_holds(tenant_budget, CALL * 5)


def wait_for_a_fresh_minute() -> None:
    """Per-minute windows: keep a burst inside one of them."""
    if timezone.now().second >= 45:
        time.sleep(61 - timezone.now().second)


def test_requests_per_minute_hold_across_two_processes(gateway):
    key = ApiKey.objects.get(tenant=gateway.tenant)
    key.rpm_limit = 5
    key.save()
    wait_for_a_fresh_minute()

    results = fire(gateway.extra["urls"], [(gateway.secret, body())] * 20)

    ok = codes(results, 200)
    refused = codes(results, 429)
    assert (len(ok), len(refused)) == (5, 15)
    assert {r[1]["error"]["code"] for r in refused} == {"rate_limit_exceeded"}
    assert all(1 <= int(r[2]["retry-after"]) <= 60 for r in refused)
    assert {r[2]["x-ratelimit-limit-requests"] for r in results} == {"5"}
    assert {r[2]["x-ratelimit-remaining-requests"] for r in refused} == {"0"}
    assert sorted(int(r[2]["x-ratelimit-remaining-requests"]) for r in ok) == [0, 1, 2, 3, 4]


def test_concurrency_limit_holds_across_two_processes(gateway):
    key = ApiKey.objects.get(tenant=gateway.tenant)
    key.concurrency_limit = 3
    key.save()

    # Five seconds each: all twelve arrive while the first three are still running.
    results = fire(gateway.extra["urls"], [(gateway.secret, body(latency_ms=5000))] * 12)

    assert len(codes(results, 200)) == 3
    refused = codes(results, 429)
    assert len(refused) == 9
    assert "concurrent" in refused[0][1]["error"]["message"]
    settled()
    # Once the three are done, the key is free again.
    assert fire(gateway.extra["urls"], [(gateway.secret, body())])[0][0] == 200


def test_revoked_key_is_refused_by_the_other_process_at_once(gateway):
    urls = gateway.extra["urls"]
    assert {r[0] for r in fire(urls, [(gateway.secret, body())] * 4)} == {200}

    key_revoke(key=ApiKey.objects.get(tenant=gateway.tenant))

    results = fire(urls, [(gateway.secret, body())] * 4)  # both servers, both workers
    assert {r[0] for r in results} == {401}


def test_suspended_tenant_is_refused_by_every_process_at_once(gateway):
    from tenants.services import tenant_suspend

    urls = gateway.extra["urls"]
    assert {r[0] for r in fire(urls, [(gateway.secret, body())] * 4)} == {200}
    tenant_suspend(tenant=gateway.tenant)
    results = fire(urls, [(gateway.secret, body())] * 4)
    assert {r[0] for r in results} == {403}
    assert {r[1]["error"]["code"] for r in results} == {"tenant_suspended"}


def test_rotated_key_works_during_its_grace_period_and_not_after(gateway):
    urls = gateway.extra["urls"]
    old = ApiKey.objects.get(tenant=gateway.tenant)
    new_secret = api_key_rotate(key=old, grace=timedelta(seconds=2)).secret

    assert {r[0] for r in fire(urls, [(gateway.secret, body()), (new_secret, body())])} == {200}
    time.sleep(2.2)
    after = fire(urls, [(gateway.secret, body()), (new_secret, body())])
    assert [r[0] for r in after] == [401, 200]
    assert "expired" in after[0][1]["error"]["message"]


def test_expired_key_is_refused(gateway):
    key = ApiKey.objects.get(tenant=gateway.tenant)
    key.expires_at = timezone.now() - timedelta(seconds=1)
    key.save()
    assert fire(gateway.extra["urls"], [(gateway.secret, body())])[0][0] == 401


def test_ledger_and_counters_agree_after_a_load_test(gateway):
    from tenants.budgets import budget_rebuild

    budget = budget_set(tenant=gateway.tenant, limit_usd=Decimal("1"), hard=True)
    fire(gateway.extra["urls"], [(gateway.secret, body())] * 50)
    settled()
    assert budget_rebuild() == []
    assert budget_status(budget).spent == CALL * 50
    assert int(budget_status(budget).spent * PICO) == 50 * 10 * 10**6


def test_every_limit_and_budget_at_once_under_load_never_deadlocks(gateway):
    key = ApiKey.objects.get(tenant=gateway.tenant)
    key.rpm_limit, key.tpm_limit, key.concurrency_limit = 10_000, 10_000_000, 1_000
    key.save()
    budget_set(tenant=gateway.tenant, limit_usd=Decimal("100"))
    budget_set(tenant=gateway.tenant, key=key, limit_usd=Decimal("100"))

    results = fire(gateway.extra["urls"], [(gateway.secret, body())] * 60)

    assert [r[0] for r in results] == [200] * 60
    settled()
    assert budget_status(key.budgets.get()).spent == CALL * 60

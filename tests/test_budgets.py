"""Monthly budgets: reservations before the call, settlement after it, refusals the SDK
does not retry, alerts once per threshold, counters that equal the ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import httpx2
import openai
import pytest
from django.core import mail
from django.core.management import call_command
from django.utils import timezone

from billing.models import UsageEvent
from tenants.budgets import budget_month, budget_rebuild, budget_set, budget_status
from tenants.models import ApiKey, BudgetAlert, BudgetPeriod, BudgetReservation
from tenants.services import api_key_issue, tenant_create

from .conftest import api, model_create

# Output at $1.00 per 1M and no input price: a call of max_tokens=10 costs exactly what it
# reserves, $0.00001.
CALL = Decimal("0.00001")
MESSAGES = [{"role": "user", "content": "hello there world"}]


@pytest.fixture
def metered(world):
    model = model_create(
        "m-budget",
        provider=world.providers["openai"],
        input_=None,
        cached=None,
        output=Decimal("1"),
    )
    world.tenant.allowed_models.add(model)
    world.tenant.contact_email = "finance@acme.test"
    world.tenant.save()
    return world


def call(world, secret=None, **mock):
    return world.client(secret).chat.completions.create(
        model="m-budget",
        messages=MESSAGES,
        max_tokens=10,
        extra_body={"mock": {"chunks": 20, **mock}},
    )


def test_month_boundaries_follow_the_tenants_time_zone():
    # 2026-11-01 is the day New York leaves daylight time.
    oct_start, oct_end = budget_month(datetime(2026, 10, 31, 23, 59, tzinfo=UTC), "UTC")
    assert (oct_start, oct_end) == (
        datetime(2026, 10, 1, tzinfo=UTC),
        datetime(2026, 11, 1, tzinfo=UTC),
    )
    # 03:59:59 UTC on Nov 1 is still October 31 in New York (EDT, UTC-4)...
    start, end = budget_month(datetime(2026, 11, 1, 3, 59, 59, tzinfo=UTC), "America/New_York")
    assert (start, end) == (
        datetime(2026, 10, 1, 4, tzinfo=UTC),
        datetime(2026, 11, 1, 4, tzinfo=UTC),
    )
    # ...and November there ends at midnight EST (UTC-5).
    start, end = budget_month(datetime(2026, 11, 1, 4, tzinfo=UTC), "America/New_York")
    assert (start, end) == (
        datetime(2026, 11, 1, 4, tzinfo=UTC),
        datetime(2026, 12, 1, 5, tzinfo=UTC),
    )


def test_a_call_reserves_its_worst_case_and_settles_to_its_cost(metered):
    budget = budget_set(tenant=metered.tenant, limit_usd=Decimal("1"))
    completion = call(metered)

    event = UsageEvent.objects.get(request_id=completion._request_id)
    assert event.cost == CALL
    status = budget_status(budget)
    assert (status.spent, status.reserved) == (CALL, 0)
    assert not BudgetReservation.objects.exists()


def test_over_budget_is_a_429_the_sdk_does_not_retry(metered):
    budget_set(tenant=metered.tenant, limit_usd=CALL * 2)
    sent = []
    client = openai.OpenAI(
        base_url=metered.url,
        api_key=metered.secret,
        max_retries=2,
        http_client=httpx2.Client(event_hooks={"request": [sent.append]}),
    )
    body = {"model": "m-budget", "messages": MESSAGES, "max_tokens": 10}
    for _ in range(2):
        client.chat.completions.create(**body, extra_body={"mock": {"chunks": 20}})

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**body, extra_body={"mock": {"chunks": 20}})

    assert len(sent) == 3  # no retry of the refusal
    error = caught.value
    assert error.code == "insufficient_quota"
    assert error.body["type"] == "insufficient_quota"
    assert error.response.headers["x-should-retry"] == "false"
    assert "The monthly budget of this tenant cannot cover this request: limit $0.00002, " in (
        error.message
    )
    assert "$0.00 left until" in error.message
    assert "UTC, and the request may cost up to $0.00001." in error.message
    assert UsageEvent.objects.count() == 2  # nothing reached the provider


def test_a_budget_nothing_was_spent_from_says_it_cannot_cover_the_request(metered):
    """Refused before spending anything: the budget is not "exhausted", and the message
    says which budget, its limit, what is left until when, and the request's worst case."""
    key = ApiKey.objects.get(tenant=metered.tenant)
    budget_set(tenant=metered.tenant, key=key, limit_usd=CALL / 2)

    with pytest.raises(openai.RateLimitError) as caught:
        call(metered)

    _, ends_at = budget_month(timezone.now(), "UTC")
    assert caught.value.code == "insufficient_quota"
    assert caught.value.body["message"] == (
        f"The monthly budget of API key {key.prefix}… cannot cover this request: limit "
        f"$0.000005, $0.000005 left until {ends_at:%Y-%m-%d %H:%M} UTC, and the request may "
        "cost up to $0.00001."
    )
    assert UsageEvent.objects.count() == 0


def test_a_worst_case_beyond_any_budget_is_a_429_not_a_database_overflow(metered):
    # 10^14 choices of a token at $1 per 1M: $10^8, 10^20 picodollars, more than a 64-bit
    # integer.
    budget = budget_set(tenant=metered.tenant, limit_usd=Decimal("1"))
    with pytest.raises(openai.RateLimitError) as caught:
        metered.client().chat.completions.create(
            model="m-budget", messages=MESSAGES, max_tokens=1, n=10**14
        )
    assert caught.value.code == "insufficient_quota"
    assert "may cost up to $100,000,000.00" in caught.value.message
    assert budget_status(budget).reserved == 0
    assert not BudgetReservation.objects.exists()
    assert UsageEvent.objects.count() == 0
    call(metered)  # and the budget still serves calls that fit


def test_a_worst_case_beyond_decimal_precision_is_a_429_too(metered):
    # 10^40 choices: a bound of 41 digits, beyond the 28 of Python's default decimal context.
    budget_set(tenant=metered.tenant, limit_usd=Decimal("1"))
    with pytest.raises(openai.RateLimitError) as caught:
        metered.client().chat.completions.create(
            model="m-budget", messages=MESSAGES, max_tokens=1, n=10**40
        )
    assert caught.value.code == "insufficient_quota"
    assert "may cost up to $10,000,000,000,000,000,000,000,000,000,000,000.00" in (
        caught.value.message
    )
    assert UsageEvent.objects.count() == 0


@pytest.mark.parametrize(
    ("asked", "sent"),
    [
        # max_completion_tokens alone: DeepSeek, Qwen, Kimi and GLM read max_tokens only,
        # so the provider is sent both (the reservation counted 30 tokens).
        ({"max_completion_tokens": 30}, {"max_tokens": 30, "max_completion_tokens": 30}),
        # Either field, whichever the provider reads, is held to the larger one.
        (
            {"max_tokens": 30, "max_completion_tokens": 40},
            {"max_tokens": 30, "max_completion_tokens": 40},
        ),
        # Beyond the model's output cap (8192): the call is held to the cap, not refused
        # for a cost it cannot reach.
        ({"max_tokens": 10**14}, {"max_tokens": 8192}),
        (
            {"max_completion_tokens": 100_000},
            {"max_tokens": 8192, "max_completion_tokens": 8192},
        ),
    ],
)
def test_a_call_under_a_budget_is_held_to_what_was_reserved(metered, asked, sent):
    budget_set(tenant=metered.tenant, limit_usd=Decimal("0.01"))  # 10,000 output tokens
    completion = metered.client().chat.completions.create(
        model="m-budget",
        messages=MESSAGES,
        extra_body={**asked, "mock": {"chunks": 50, "echo_request": True}},
    )
    upstream = completion.model_extra["mock_request"]
    assert {name: upstream.get(name) for name in sent} == sent
    assert set(sent) | {"max_tokens"} >= {k for k in upstream if k.startswith("max_")}


def test_key_budget_applies_inside_the_tenant_budget(metered):
    budget_set(tenant=metered.tenant, limit_usd=CALL * 3)
    small = api_key_issue(tenant=metered.tenant, name="small").secret
    budget_set(tenant=metered.tenant, key=ApiKey.objects.get(name="small"), limit_usd=CALL * 1)

    call(metered, small)
    with pytest.raises(openai.RateLimitError, match="API key tg-"):
        call(metered, small)
    call(metered)
    call(metered)
    with pytest.raises(openai.RateLimitError, match="this tenant"):
        call(metered)


def test_soft_budget_never_refuses_but_alerts(metered):
    budget = budget_set(tenant=metered.tenant, limit_usd=CALL * 2, hard=False)
    for _ in range(3):
        call(metered)
    status = budget_status(budget)
    assert status.spent == CALL * 3
    assert sorted(BudgetAlert.objects.values_list("threshold", flat=True)) == [50, 80, 100]


def test_alerts_fire_once_per_threshold_per_period(metered):
    budget_set(tenant=metered.tenant, limit_usd=CALL * 10, alert_thresholds=[30, 50])
    for _ in range(2):
        call(metered)
    assert not BudgetAlert.objects.exists()
    call(metered)  # 30 %
    assert list(BudgetAlert.objects.values_list("threshold", flat=True)) == [30]
    call(metered)
    call(metered)  # 50 %
    for _ in range(3):
        call(metered)  # 80 %: no threshold left
    assert sorted(BudgetAlert.objects.values_list("threshold", flat=True)) == [30, 50]
    assert [m.subject for m in mail.outbox] == [
        "[Tollgate] tenant acme has used 30% of its monthly budget",
        "[Tollgate] tenant acme has used 50% of its monthly budget",
    ]
    assert mail.outbox[0].to == ["finance@acme.test"]


def test_upstream_failures_and_refusals_release_everything(metered):
    budget = budget_set(tenant=metered.tenant, limit_usd=CALL * 2)
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            call(metered, status=503)
    call(metered)
    call(metered)
    with pytest.raises(openai.RateLimitError):
        call(metered)

    status = budget_status(budget)
    assert (status.spent, status.reserved) == (CALL * 2, 0)
    assert not BudgetReservation.objects.exists()


def test_the_gateway_caps_output_when_the_client_sets_none(metered):
    budget_set(tenant=metered.tenant, limit_usd=Decimal("1"))
    completion = metered.client().chat.completions.create(
        model="m-budget",
        messages=MESSAGES,
        extra_body={"mock": {"chunks": 50, "echo_request": True}},
    )
    # The reservation assumed the model's cap (8192): the provider is told so.
    assert completion.model_extra["mock_request"]["max_tokens"] == 8192


def test_budget_endpoint_tells_a_key_what_is_left(metered):
    budget_set(tenant=metered.tenant, limit_usd=Decimal("0.5"))
    call(metered)
    response = httpx2.get(
        f"{metered.url}/budget", headers={"Authorization": f"Bearer {metered.secret}"}
    )
    body = response.json()
    assert response.status_code == 200
    assert body["object"] == "budget"
    assert body["key"] is None
    tenant = body["tenant"]
    assert Decimal(tenant["limit_usd"]) == Decimal("0.5")
    assert Decimal(tenant["spent_usd"]) == CALL
    assert Decimal(tenant["reserved_usd"]) == 0
    assert Decimal(tenant["remaining_usd"]) == Decimal("0.5") - CALL
    assert tenant["period_end"] > tenant["period_start"]


def test_budget_amounts_are_plain_decimals_at_zero_and_below_a_millionth(metered, superuser_token):
    from django.utils import timezone

    from tenants.budgets import budget_reserve
    from tenants.selectors import api_key_for_digest
    from tenants.services import key_digest

    budget = budget_set(tenant=metered.tenant, limit_usd=Decimal("0.5"))

    def amounts():
        client = httpx2.get(
            f"{metered.url}/budget", headers={"Authorization": f"Bearer {metered.secret}"}
        ).json()["tenant"]
        staff = api(token=superuser_token).get(f"/api/budgets/{budget.pk}/").json()
        fields = ("spent_usd", "reserved_usd", "remaining_usd")
        return [client[f] for f in fields], [staff[f] for f in fields]

    # Nothing spent or held: no "0E-12".
    zero = ["0.000000000000", "0.000000000000", "0.500000000000"]
    assert amounts() == (zero, zero)

    # A hold of $0.00000015 keeps every digit, with no "1.50000E-7".
    key = api_key_for_digest(key_digest(metered.secret))
    budget_reserve(
        key=key, tz_name="UTC", request_id="req_tiny", at=timezone.now(), amount=Decimal("15e-8")
    )
    held = ["0.000000000000", "0.000000150000", "0.499999850000"]
    assert amounts() == (held, held)


@pytest.mark.django_db
def test_an_alert_webhook_writes_a_spent_below_a_millionth_in_full():
    from tenants.alerts import budget_alert_payload

    tenant = tenant_create(slug="tiny", name="Tiny", model_ids=[])
    budget = budget_set(tenant=tenant, limit_usd=Decimal("0.000001"), alert_thresholds=[50])
    period = BudgetPeriod.objects.get(budget=budget)
    alert = BudgetAlert.objects.create(period=period, threshold=50, spent_pico=500_000)
    data = budget_alert_payload(BudgetAlert.objects.get(pk=alert.pk))["data"]
    assert (data["limit_usd"], data["spent_usd"]) == ("0.000001", "0.000000500000")


def test_counters_rebuilt_from_the_ledger_equal_the_live_ones(metered):
    budget_set(tenant=metered.tenant, limit_usd=Decimal("1"))
    for _ in range(5):
        call(metered)
    assert budget_rebuild() == []

    BudgetPeriod.objects.update(spent_pico=1)  # a drifted counter
    drifts = budget_rebuild(fix=True)
    assert len(drifts) == 1 and drifts[0].ledger_pico == 5 * 10_000_000
    assert budget_rebuild() == []


def test_budget_set_command(metered, capsys):
    key = ApiKey.objects.get(tenant=metered.tenant)
    call_command("budget_set", "acme", "12.50", "--soft", "--alerts", "25,75")
    call_command("budget_set", "acme", "3", "--key", key.prefix)
    out = capsys.readouterr().out
    assert "Budget of tenant acme: $12.50 a month (soft), alerts at 25%, 75%" in out
    assert f"Budget of key {key.prefix}…: $3.00 a month (hard)" in out


POSITIVE = "The limit must be a positive amount in USD."


@pytest.mark.django_db(transaction=True)  # run_from_argv closes the connection
@pytest.mark.parametrize(
    ("usd", "error"),
    [
        ("-5", POSITIVE),
        ("0", POSITIVE),
        ("NaN", POSITIVE),
        ("Infinity", POSITIVE),
        ("abc", "'abc' is not an amount in USD."),
        # What the API refuses too: more than 6 decimal places.
        ("0.0000001", "Ensure that there are no more than 6 decimal places."),
        # Past 2^63 picodollars, which the counters compare in SQL.
        ("9000000.000001", "The limit must be at most 9,000,000 USD a month."),
        ("999999999999.999999", "The limit must be at most 9,000,000 USD a month."),
        ("1e400", "The limit must be at most 9,000,000 USD a month."),
    ],
)
def test_budget_set_command_refuses_a_bad_limit_in_one_line(usd, error, capsys):
    from django.core.management import load_command_class

    from tenants.models import Budget

    tenant_create(slug="acme", name="Acme", model_ids=[])
    # As from the shell: a CommandError that escapes run_from_argv is a traceback.
    with pytest.raises(SystemExit) as exited:
        load_command_class("tenants", "budget_set").run_from_argv(
            ["manage.py", "budget_set", "acme", usd]
        )
    assert exited.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"CommandError: {error}"
    assert not Budget.objects.exists()


def test_holds_and_leases_of_dead_processes_are_released(metered):
    from datetime import timedelta

    from django.utils import timezone

    from tenants.budgets import budget_holds_expire, budget_reserve
    from tenants.limits import key_leases_expire
    from tenants.models import KeyLease
    from tenants.selectors import api_key_for_digest
    from tenants.services import key_digest
    from tenants.tasks import budget_holds_expire_task, key_leases_expire_task

    budget = budget_set(tenant=metered.tenant, limit_usd=Decimal("1"))
    key = api_key_for_digest(key_digest(metered.secret))
    budget_reserve(
        key=key, tz_name="UTC", request_id="req_dead", at=timezone.now(), amount=Decimal("0.4")
    )
    KeyLease.objects.create(api_key=key, request_id="req_dead", expires_at=timezone.now())
    assert budget_status(budget).reserved == Decimal("0.4")

    assert budget_holds_expire(older_than=timedelta(hours=1)) == 0  # still young
    BudgetReservation.objects.update(created_at=timezone.now() - timedelta(hours=2))
    assert budget_holds_expire_task.delay().get() == 1
    assert key_leases_expire_task.delay().get() == 1
    assert budget_status(budget).reserved == 0
    assert not BudgetReservation.objects.exists() and not KeyLease.objects.exists()
    assert key_leases_expire() == 0


def _stream_started(world, **mock):
    """A stream under way (its first chunk read) and its request id."""
    raw = world.client().chat.completions.with_raw_response.create(
        model="m-budget",
        messages=MESSAGES,
        max_tokens=10,
        stream=True,
        extra_body={"mock": {"chunks": 10, "interval_ms": 60, **mock}},
    )
    stream = raw.parse()
    chunks = iter(stream)
    next(chunks)
    return raw.headers["x-request-id"], chunks


def test_a_call_whose_hold_was_released_while_it_ran_is_still_metered(metered):
    """The hour's expiry released a running call's hold as a dead process's: its
    settlement then released it again, the period's reserved went below zero, and the
    ledger row was rolled back (logged, never billed)."""
    from datetime import timedelta

    from tenants.budgets import budget_holds_expire

    budget = budget_set(tenant=metered.tenant, limit_usd=Decimal("1"))
    request_id, chunks = _stream_started(metered)
    assert BudgetReservation.objects.filter(request_id=request_id).exists()

    assert budget_holds_expire(older_than=timedelta(0)) == 1
    list(chunks)

    event = UsageEvent.objects.get(request_id=request_id)
    assert (event.status, event.output_tokens) == (UsageEvent.Status.OK, 10)
    status = budget_status(budget)
    assert (status.spent, status.reserved) == (CALL, 0)
    assert budget_rebuild() == []


def test_a_long_stream_keeps_its_holds_from_expiring(metered, monkeypatch):
    from datetime import timedelta

    from routing import proxy
    from tenants.budgets import budget_holds_expire

    # Renewed every 10 ms instead of every 2.5 minutes.
    monkeypatch.setattr(proxy, "LEASE_TTL", timedelta(milliseconds=40))
    budget = budget_set(tenant=metered.tenant, limit_usd=Decimal("1"))
    request_id, chunks = _stream_started(metered)
    BudgetReservation.objects.update(created_at=timezone.now() - timedelta(hours=2))
    next(chunks)
    next(chunks)

    assert budget_holds_expire(older_than=timedelta(hours=1)) == 0  # renewed: alive
    assert BudgetReservation.objects.filter(request_id=request_id).exists()
    list(chunks)
    assert budget_status(budget).spent == CALL


def test_a_budget_made_without_the_service_still_counts_the_month_so_far(metered):
    from tenants.models import Budget

    call(metered)
    call(metered)
    budget = Budget.objects.create(tenant=metered.tenant, limit_usd=Decimal("1"))
    call(metered)
    assert budget_status(budget).spent == CALL * 3
    assert budget_rebuild() == []


def test_a_new_month_starts_from_zero_by_itself(metered):
    from datetime import timedelta

    from tenants.budgets import budget_reserve, budget_settle, budgets_for_key
    from tenants.selectors import api_key_for_digest
    from tenants.services import key_digest

    budget = budget_set(tenant=metered.tenant, limit_usd=CALL * 2)
    call(metered)
    call(metered)
    with pytest.raises(openai.RateLimitError):
        call(metered)

    # The first call of next month: a period of its own, empty, with no job having run.
    key = api_key_for_digest(key_digest(metered.secret))
    _, next_month = budget_month(datetime.now(UTC), "UTC")
    at = next_month + timedelta(minutes=1)
    assert budget_reserve(key=key, tz_name="UTC", request_id="req_next", at=at, amount=CALL)
    budgets = budgets_for_key(tenant_id=key.tenant_id, key_id=key.pk, version=None)
    budget_settle(budgets=budgets, tz_name="UTC", request_id="req_next", at=at, cost=CALL)
    assert budget_status(budget, at=at).spent == CALL
    assert budget_status(budget).spent == CALL * 2  # this month's stays as it was
    assert BudgetPeriod.objects.filter(budget=budget).count() == 2


def test_budget_rebuild_command_reports_drift_and_fixes_it(metered, capsys):
    budget_set(tenant=metered.tenant, limit_usd=Decimal("1"))
    call(metered)
    call_command("budget_rebuild")
    assert "0 period(s) drifted" in capsys.readouterr().out

    BudgetPeriod.objects.update(spent_pico=0)
    with pytest.raises(SystemExit) as exited:
        call_command("budget_rebuild")
    assert exited.value.code == 1
    assert "live $0.00, ledger $0.00001" in capsys.readouterr().out
    call_command("budget_rebuild", "--fix")
    assert "(fixed)" in capsys.readouterr().out
    assert budget_rebuild() == []


def test_budget_endpoint_shows_the_keys_own_budget(metered):
    key = ApiKey.objects.get(tenant=metered.tenant)
    budget_set(tenant=metered.tenant, key=key, limit_usd=Decimal("2"), hard=False)
    call(metered)
    body = httpx2.get(
        f"{metered.url}/budget", headers={"Authorization": f"Bearer {metered.secret}"}
    ).json()
    assert body["tenant"] is None
    assert (body["key"]["limit_usd"], body["key"]["hard"]) == ("2.000000", False)
    assert Decimal(body["key"]["spent_usd"]) == CALL


def test_a_period_deleted_by_hand_is_found_again(metered):
    budget = budget_set(tenant=metered.tenant, limit_usd=CALL * 3)
    call(metered)
    BudgetPeriod.objects.all().delete()  # e.g. an operator resetting the month

    call(metered)  # the remembered period is gone: a new one, from the ledger
    assert budget_status(budget).spent == CALL * 2
    call(metered)
    with pytest.raises(openai.RateLimitError):
        call(metered)
    assert budget_rebuild() == []


def test_the_largest_limit_still_serves_calls(metered):
    budget = budget_set(tenant=metered.tenant, limit_usd=Decimal("9000000"))
    call(metered)
    assert budget_status(budget).spent == CALL


def test_a_budget_edited_in_the_admin_keeps_its_tenant_and_key(metered, admin_client):
    from django.urls import reverse

    from tenants.models import Budget

    other = tenant_create(slug="other", name="Other", model_ids=[])
    budget = budget_set(tenant=metered.tenant, limit_usd=Decimal("0.5"))
    url = reverse("admin:tenants_budget_change", args=[budget.pk])
    response = admin_client.post(
        url,
        {"tenant": other.pk, "limit_usd": "7", "hard": "on", "alert_thresholds": "[50, 80, 100]"},
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    # The limit changed in place; the tenant is not a field of a stored budget.
    assert list(Budget.objects.values_list("tenant__slug", "limit_usd")) == [("acme", Decimal("7"))]


def test_a_settlement_and_an_expiry_of_the_same_hold_at_once_release_it_once(transactional_db):
    """The hour's expiry takes a call's holds while the call settles: the settlement
    waited for it, then released what its own memory said was held, a second time (a
    negative reserved, the ledger row rolled back; or, beside another call's hold, that
    hold's money counted as free)."""
    import threading
    import time
    from datetime import timedelta

    from django.db import connection, transaction

    from tenants.budgets import budget_release, budget_reserve, budget_settle
    from tenants.selectors import api_key_for_digest
    from tenants.services import key_digest

    tenant = tenant_create(slug="acme", name="Acme")
    secret = api_key_issue(tenant=tenant, name="k").secret
    budget = budget_set(tenant=tenant, limit_usd=Decimal("1"))
    key = api_key_for_digest(key_digest(secret))  # as a call reads it: under the budget
    now = timezone.now()
    holds = budget_reserve(
        key=key, tz_name="UTC", request_id="req_both", at=now, amount=Decimal("0.4")
    )
    assert holds
    budget_reserve(key=key, tz_name="UTC", request_id="req_other", at=now, amount=Decimal("0.3"))
    taken = threading.Event()

    def expire():
        try:
            with transaction.atomic():
                assert budget_release(request_id="req_both", older_than=now + timedelta(1))
                taken.set()
                time.sleep(0.5)  # committed while the settlement waits on these rows
        finally:
            taken.set()
            connection.close()

    expiry = threading.Thread(target=expire)
    expiry.start()
    assert taken.wait(10)
    with transaction.atomic():
        budget_settle(
            budgets=(budget,),
            tz_name="UTC",
            request_id="req_both",
            at=now,
            cost=Decimal("0.1"),
            holds=holds,
        )
    expiry.join(10)

    status = budget_status(budget)
    assert status.spent == Decimal("0.1")
    assert status.reserved == Decimal("0.3")  # req_other's hold, still counted
    assert set(BudgetReservation.objects.values_list("request_id", flat=True)) == {"req_other"}


def test_renewing_a_streams_holds_keeps_no_database_connection_and_never_ends_it(
    transactional_db, monkeypatch, caplog
):
    """The renewal went through the ORM: the stream's thread then kept a pooled
    connection until the stream ended (twenty long streams drained a process's pool),
    and a database error there ended a healthy stream as "The relay failed"."""
    from types import SimpleNamespace

    from django.db import OperationalError, connection

    from routing import proxy
    from tenants import statements
    from tenants.budgets import budget_reserve
    from tenants.selectors import api_key_for_digest
    from tenants.services import key_digest

    tenant = tenant_create(slug="acme", name="Acme")
    secret = api_key_issue(tenant=tenant, name="k", concurrency_limit=2).secret
    budget_set(tenant=tenant, limit_usd=Decimal("1"))
    key = api_key_for_digest(key_digest(secret))
    holds = budget_reserve(
        key=key, tz_name="UTC", request_id="req_long", at=timezone.now(), amount=Decimal("0.1")
    )
    BudgetReservation.objects.update(created_at=datetime(2026, 12, 1, tzinfo=UTC))
    call = SimpleNamespace(key=key, request_id="req_long", budget_holds=holds)
    proxy.db_connection_release()

    proxy._renew(call)

    assert BudgetReservation.objects.get().created_at > datetime(2026, 12, 2, tzinfo=UTC)
    proxy.db_connection_release()
    proxy._renew(call)
    if getattr(connection, "pool", None) is not None:  # PostgreSQL's pool: given back
        assert connection.connection is None

    def down(**_):
        raise OperationalError("the database is restarting")

    monkeypatch.setattr(statements, "reservations_renew", down)
    proxy._renew(call)  # logged, not raised: the stream goes on
    assert "Could not renew the lease and holds of req_long" in caplog.text


def test_the_expiry_locks_a_calls_budgets_in_the_order_admission_does(transactional_db):
    """Admission and settlement lock the tenant's budget period, then the key's. The
    expiry went by period id: with the key's budget made first (the lower id), it and a
    call being admitted each waited for the other (PostgreSQL: deadlock detected)."""
    import re

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tenants.budgets import budget_release, budget_reserve
    from tenants.selectors import api_key_for_digest
    from tenants.services import key_digest

    tenant = tenant_create(slug="acme", name="Acme")
    issued = api_key_issue(tenant=tenant, name="k")
    key_budget = budget_set(tenant=tenant, key=issued.key, limit_usd=Decimal("1"))
    tenant_budget = budget_set(tenant=tenant, limit_usd=Decimal("1"))
    periods = {
        BudgetPeriod.objects.get(budget=key_budget).pk: "key",
        BudgetPeriod.objects.get(budget=tenant_budget).pk: "tenant",
    }
    assert min(periods) == BudgetPeriod.objects.get(budget=key_budget).pk
    key = api_key_for_digest(key_digest(issued.secret))
    budget_reserve(key=key, tz_name="UTC", request_id="req_d", at=timezone.now(), amount=CALL)

    with CaptureQueriesContext(connection) as queries:
        assert budget_release(request_id="req_d")

    updated = [
        periods[int(re.search(r'"id" = (\d+)', q["sql"]).group(1))]
        for q in queries.captured_queries
        if q["sql"].startswith('UPDATE "tenants_budgetperiod"')
    ]
    assert updated == ["tenant", "key"]
    assert budget_status(tenant_budget).reserved == budget_status(key_budget).reserved == 0

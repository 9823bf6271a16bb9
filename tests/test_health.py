"""Model health: rolling figures from the ledger in the admin and at /metrics, with the
all-time request, token and cost counters."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import DatabaseError
from django.urls import reverse
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from billing.metering import TokenBuckets
from billing.models import UsageEvent
from billing.services import usage_record
from routing import health
from routing.health import health_cache_clear, model_health, provider_health
from routing.models import CircuitBreaker

from .conftest import model_create, usage_facts

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
FAILED = UsageEvent.Status.UPSTREAM_ERROR
CANCELLED = UsageEvent.Status.CLIENT_CANCELLED
HEALTH_PAGE = reverse("routing_health")


@pytest.fixture(autouse=True)
def fresh_figures():
    health_cache_clear()
    yield
    health_cache_clear()


def call(
    key,
    model,
    *,
    at: datetime,
    latency: int = 100,
    status: str = UsageEvent.Status.OK,
    upstream_status: int | None = None,
    ttft: int | None = None,
    **tokens,
) -> UsageEvent:
    """One upstream attempt in the ledger; streamed when it has a time to first token."""
    facts = usage_facts(
        key,
        model,
        request_id=f"req_{uuid.uuid4().hex}",
        occurred_at=at,
        latency_ms=latency,
        status=status,
        upstream_status=upstream_status,
        streamed=ttft is not None,
        ttft_ms=ttft,
        buckets=TokenBuckets(**tokens),
    )
    return usage_record(facts)


def row_of(rows, model: str = "m"):
    return next(r for r in rows if r.model == model)


def test_latencies_are_nearest_rank_percentiles_of_ok_calls(shop):
    _, (key, _), model = shop
    for i, latency in enumerate([700, 100, 1000, 300, 900, 200, 500, 800, 400, 600]):
        call(key, model, at=NOW - timedelta(minutes=i), latency=latency)
    # A failed call's latency is not a latency of the model's answers.
    call(key, model, at=NOW, latency=60_000, status=FAILED, upstream_status=504)

    row = row_of(model_health(now=NOW))

    assert (row.model, row.provider, row.requests, row.ok, row.errors) == ("m", "p", 11, 10, 1)
    assert (row.latency_p50_ms, row.latency_p99_ms) == (500, 1000)
    assert row.sampled == 10


def test_a_provider_failure_lowers_availability_a_client_error_only_the_error_rate(shop):
    _, (key, _), model = shop
    for _ in range(4):
        call(key, model, at=NOW)
    call(key, model, at=NOW, status=CANCELLED)
    for upstream_status in (503, 502, 429, None):  # None: a timeout, no answer at all
        call(key, model, at=NOW, status=FAILED, upstream_status=upstream_status)
    call(key, model, at=NOW, status=FAILED, upstream_status=400)

    row = row_of(model_health(now=NOW))

    assert (row.requests, row.errors, row.provider_errors) == (10, 5, 4)
    assert row.error_rate == pytest.approx(0.5)
    assert row.availability == pytest.approx(0.6)


def test_a_call_the_gateway_itself_ended_is_not_held_against_the_provider(shop):
    """A stream ended because its gateway process stopped (a deploy), or by the relay's
    own fault, has no upstream status, as a provider that never answered has."""
    from dataclasses import replace

    _, (key, _), model = shop
    call(key, model, at=NOW)
    for code in ("gateway_restarting", "gateway_error"):
        facts = usage_facts(
            key,
            model,
            request_id=f"req_{uuid.uuid4().hex}",
            occurred_at=NOW,
            status=FAILED,
            upstream_status=None,
        )
        usage_record(replace(facts, error_code=code))

    row = row_of(model_health(now=NOW))

    assert (row.requests, row.errors, row.provider_errors) == (3, 2, 0)
    assert row.availability == pytest.approx(1.0)


def test_output_speed_counts_generation_after_the_first_token(shop):
    _, (key, _), model = shop
    call(key, model, at=NOW, latency=3000, ttft=1000, output=300, reasoning=100)  # 400 in 2 s
    call(key, model, at=NOW, latency=1500, ttft=500, output=200)  # 200 in 1 s
    call(key, model, at=NOW, latency=1000, output=100)  # not streamed: 100 in 1 s
    # Neither a failed nor a cancelled call says how fast the model writes.
    call(key, model, at=NOW, latency=9000, status=FAILED, upstream_status=502, output=50)
    call(key, model, at=NOW, latency=9000, ttft=100, status=CANCELLED, output=50)

    row = row_of(model_health(now=NOW))

    assert row.output_tokens_per_second == pytest.approx(700 / 4)
    assert row.ttft_p50_ms == 500  # nearest rank of [500, 1000]


def test_a_model_without_calls_shows_no_figures(shop):
    row = row_of(model_health(now=NOW))

    assert (row.requests, row.error_rate, row.availability) == (0, None, None)
    assert (row.latency_p50_ms, row.ttft_p50_ms, row.output_tokens_per_second) == (None,) * 3
    assert row.breaker_state == "closed"


def test_calls_outside_the_window_are_left_out(shop):
    _, (key, _), model = shop
    call(key, model, at=NOW - timedelta(minutes=16), latency=5)
    call(key, model, at=NOW + timedelta(minutes=1), latency=5)
    call(key, model, at=NOW - timedelta(minutes=14), latency=300)
    call(key, model, at=NOW, latency=100)

    row = row_of(model_health(now=NOW))
    assert row.requests == 2
    assert row.latency_p50_ms == 100 and row.latency_p99_ms == 300

    # 12 buckets of 75 s: 14 minutes ago is in the first, now in the last.
    assert [b.requests for b in row.series] == [1] + [0] * 10 + [1]
    assert row.series[0].starts_at == NOW - timedelta(minutes=15)
    assert (row.series[0].latency_p50_ms, row.series[-1].latency_p50_ms) == (300, 100)
    assert row.series[5].latency_p50_ms is None

    assert row_of(model_health(now=NOW, window=timedelta(minutes=5))).requests == 1


def test_percentiles_come_from_the_latest_calls(shop, monkeypatch):
    monkeypatch.setattr(health, "HEALTH_SAMPLE_SIZE", 3)
    _, (key, _), model = shop
    for i in range(10):
        call(key, model, at=NOW - timedelta(minutes=i), latency=1000 - 100 * i)

    row = row_of(model_health(now=NOW))

    assert (row.requests, row.sampled) == (10, 3)
    assert (row.latency_p50_ms, row.latency_p99_ms) == (900, 1000)  # of 800, 900, 1000


def test_a_provider_adds_up_its_models(shop):
    _, (key, _), m = shop
    m2 = model_create("m2", provider=m.provider)
    call(key, m, at=NOW, latency=1000, output=100)
    call(key, m, at=NOW, status=FAILED, upstream_status=500)
    call(key, m2, at=NOW, latency=3000, output=200)
    call(key, m2, at=NOW, status=FAILED, upstream_status=422)

    p = next(p for p in provider_health(now=NOW) if p.provider == "p")

    assert (p.models, p.requests, p.errors, p.provider_errors) == (2, 4, 2, 1)
    assert (p.error_rate, p.availability) == (0.5, 0.75)
    assert p.output_tokens_per_second == pytest.approx(300 / 4)
    assert (p.latency_p50_ms, p.latency_p99_ms) == (1000, 3000)


def test_the_breaker_state_is_shown_with_its_failures(shop):
    _, _, model = shop
    until = NOW + timedelta(seconds=30)
    CircuitBreaker.objects.create(
        model=model, consecutive_failures=5, open_until=until, times_opened=2
    )

    row = row_of(model_health(now=NOW))
    assert (row.breaker_state, row.breaker_failures, row.breaker_open_until) == ("open", 5, until)
    assert row_of(model_health(now=until + timedelta(seconds=1))).breaker_state == "half-open"


# --- /metrics ---------------------------------------------------------------------------


def scrape(client, **headers) -> tuple[int, dict]:
    response = client.get("/metrics", **headers)
    if response.status_code != 200:
        return response.status_code, {}
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            samples[(s.name, *sorted(s.labels.items()))] = s.value
    return 200, samples


def test_metrics_counters_equal_the_ledger(client, shop):
    _, (a, b), model = shop
    now = timezone.now()
    call(a, model, at=now, latency=1000, input_uncached=1_000_000, output=1_000_000)
    call(b, model, at=now, latency=3000, input_uncached=1_000_000, output=1_000_000)
    call(a, model, at=now, status=FAILED, upstream_status=503)
    call(a, model, at=now, status=CANCELLED, input_uncached=123, input_cached=1000, reasoning=7)
    # Older than the window: counted all time, not in the window's gauges.
    call(a, model, at=now - timedelta(days=40), input_uncached=1)

    status, samples = scrape(client)

    assert status == 200
    mp = (("model", "m"), ("provider", "p"))
    requests = {
        status: samples[("tollgate_requests_total", *mp, ("status", status))]
        for status in ("ok", "upstream_error", "client_cancelled")
    }
    assert requests == {"ok": 3, "upstream_error": 1, "client_cancelled": 1}
    tokens = {
        kind: samples[("tollgate_tokens_total", ("kind", kind), *mp)]
        for kind in ("input_uncached", "input_cached", "output", "reasoning")
    }
    assert tokens == {
        "input_uncached": 2_000_124,
        "input_cached": 1000,
        "output": 2_000_000,
        "reasoning": 7,
    }
    # 2 x (0.27 + 1.10) + (123 x 0.27 + 1000 x 0.07 + 7 x 1.10 + 0.27) / 1M
    expected = Decimal("2.74") + Decimal("0.00011118")
    assert sum(UsageEvent.objects.values_list("cost", flat=True)) == expected
    assert samples[("tollgate_cost_usd_total", *mp)] == pytest.approx(float(expected), abs=1e-9)

    assert samples[("tollgate_window_requests", *mp)] == 4
    assert samples[("tollgate_error_ratio", *mp)] == 0.25
    assert samples[("tollgate_availability_ratio", *mp)] == 0.75
    assert samples[("tollgate_latency_p50_seconds", *mp)] == 1.0
    assert samples[("tollgate_latency_p99_seconds", *mp)] == 3.0
    assert samples[("tollgate_circuit_open", ("model", "m"))] == 0
    # Nothing streamed: no time to first token to report, rather than a made-up 0.
    assert ("tollgate_ttft_p50_seconds", *mp) not in samples
    # The provider's figures, all its models together (here its one model).
    assert samples[("tollgate_provider_window_requests", ("provider", "p"))] == 4
    assert samples[("tollgate_provider_availability_ratio", ("provider", "p"))] == 0.75
    assert samples[("tollgate_provider_latency_p99_seconds", ("provider", "p"))] == 3.0


def test_metrics_show_an_open_circuit(client, shop):
    _, _, model = shop
    CircuitBreaker.objects.create(
        model=model,
        consecutive_failures=5,
        open_until=timezone.now() + timedelta(minutes=1),
        times_opened=3,
    )

    _, samples = scrape(client)

    assert samples[("tollgate_circuit_open", ("model", "m"))] == 1
    assert samples[("tollgate_circuit_opens_total", ("model", "m"))] == 3


def test_metrics_ask_for_the_token_when_one_is_set(client, shop, settings):
    settings.TOLLGATE_METRICS_TOKEN = "scrape-secret"

    assert scrape(client)[0] == 401
    assert scrape(client, HTTP_AUTHORIZATION="Bearer wrong-secret")[0] == 401
    assert scrape(client, HTTP_AUTHORIZATION="Basic scrape-secret")[0] == 401
    status, samples = scrape(client, HTTP_AUTHORIZATION="Bearer scrape-secret")
    assert status == 200 and ("tollgate_circuit_open", ("model", "m")) in samples


def test_production_serves_metrics_only_with_a_token(client, shop, settings):
    settings.TOLLGATE_METRICS_OPEN = False
    settings.TOLLGATE_METRICS_TOKEN = ""

    refused = client.get("/metrics")

    assert refused.status_code == 403
    assert b"TOLLGATE_METRICS_TOKEN" in refused.content
    settings.TOLLGATE_METRICS_TOKEN = "scrape-secret"
    assert scrape(client, HTTP_AUTHORIZATION="Bearer scrape-secret")[0] == 200


def test_metrics_answer_503_not_500_when_the_ledger_cannot_be_read(client, monkeypatch):
    def broken():
        raise DatabaseError("connection refused")

    monkeypatch.setattr("routing.metrics.ledger_totals", broken)

    response = client.get("/metrics")

    assert response.status_code == 503
    assert b"unavailable" in response.content


def test_scrapes_a_few_seconds_apart_share_one_read(client, shop):
    _, (key, _), model = shop
    call(key, model, at=timezone.now())
    ok = ("tollgate_requests_total", ("model", "m"), ("provider", "p"), ("status", "ok"))
    assert scrape(client)[1][ok] == 1

    call(key, model, at=timezone.now())
    assert scrape(client)[1][ok] == 1  # still the cached figures
    health_cache_clear()
    assert scrape(client)[1][ok] == 2


# --- The staff page ---------------------------------------------------------------------


def table_row(html: str, link: str) -> str:
    """The rendered table row that holds this link."""
    start = html.rindex("<tr>", 0, html.index(f'href="{link}"'))
    return html[start : html.index("</tr>", start)]


def test_the_health_page_shows_each_model_with_its_chart(admin_client, shop):
    _, (key, _), model = shop
    now = timezone.now()
    call(key, model, at=now, latency=1200)
    call(key, model, at=now, status=FAILED, upstream_status=400)
    CircuitBreaker.objects.create(
        model=model, consecutive_failures=5, open_until=now + timedelta(minutes=1)
    )

    page = admin_client.get(HEALTH_PAGE)

    assert page.status_code == 200
    html = page.content.decode()
    row = table_row(html, reverse("admin:routing_catalogmodel_change", args=[model.pk]))
    assert ">m</a>" in row and "<td>p</td>" in row
    assert "50.0 %" in row and "100.0 %" in row  # error rate, availability
    assert "1200" in row
    assert "open</span>, 5 consecutive failures, open until" in row
    assert "<svg" in row and "<rect" in row and "<polyline" in row
    assert 'id="provider-health"' in html


def test_the_health_page_is_for_staff_only(client):
    assert client.get(HEALTH_PAGE)["Location"].startswith(reverse("admin:login"))

    get_user_model().objects.create_user("someone", password="pw-someone-123")
    client.login(username="someone", password="pw-someone-123")
    response = client.get(HEALTH_PAGE)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_the_catalog_links_to_the_health_page(admin_client):
    page = admin_client.get(reverse("admin:routing_catalogmodel_changelist"))

    assert f'href="{HEALTH_PAGE}"' in page.content.decode()


def staff_member(tenant, *permissions: str):
    """A staff user who is a member of `tenant` (as one who manages it through /api/),
    with these admin permissions ("app_label.codename") only."""
    user = get_user_model().objects.create_user("member", password="pw-member-123", is_staff=True)
    tenant.members.add(user)
    for permission in permissions:
        app_label, codename = permission.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


def test_the_health_page_is_for_who_may_see_the_usage_ledger(client, shop):
    # Every tenant's traffic and cost per model, added up from the ledger: staff status
    # alone (a tenant's member has it to use /api/) shows none of it.
    tenant, (key, _), model = shop
    call(key, model, at=timezone.now(), latency=1234, input_uncached=1_000_000)
    user = staff_member(tenant)
    client.force_login(user)

    refused = client.get(HEALTH_PAGE)

    assert refused.status_code == 403
    html = refused.content.decode()
    assert 'id="model-health"' not in html and "1234" not in html and "0.2700" not in html

    user.user_permissions.add(Permission.objects.get(codename="view_usageevent"))
    shown = client.get(HEALTH_PAGE)
    assert shown.status_code == 200
    html = shown.content.decode()
    assert 'id="model-health"' in html and "1234" in html and "0.2700" in html


def test_the_catalog_links_to_the_health_page_only_for_who_may_open_it(client, shop):
    tenant, _, _ = shop
    user = staff_member(tenant, "routing.view_catalogmodel")
    client.force_login(user)
    catalog = reverse("admin:routing_catalogmodel_changelist")

    page = client.get(catalog)
    assert page.status_code == 200
    assert HEALTH_PAGE not in page.content.decode()

    user.user_permissions.add(Permission.objects.get(codename="view_usageevent"))
    assert f'href="{HEALTH_PAGE}"' in client.get(catalog).content.decode()


def test_counters_take_in_late_usage_of_hours_ago_and_never_go_down(client, shop):
    _, (key, _), model = shop
    now = timezone.now()
    call(key, model, at=now - timedelta(hours=5), input_uncached=10)
    call(key, model, at=now, input_uncached=20)
    ok = ("tollgate_requests_total", ("model", "m"), ("provider", "p"), ("status", "ok"))
    assert scrape(client)[1][ok] == 2

    # A stream that began three hours ago is metered now, behind the base's boundary.
    call(key, model, at=now - timedelta(hours=3), input_uncached=30)
    health_cache_clear()  # as when the base is due again, ten minutes on
    _, samples = scrape(client)

    assert samples[ok] == 3
    uncached = (
        "tollgate_tokens_total",
        ("kind", "input_uncached"),
        ("model", "m"),
        ("provider", "p"),
    )
    assert samples[uncached] == 60


def test_an_unusable_answer_counts_against_the_provider_as_routes_do(shop):
    """A 200 that is no chat completion makes a route move on and its breaker count: the
    provider's fault, so availability drops, like for a 5xx; a 400 does not."""
    _, (key, _), model = shop
    call(key, model, at=NOW)
    call(key, model, at=NOW, status=FAILED, upstream_status=200)
    call(key, model, at=NOW, status=FAILED, upstream_status=422)

    row = row_of(model_health(now=NOW))

    assert (row.requests, row.errors, row.provider_errors) == (3, 2, 1)
    assert row.availability == pytest.approx(2 / 3)

"""Routes through the gateway, with the official SDK, against three mock upstream
processes whose faults each test sets: fallbacks with per-attempt timeouts, what falls
through and what does not, streams, rules, the breaker, the ledger and the invoice."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import openai
import pytest
from django.db import DatabaseError
from django.test import override_settings
from django.utils import timezone

from billing.invoicing import invoice_build
from billing.models import UsageEvent
from routing import proxy
from routing.models import CatalogModel, CircuitBreaker, Provider, Route, RouteTarget
from tenants.budgets import budget_set
from tenants.models import ApiKey, BudgetPeriod, BudgetReservation
from tenants.services import api_key_issue

from .conftest import World, model_create
from .upstream import MockUpstream, mock_upstream_start

SHORT = [{"role": "user", "content": "hello there world"}]


@pytest.fixture(scope="session")
def mock_fleet():
    """Three mock upstream processes, one per provider of the fleet."""
    mocks = [mock_upstream_start() for _ in range(3)]
    yield mocks
    for mock in mocks:
        mock.stop()


@dataclass
class Fleet:
    world: World
    mocks: dict[str, MockUpstream]
    models: dict[str, CatalogModel]

    def client(self, **kwargs) -> openai.OpenAI:
        return self.world.client(**kwargs)

    def route(self, name: str, strategy: str, *targets: dict) -> Route:
        route = Route.objects.create(name=name, strategy=strategy)
        for position, target in enumerate(targets):
            RouteTarget.objects.create(route=route, position=position, **target)
        return route

    def call(self, model: str, messages=SHORT, **kwargs):
        """(completion, headers) of one plain call."""
        raw = self.client().chat.completions.with_raw_response.create(
            model=model, messages=messages, **kwargs
        )
        return raw.parse(), raw.headers


@pytest.fixture
def fleet(world, mock_fleet) -> Fleet:
    models = {}
    mocks = dict(zip("abc", mock_fleet, strict=True))
    for name, mock in mocks.items():
        mock.faults()
        mock.stats_reset()
        provider = Provider.objects.create(name=f"fleet-{name}", base_url=mock.url("openai"))
        models[name] = model_create(f"fleet-{name}", provider=provider)
    world.tenant.allowed_models.add(*models.values())
    yield Fleet(world=world, mocks=mocks, models=models)
    for mock in mock_fleet:
        mock.faults()


def events(request_id: str) -> list[UsageEvent]:
    return list(UsageEvent.objects.filter(request_id=request_id).order_by("attempt"))


def test_a_route_is_called_like_a_model_and_listed_with_the_models(fleet):
    fleet.route("support-default", Route.Strategy.FALLBACK, {"model": fleet.models["a"]})

    completion, headers = fleet.call("support-default")

    assert completion.model == "fleet-a"
    assert completion.choices[0].message.content == "Mock reply: hello there world"
    assert headers["x-route"] == "support-default"
    assert headers["x-attempts"] == "1"
    ids = [m.id for m in fleet.client().models.list()]
    assert "support-default" in ids
    assert fleet.client().models.retrieve("support-default").id == "support-default"
    [event] = events(completion._request_id)
    assert (event.requested_model, event.served_model_id) == (
        "support-default",
        fleet.models["a"].pk,
    )


def test_a_slow_first_target_times_out_and_the_second_answers_in_time(fleet):
    fleet.mocks["a"].faults(latency_ms=5000)
    fleet.mocks["b"].faults(latency_ms=300)
    fleet.route(
        "tier-1",
        Route.Strategy.FALLBACK,
        {"model": fleet.models["a"], "timeout_seconds": 0.5},
        {"model": fleet.models["b"], "timeout_seconds": 10},
    )

    started = time.monotonic()
    completion, headers = fleet.call("tier-1")
    elapsed = time.monotonic() - started

    assert completion.model == "fleet-b"
    assert headers["x-attempts"] == "2"
    # The first attempt's timeout plus the second's latency, and nowhere near A's 5 s.
    assert 0.5 + 0.3 <= elapsed < 0.5 + 0.3 + 1.5
    first, second = events(completion._request_id)
    assert (first.attempt, first.served_model_id, first.status) == (
        1,
        fleet.models["a"].pk,
        UsageEvent.Status.UPSTREAM_ERROR,
    )
    assert first.error_code == "upstream_timeout"
    assert first.cost == 0
    assert (second.attempt, second.served_model_id, second.status) == (
        2,
        fleet.models["b"].pk,
        UsageEvent.Status.OK,
    )
    assert second.cost > 0
    # Each attempt's latency is its own.
    assert first.latency_ms >= 500
    assert second.latency_ms < 1500


@pytest.mark.parametrize("status", [429, 500, 503])
def test_rate_limits_and_server_errors_fall_through_to_the_next_target(fleet, status):
    fleet.mocks["a"].faults(status=status)
    fleet.route(
        "chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": fleet.models["b"]}
    )

    completion, headers = fleet.call("chain")

    assert completion.model == "fleet-b"
    assert headers["x-attempts"] == "2"
    first, second = events(completion._request_id)
    assert first.upstream_status == status
    assert second.status == UsageEvent.Status.OK


@pytest.mark.parametrize(
    ("status", "exception"), [(400, openai.BadRequestError), (422, openai.UnprocessableEntityError)]
)
def test_a_client_error_does_not_fall_through(fleet, status, exception):
    fleet.mocks["a"].faults(status=status)
    fleet.route(
        "chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": fleet.models["b"]}
    )

    with pytest.raises(exception) as caught:
        fleet.call("chain")

    assert caught.value.response.headers["x-attempts"] == "1"
    assert caught.value.response.headers["x-route"] == "chain"
    assert fleet.mocks["b"].stats()["requests"] == 0
    [event] = events(caught.value.request_id)
    assert event.upstream_status == status


def test_when_every_target_fails_the_sdk_gets_one_clean_error(fleet):
    fleet.mocks["a"].faults(status=503)
    fleet.mocks["b"].faults(status=500)
    fleet.route(
        "chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": fleet.models["b"]}
    )

    with pytest.raises(openai.InternalServerError) as caught:
        fleet.call("chain")

    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-attempts"] == "2"
    assert [e.upstream_status for e in events(caught.value.request_id)] == [503, 500]


def test_a_stream_falls_through_before_its_first_byte(fleet):
    fleet.mocks["a"].faults(status=503)
    fleet.route(
        "chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": fleet.models["b"]}
    )

    raw = fleet.client().chat.completions.with_raw_response.create(
        model="chain", messages=SHORT, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(raw.parse())

    assert raw.headers["x-attempts"] == "2"
    assert {c.model for c in chunks} == {"fleet-b"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Mock reply: hello there world"
    assert chunks[-1].usage.completion_tokens == 5


def test_a_stream_that_already_sent_bytes_is_not_retried(fleet):
    fleet.mocks["a"].faults(error_after=2)
    fleet.route(
        "chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": fleet.models["b"]}
    )

    stream = fleet.client().chat.completions.create(model="chain", messages=SHORT, stream=True)
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    assert "".join(received).startswith("Mock reply:")
    assert fleet.mocks["b"].stats()["requests"] == 0
    [event] = events(stream.response.headers["x-request-id"])
    assert event.status == UsageEvent.Status.UPSTREAM_ERROR
    assert event.served_model_id == fleet.models["a"].pk
    assert event.output_tokens > 0  # what was relayed is metered


def _seeds_router(fleet) -> Route:
    """The seeds' router: image -> vision, reasoning + long -> big, short -> cheap, else
    the default."""
    vision = model_create("fleet-vision", provider=fleet.models["c"].provider)
    fleet.world.tenant.allowed_models.add(vision)
    return fleet.route(
        "auto",
        Route.Strategy.RULES,
        {"model": vision, "when_image": True},
        {"model": fleet.models["c"], "when_reasoning": True, "min_prompt_tokens": 2000},
        {"model": fleet.models["a"], "max_prompt_chars": 200},
        {"model": fleet.models["b"]},
    )


def test_rules_pick_the_vision_model_for_an_image_and_the_cheap_one_for_a_short_prompt(fleet):
    _seeds_router(fleet)
    image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ]
    long_text = [{"role": "user", "content": "word " * 2000}]

    assert fleet.call("auto", image)[0].model == "fleet-vision"
    assert fleet.call("auto", SHORT)[0].model == "fleet-a"
    assert fleet.call("auto", long_text)[0].model == "fleet-b"
    reasoning = fleet.call("auto", long_text, extra_body={"enable_thinking": True})[0]
    assert reasoning.model == "fleet-c"
    by_metadata = fleet.call("auto", long_text, metadata={"reasoning": "true"})[0]
    assert by_metadata.model == "fleet-c"


def test_a_target_outside_the_keys_allowlist_is_skipped(fleet):
    fleet.route(
        "chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": fleet.models["b"]}
    )
    narrowed = api_key_issue(tenant=fleet.world.tenant, name="narrow", model_ids=["fleet-b"])

    raw = fleet.world.client(narrowed.secret).chat.completions.with_raw_response.create(
        model="chain", messages=SHORT
    )

    assert raw.parse().model == "fleet-b"
    assert raw.headers["x-attempts"] == "1"
    only_a = api_key_issue(tenant=fleet.world.tenant, name="only-a", model_ids=["m-openai"])
    with pytest.raises(openai.PermissionDeniedError) as caught:
        fleet.world.client(only_a.secret).chat.completions.create(model="chain", messages=SHORT)
    message = caught.value.body["message"]
    assert "fleet-a: not in this key's model allowlist" in message
    assert "fleet-b: not in this key's model allowlist" in message
    assert "chain" not in [m.id for m in fleet.world.client(only_a.secret).models.list()]


def test_a_target_that_does_not_fit_the_budget_is_skipped(fleet):
    dear = model_create("fleet-dear", provider=fleet.models["b"].provider, output=Decimal("5000"))
    fleet.world.tenant.allowed_models.add(dear)
    fleet.route("chain", Route.Strategy.FALLBACK, {"model": dear}, {"model": fleet.models["a"]})
    budget_set(tenant=fleet.world.tenant, limit_usd=Decimal("1.00"), hard=True)

    # Up to 1,000 output tokens: $5 on the dear model, a fraction of a cent on A.
    completion, headers = fleet.call("chain", max_tokens=1000)

    assert completion.model == "fleet-a"
    assert headers["x-attempts"] == "1"
    with pytest.raises(openai.RateLimitError) as caught:
        fleet.call("fleet-dear", max_tokens=1000)
    message = caught.value.body["message"]
    assert message.startswith(
        "The monthly budget of this tenant cannot cover this request: limit $1.00, $0.99"
    )
    assert ", and the request may cost up to $5.0" in message
    # A route none of whose targets the budget can cover names each, and what is left.
    fleet.route("dear-only", Route.Strategy.FALLBACK, {"model": dear})
    with pytest.raises(openai.RateLimitError) as caught:
        fleet.call("dear-only", max_tokens=1000)
    assert caught.value.code == "insufficient_quota"
    message = caught.value.body["message"]
    assert message.startswith(
        "No target of the route 'dear-only' can serve this request (fleet-dear: may cost up to $5.0"
    )
    # Which budget, and its limit, as a direct call's refusal says.
    assert ", more than the $0.99" in message
    assert " UTC in the monthly budget of this tenant (limit $1.00))." in message
    key = ApiKey.objects.get(tenant=fleet.world.tenant, name="default")
    budget_set(tenant=fleet.world.tenant, key=key, limit_usd=Decimal("2.00"), hard=True)
    budget_set(tenant=fleet.world.tenant, limit_usd=Decimal("100.00"), hard=True)
    with pytest.raises(openai.RateLimitError) as caught:
        fleet.call("dear-only", max_tokens=1000)
    assert caught.value.body["message"].endswith(
        f" in the monthly budget of API key {key.prefix}… (limit $2.00))."
    )


def test_the_breaker_opens_after_consecutive_failures_and_closes_after_a_probe(fleet):
    fleet.mocks["a"].faults(status=503)
    fleet.route(
        "chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": fleet.models["b"]}
    )

    with override_settings(TOLLGATE_BREAKER_FAILURES=3, TOLLGATE_BREAKER_COOLDOWN_SECONDS=60):
        for _ in range(3):
            assert fleet.call("chain")[1]["x-attempts"] == "2"
        breaker = CircuitBreaker.objects.get(model=fleet.models["a"])
        assert breaker.state(timezone.now()) == "open"
        assert fleet.mocks["a"].stats()["requests"] == 3

        # Open: the route skips A without calling it.
        for _ in range(3):
            completion, headers = fleet.call("chain")
            assert (completion.model, headers["x-attempts"]) == ("fleet-b", "1")
        assert fleet.mocks["a"].stats()["requests"] == 3

        # The cooldown passes and A has recovered: one probe closes the breaker.
        fleet.mocks["a"].faults()
        CircuitBreaker.objects.filter(pk=breaker.pk).update(
            open_until=timezone.now() - timedelta(seconds=1)
        )
        assert fleet.call("chain")[0].model == "fleet-a"
        breaker.refresh_from_db()
        assert breaker.state(timezone.now()) == "closed"
        assert breaker.consecutive_failures == 0
        assert fleet.call("chain")[0].model == "fleet-a"


def test_a_failed_probe_opens_the_breaker_again(fleet):
    fleet.mocks["a"].faults(status=500)
    fleet.route(
        "chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": fleet.models["b"]}
    )
    CircuitBreaker.objects.create(
        model=fleet.models["a"],
        consecutive_failures=5,
        open_until=timezone.now() - timedelta(seconds=1),
        times_opened=1,
    )

    assert fleet.call("chain")[1]["x-attempts"] == "2"  # the probe, which fails

    breaker = CircuitBreaker.objects.get(model=fleet.models["a"])
    assert breaker.state(timezone.now()) == "open"
    assert breaker.times_opened == 2
    assert fleet.mocks["a"].stats()["requests"] == 1


def test_every_target_open_is_a_clean_503_with_retry_after(fleet):
    fleet.route("solo", Route.Strategy.FALLBACK, {"model": fleet.models["a"]})
    CircuitBreaker.objects.create(
        model=fleet.models["a"],
        consecutive_failures=5,
        open_until=timezone.now() + timedelta(seconds=30),
    )

    with pytest.raises(openai.InternalServerError) as caught:
        fleet.call("solo")

    assert caught.value.status_code == 503
    assert "circuit open" in caught.value.body["message"]
    assert caught.value.response.headers["retry-after"]
    assert not UsageEvent.objects.exists()


def test_each_attempt_is_in_the_ledger_and_the_invoice(fleet):
    fleet.route(
        "chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": fleet.models["b"]}
    )
    fleet.mocks["a"].faults(status=502)
    fleet.call("chain")
    fleet.mocks["a"].faults(error_after=3)  # a stream that fails after its first bytes
    stream = fleet.client().chat.completions.create(model="chain", messages=SHORT, stream=True)
    with pytest.raises(openai.APIError):
        list(stream)

    ledger = list(UsageEvent.objects.order_by("occurred_at", "attempt"))
    assert [(e.served_model.public_id, e.attempt, e.status) for e in ledger] == [
        ("fleet-a", 1, "upstream_error"),
        ("fleet-b", 2, "ok"),
        ("fleet-a", 1, "upstream_error"),
    ]
    month = timezone.localdate().replace(day=1)
    # An invoice covers what was recorded up to a few minutes before it is built.
    later = timezone.now() + timedelta(minutes=10)
    invoice = invoice_build(tenant=fleet.world.tenant, month=month, now=later)
    assert invoice.total == sum(e.cost for e in ledger).quantize(Decimal("0.01"))
    billed = {line.model_name for line in invoice.lines.all()}
    assert billed == {"fleet-a", "fleet-b"}
    tokens_a = sum(line.quantity for line in invoice.lines.all() if line.model_name == "fleet-a")
    assert tokens_a == ledger[2].prompt_tokens + ledger[2].completion_tokens


def test_a_fallback_settles_the_budget_once_and_gives_the_lease_back(fleet):
    fleet.mocks["a"].faults(status=503)
    fleet.route(
        "chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": fleet.models["b"]}
    )
    budget_set(tenant=fleet.world.tenant, limit_usd=Decimal("5.00"), hard=True)
    key = api_key_issue(tenant=fleet.world.tenant, name="one-at-a-time", concurrency_limit=1)
    client = fleet.world.client(key.secret)

    for _ in range(3):  # a lease left behind would refuse the second call
        assert client.chat.completions.create(model="chain", messages=SHORT).model == "fleet-b"

    period = BudgetPeriod.objects.get()
    spent = sum(e.cost for e in UsageEvent.objects.all())
    assert UsageEvent.objects.count() == 6
    assert period.reserved_pico == 0
    assert Decimal(period.spent_pico).scaleb(-12) == spent
    assert not BudgetReservation.objects.exists()


def test_the_breaker_is_shared_by_separate_server_processes(
    fleet, gunicorn_gateway, second_gunicorn_gateway
):
    fleet.mocks["a"].faults(status=503)
    fleet.route(
        "chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": fleet.models["b"]}
    )
    first = openai.OpenAI(base_url=gunicorn_gateway.url, api_key=fleet.world.secret, max_retries=0)
    second = openai.OpenAI(
        base_url=second_gunicorn_gateway.url, api_key=fleet.world.secret, max_retries=0
    )

    for _ in range(5):  # the servers' default threshold
        first.chat.completions.create(model="chain", messages=SHORT)
    assert CircuitBreaker.objects.get(model=fleet.models["a"]).state(timezone.now()) == "open"

    for _ in range(5):
        raw = second.chat.completions.with_raw_response.create(model="chain", messages=SHORT)
        assert (raw.parse().model, raw.headers["x-attempts"]) == ("fleet-b", "1")
    assert fleet.mocks["a"].stats()["requests"] == 5


def test_the_served_model_is_metered_at_its_own_price(fleet):
    fleet.mocks["a"].faults(status=500)
    pricey = model_create(
        "fleet-pricey",
        provider=fleet.models["b"].provider,
        input_=Decimal("2"),
        cached=None,
        output=Decimal("8"),
    )
    fleet.world.tenant.allowed_models.add(pricey)
    fleet.route("chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": pricey})

    completion, _ = fleet.call("chain")

    failed, served = events(completion._request_id)
    assert completion.model == "fleet-pricey"
    assert served.served_model == pricey
    assert served.price == pricey.prices.get()
    # 6 prompt tokens at $2 and 5 output tokens at $8 per 1M.
    assert served.cost == Decimal("0.000052000000")
    assert (failed.served_model_id, failed.cost) == (fleet.models["a"].pk, 0)


def test_a_breaker_update_that_fails_does_not_fail_the_call(fleet, monkeypatch):
    def broken(*args, **kwargs):
        raise DatabaseError("the breaker table is locked")

    monkeypatch.setattr("routing.breaker.breaker_failure", broken)
    monkeypatch.setattr("routing.breaker.breaker_success", broken)
    fleet.mocks["a"].faults(status=503)
    fleet.route(
        "chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": fleet.models["b"]}
    )

    completion, headers = fleet.call("chain")

    assert (completion.model, headers["x-attempts"]) == ("fleet-b", "2")
    assert len(events(completion._request_id)) == 2


def test_an_internal_failure_between_attempts_leaves_no_hold_or_lease(fleet, monkeypatch):
    fleet.mocks["a"].faults(status=503)
    fleet.route(
        "chain", Route.Strategy.FALLBACK, {"model": fleet.models["a"]}, {"model": fleet.models["b"]}
    )
    budget_set(tenant=fleet.world.tenant, limit_usd=Decimal("5.00"), hard=True)
    key = api_key_issue(tenant=fleet.world.tenant, name="one-at-a-time", concurrency_limit=1)
    client = fleet.world.client(key.secret)
    real = proxy.upstream_client

    def second_attempt_breaks(provider):
        if provider.name == "fleet-b":
            raise RuntimeError("a bug")
        return real(provider)

    monkeypatch.setattr("routing.proxy.upstream_client", second_attempt_breaks)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="chain", messages=SHORT)
    assert "Traceback" not in str(caught.value.body)

    assert not BudgetReservation.objects.exists()
    assert BudgetPeriod.objects.get().reserved_pico == 0
    monkeypatch.setattr("routing.proxy.upstream_client", real)
    # The lease is back: a key limited to one call at a time calls again at once.
    assert client.chat.completions.create(model="chain", messages=SHORT).model == "fleet-b"


def test_odd_content_parts_and_deep_flags_are_no_server_error(fleet):
    _seeds_router(fleet)
    odd = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": ["image_url"]}, {"type": {}}],
        }
    ]
    nested: dict = {}
    for _ in range(500):
        nested = {"type": nested}

    for messages, extra in ((odd, {}), (SHORT, {"reasoning": nested, "thinking": [1, {"a": 2}]})):
        try:
            fleet.call("auto", messages, extra_body=extra)
        except openai.APIStatusError as exc:  # the provider may refuse: never the gateway
            assert exc.status_code < 500


def test_a_split_sends_a_retried_request_to_the_same_target(fleet):
    fleet.route(
        "halves",
        Route.Strategy.SPLIT,
        {"model": fleet.models["a"], "weight": 1},
        {"model": fleet.models["b"], "weight": 1},
    )
    client = fleet.client()

    def served(idempotency_key: str) -> str:
        return client.chat.completions.create(
            model="halves", messages=SHORT, extra_headers={"Idempotency-Key": idempotency_key}
        ).model

    firsts = {n: served(f"retry-{n}") for n in range(12)}
    assert set(firsts.values()) == {"fleet-a", "fleet-b"}
    assert all(served(f"retry-{n}") == model for n, model in firsts.items())


def test_the_admin_shows_breakers_and_closes_them(fleet, admin_client):
    breaker = CircuitBreaker.objects.create(
        model=fleet.models["a"],
        consecutive_failures=5,
        open_until=timezone.now() + timedelta(seconds=30),
        last_error="The upstream provider failed (HTTP 503).",
    )

    page = admin_client.get("/admin/routing/circuitbreaker/").content.decode()
    assert "fleet-a" in page and ">open<" in page and "HTTP 503" in page

    admin_client.post(
        "/admin/routing/circuitbreaker/",
        {"action": "close_breakers", "_selected_action": [breaker.pk]},
    )
    breaker.refresh_from_db()
    assert breaker.state(timezone.now()) == "closed"
    assert breaker.consecutive_failures == 0

"""Shared fixtures: a mock upstream on a real socket, the gateway on another (Django's
live server), and a small world of tenants, keys and priced models between them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import openai
import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework.test import APIClient

from billing.metering import TokenBuckets
from billing.models import UsageEvent
from billing.services import UsageFacts, usage_record
from routing.models import CatalogModel, ModelPrice, Provider
from tenants.models import Tenant
from tenants.services import api_key_issue, staff_token_issue, tenant_create

from .upstream import (
    MockUpstream,
    RawStreamProvider,
    celery_worker_start,
    gunicorn_gateway_start,
    mock_upstream_start,
)

STYLES = ("openai", "deepseek", "qwen", "kimi", "glm")

# List prices of the test models, USD per 1M tokens.
INPUT = Decimal("0.27")
CACHED = Decimal("0.07")
OUTPUT = Decimal("1.10")


@pytest.fixture(scope="session")
def mock_upstream():
    mock = mock_upstream_start()
    yield mock
    mock.stop()


def test_database_url() -> str:
    """DATABASE_URL of the test database, for the servers and workers tests start."""
    from django.conf import settings as django_settings

    db = django_settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture(scope="session")
def gunicorn_gateway(django_db_setup):
    """The production server (gunicorn, 2 threaded workers) on the test database, with
    Celery tasks run in-process.

    Tests that use it need `transactional_db` (the `world` fixture has it), so that what
    they create is committed and visible to the server's own connections.
    """
    gateway = gunicorn_gateway_start(test_database_url())
    yield gateway
    gateway.stop()


@pytest.fixture(scope="session")
def second_gunicorn_gateway(django_db_setup):
    """Another gunicorn on its own port: with `gunicorn_gateway`, two separate servers."""
    gateway = gunicorn_gateway_start(test_database_url())
    yield gateway
    gateway.stop()


# A Redis database for tests, and a key prefix of this run's own: test runs sharing the
# machine's Redis (and an earlier run's leftovers) never see each other's tasks.
TEST_BROKER_URL = "redis://127.0.0.1:6379/15"
TEST_BROKER_KEY_PREFIX = f"tollgate-test-{uuid.uuid4().hex[:12]}:"
TEST_BROKER_ENV = {
    "CELERY_BROKER_URL": TEST_BROKER_URL,
    "CELERY_BROKER_KEY_PREFIX": TEST_BROKER_KEY_PREFIX,
}


def broker_keys_clear() -> None:
    """Delete every key this run's brokers wrote."""
    import redis

    client = redis.Redis.from_url(TEST_BROKER_URL)
    for name in client.scan_iter(match=f"{TEST_BROKER_KEY_PREFIX}*"):
        client.delete(name)


@pytest.fixture(scope="module")
def gateway_with_worker(django_db_setup):
    """gunicorn enqueueing tasks on a real Redis broker, and a real Celery worker."""
    worker = celery_worker_start(test_database_url(), **TEST_BROKER_ENV)
    gateway = gunicorn_gateway_start(test_database_url(), **TEST_BROKER_ENV)
    yield gateway
    gateway.stop()
    worker.stop()
    broker_keys_clear()


def model_create(
    public_id: str,
    *,
    provider: Provider,
    output: Decimal | None = OUTPUT,
    input_: Decimal | None = INPUT,
    cached: Decimal | None = CACHED,
    priced: bool = True,
) -> CatalogModel:
    model = CatalogModel.objects.create(
        public_id=public_id,
        display_name=public_id,
        family="Test",
        developer="Test Lab",
        provider=provider,
        upstream_model_id=f"upstream-{public_id}",
    )
    if priced:
        ModelPrice.objects.create(
            model=model,
            input_per_mtok=input_,
            cached_input_per_mtok=cached,
            output_per_mtok=output,
            effective_from=timezone.now() - timezone.timedelta(days=1),
        )
    return model


def usage_facts(key, model: CatalogModel, **overrides) -> UsageFacts:
    """Facts of one successful call by `key` to `model`, priced with its current version."""
    values = dict(
        request_id="req_test",
        tenant_id=key.tenant_id,
        api_key_id=key.pk,
        requested_model=model.public_id,
        served_model=model,
        price=model.prices.get(effective_to__isnull=True),
        buckets=TokenBuckets(input_uncached=10, output=5),
        usage_source=UsageEvent.Source.PROVIDER,
        status=UsageEvent.Status.OK,
        streamed=False,
        latency_ms=10,
        occurred_at=timezone.now(),
    )
    values.update(overrides)
    return UsageFacts(**values)


@dataclass
class World:
    """A gateway URL, a mock upstream, one model per provider style, and tenant acme."""

    url: str
    mock: MockUpstream
    providers: dict[str, Provider]
    models: dict[str, CatalogModel]
    tenant: Tenant
    secret: str
    extra: dict = field(default_factory=dict)

    def client(self, secret: str | None = None, **kwargs) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.url, api_key=secret or self.secret, **kwargs)

    def async_client(self, secret: str | None = None, **kwargs) -> openai.AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.url, api_key=secret or self.secret, **kwargs)

    def tenant_with_key(self, slug: str, model_ids: list[str]) -> tuple[Tenant, str]:
        tenant = tenant_create(slug=slug, name=slug.title(), model_ids=model_ids)
        return tenant, api_key_issue(tenant=tenant, name="test").secret


@pytest.fixture
def world(live_server, mock_upstream, transactional_db) -> World:
    providers = {
        style: Provider.objects.create(name=f"mock-{style}", base_url=mock_upstream.url(style))
        for style in STYLES
    }
    models = {style: model_create(f"m-{style}", provider=providers[style]) for style in STYLES}
    tenant = tenant_create(
        slug="acme", name="Acme", model_ids=[m.public_id for m in models.values()]
    )
    secret = api_key_issue(tenant=tenant, name="default").secret
    return World(
        url=f"{live_server.url}/v1",
        mock=mock_upstream,
        providers=providers,
        models=models,
        tenant=tenant,
        secret=secret,
    )


@pytest.fixture
def raw_provider(world):
    """raw_provider(parts, timeout=None): the model `m-raw`, which world's tenant may
    call, served by a RawStreamProvider answering every stream with `parts`; returns the
    provider (its `requests` are what it received)."""
    providers: list[RawStreamProvider] = []

    def make(parts: list[bytes | float], timeout: float | None = None) -> RawStreamProvider:
        provider = RawStreamProvider(parts)
        providers.append(provider)
        fields = {} if timeout is None else {"timeout_seconds": timeout}
        row = Provider.objects.create(name=f"raw-{len(providers)}", base_url=provider.url, **fields)
        world.tenant.allowed_models.add(model_create("m-raw", provider=row))
        return provider

    yield make
    for provider in providers:
        provider.stop()


@pytest.fixture
def shop():
    """Tenant acme (UTC) with two keys and a model priced 0.27 / 0.07 / 1.10 per 1M."""
    provider = Provider.objects.create(name="p", base_url="http://127.0.0.1:9/v1")
    model = model_create("m", provider=provider)
    ModelPrice.objects.filter(model=model).update(effective_from=datetime(2026, 1, 1, tzinfo=UTC))
    tenant = tenant_create(slug="acme", name="Acme", model_ids=["m"])
    keys = [api_key_issue(tenant=tenant, name=n).key for n in ("a", "b")]
    return tenant, keys, model


_event_ids = iter(range(10**9))


def record(
    key, model, occurred_at, recorded_at=None, price=None, tenant_price=None, **buckets
) -> UsageEvent:
    """One usage event in the ledger, occurred and recorded when said."""
    facts = usage_facts(
        key,
        model,
        request_id=f"req_{next(_event_ids)}",
        buckets=TokenBuckets(**buckets),
        occurred_at=occurred_at,
    )
    if price is not None or tenant_price is not None:
        price = price or facts.price
        facts = type(facts)(**{**facts.__dict__, "price": price, "tenant_price": tenant_price})
    event = usage_record(facts)
    UsageEvent.objects.filter(pk=event.pk).update(recorded_at=recorded_at or occurred_at)
    return event


def api(user=None, token: str | None = None) -> APIClient:
    client = APIClient()
    if token:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    elif user:
        client.force_authenticate(user)
    return client


@pytest.fixture
def superuser_token():
    user = get_user_model().objects.create_superuser("root", password="pw-root-123")
    return staff_token_issue(user=user, name="ci").secret
